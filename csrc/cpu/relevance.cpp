// relevance_scores on CPU, forward and backward.
//
// Work unit: one (b, h) pair. Its T x N logits (T text tokens: 1 to a few dozen; N patches: up to
// ~1000) fit a scratch of tens of KB that stays in L1/L2, so each pair reads its k tile from memory
// once and the [B, H, T, N] probabilities of the reference never exist. The forward turns each
// scratch row into max, exp, sum, log-normaliser and weighted probabilities in one sweep; the
// backward recomputes the logits and their softmax, overwrites the scratch with dlogits and runs
// the two small products dq = dL k and dk = dL^T q, each output element written once. (The lse
// argument of the backward is validated but not needed: see backward_pair.)
//
// The hot code is compiled twice, for AVX2 + FMA and for the x86-64 baseline (see vec8.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../common.h"
#include "vec8.h"

#if defined(__clang__)
#define BUS_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define BUS_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

namespace bus_kernels {
namespace {

using namespace vec8;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;

BUS_INLINE int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// ------------------------------------------------------------------------------ vector helpers
// Eight dot products from their lane-partial accumulators: a transpose-and-add tree, so the eight
// logits of eight keys come out as one vector (stored contiguously) instead of eight horizontal sums.
BUS_INLINE vf pair_sums(vf a, vf b) {
  return BUS_SHUFFLE(a, b, 0, 8, 1, 9, 4, 12, 5, 13) + BUS_SHUFFLE(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
}
BUS_INLINE vf quad_sums(vf x, vf y) {
  return BUS_SHUFFLE(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + BUS_SHUFFLE(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
}
BUS_INLINE vf sum8(vf a0, vf a1, vf a2, vf a3, vf a4, vf a5, vf a6, vf a7) {
  const vf lo = quad_sums(pair_sums(a0, a1), pair_sums(a2, a3));  // [a0..a3 low half | high half]
  const vf hi = quad_sums(pair_sums(a4, a5), pair_sums(a6, a7));
  return BUS_SHUFFLE(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) + BUS_SHUFFLE(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// Non-temporal stores for dk: it is as large as k, written once and not read back here, so
// streaming it past the cache saves the read-for-ownership of every line (a third of the
// backward's memory traffic at T = 1). Only for a dk well beyond the L2 caches, which its
// consumer (the autograd sum into k.grad) would otherwise still find in cache. SSE2 is part of
// x86-64, so both variants have these stores; p must be 16-byte aligned.
#if defined(__SSE2__)
#define BUS_HAVE_STREAM 1
template <typename T>
BUS_INLINE void stream8(T* p, vf v);

template <>
BUS_INLINE void stream8<float>(float* p, vf v) {
  __m128 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  _mm_stream_ps(p, lo);
  _mm_stream_ps(p + 4, hi);
}

template <>
BUS_INLINE void stream8<c10::BFloat16>(c10::BFloat16* p, vf v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)narrow8_bf16(v));
}

template <>
BUS_INLINE void stream8<c10::Half>(c10::Half* p, vf v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)narrow8_half(v));
}
#endif

// Row tails (d not a multiple of 8): through a zero-padded buffer.
template <typename T>
BUS_INLINE vf load_chunk(const T* p, int64_t count) {
  if (count >= kLanes) return load8(p);
  float tmp[kLanes] = {};
  for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<float>(p[i]);
  return loadu(tmp);
}

template <typename T>
BUS_INLINE void store_chunk(T* p, vf v, int64_t count) {
  if (count >= kLanes) return store8(p, v);
  float tmp[kLanes];
  storeu(tmp, v);
  for (int64_t i = 0; i < count; ++i) p[i] = static_cast<T>(tmp[i]);
}

// rows x d (input dtype, stride d) -> rows x dp fp32 (stride dp, zero-padded).
template <typename T>
BUS_INLINE void widen_rows(const T* src, int64_t rows, int64_t d, int64_t dp, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < dp; c += kLanes) storeu(dst + r * dp + c, load_chunk(src + r * d + c, d - c));
}

// --------------------------------------------------------------------------------- the products
// S[t, n] = scale * <Q[t], K[n]> for t < T, n < N; Q, K fp32 with row stride dp (a multiple of 8).
BUS_INLINE void logits(const float* Q, int64_t T, const float* K, int64_t N, int64_t dp, float scale,
                       float* S, int64_t ldS) {
  const vf vscale = splat(scale);
  int64_t n = 0;
  for (; n + kLanes <= N; n += kLanes) {
    const float* k = K + n * dp;
    // With one text token this loop streams k from DRAM at one FMA per element; the hardware
    // prefetcher stops at 4 KB pages, so fetch two blocks (2 x 8 keys) ahead. Past the tile's end
    // this reaches into the next pair's keys, which are contiguous and read next.
    for (int64_t off = 0; off < kLanes * dp; off += 16) __builtin_prefetch(k + 2 * kLanes * dp + off);
    for (int64_t t = 0; t < T; ++t) {
      const float* q = Q + t * dp;
      vf a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{};
      for (int64_t j = 0; j < dp; j += kLanes) {
        const vf qv = loadu(q + j);
        a0 += qv * loadu(k + j);
        a1 += qv * loadu(k + dp + j);
        a2 += qv * loadu(k + 2 * dp + j);
        a3 += qv * loadu(k + 3 * dp + j);
        a4 += qv * loadu(k + 4 * dp + j);
        a5 += qv * loadu(k + 5 * dp + j);
        a6 += qv * loadu(k + 6 * dp + j);
        a7 += qv * loadu(k + 7 * dp + j);
      }
      storeu(S + t * ldS + n, sum8(a0, a1, a2, a3, a4, a5, a6, a7) * vscale);
    }
  }
  for (; n < N; ++n) {
    for (int64_t t = 0; t < T; ++t) {
      vf a{};
      for (int64_t j = 0; j < dp; j += kLanes) a += loadu(Q + t * dp + j) * loadu(K + n * dp + j);
      S[t * ldS + n] = hsum(a) * scale;
    }
  }
}

// out[i][c : c + 8 * DV] = sum_n dL[i, n] K[n, c : ...] for TB rows i (dq of TB text tokens).
template <int TB, int DV, typename T>
BUS_INLINE void dq_tile(const float* dL, int64_t ldS, const float* K, int64_t N, int64_t dp, int64_t c,
                        int64_t d, T* const* out) {
  vf acc[TB][DV] = {};
  for (int64_t n = 0; n < N; ++n) {
    vf kv[DV];
#pragma GCC unroll 4
    for (int v = 0; v < DV; ++v) kv[v] = loadu(K + n * dp + c + v * kLanes);
#pragma GCC unroll 4
    for (int i = 0; i < TB; ++i) {
      const vf g = splat(dL[i * ldS + n]);
#pragma GCC unroll 4
      for (int v = 0; v < DV; ++v) acc[i][v] += g * kv[v];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < TB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < DV; ++v) store_chunk(out[i] + c + v * kLanes, acc[i][v], d - c - v * kLanes);
}

template <int TB, typename T>
BUS_INLINE void dq_rows(const float* dL, int64_t ldS, const float* K, int64_t N, int64_t dp, int64_t d,
                        T* const* out) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= dp; c += 4 * kLanes) dq_tile<TB, 4>(dL, ldS, K, N, dp, c, d, out);
  for (; c < dp; c += kLanes) dq_tile<TB, 1>(dL, ldS, K, N, dp, c, d, out);
}

// out[n][c : c + 8 * DV] = sum_t dL[t, n] Q[t, c : ...]: one key (a dk row, stride d) at a time.
// Q is a few KB and stays in L1, so reloading it per key is cheap; two keys per tile would put two
// adjacent dL values side by side, which GCC's SLP pass packs into one load and then spills to
// rebuild the broadcasts.
template <bool kStream, int DV, typename T>
BUS_INLINE void dk_tile(const float* dL, int64_t ldS, const float* Q, int64_t Ta, int64_t dp, int64_t c,
                        int64_t d, int64_t n, T* out) {
  vf acc[DV] = {};
  for (int64_t t = 0; t < Ta; ++t) {
    const vf g = splat(dL[t * ldS + n]);
#pragma GCC unroll 8
    for (int v = 0; v < DV; ++v) acc[v] += g * loadu(Q + t * dp + c + v * kLanes);
  }
#pragma GCC unroll 8
  for (int v = 0; v < DV; ++v) {
#ifdef BUS_HAVE_STREAM
    if (kStream) {
      stream8(out + n * d + c + v * kLanes, acc[v]);
      continue;
    }
#endif
    store_chunk(out + n * d + c + v * kLanes, acc[v], d - c - v * kLanes);
  }
}

// kStream: d is a multiple of 8 and out 16-byte aligned, so every chunk is a whole aligned vector.
template <bool kStream, typename T>
BUS_INLINE void dk_rows(const float* dL, int64_t ldS, const float* Q, int64_t Ta, int64_t N, int64_t dp,
                        int64_t d, T* out) {
  for (int64_t n = 0; n < N; ++n) {
    int64_t c = 0;
    for (; c + 8 * kLanes <= dp; c += 8 * kLanes) dk_tile<kStream, 8>(dL, ldS, Q, Ta, dp, c, d, n, out);
    for (; c + 4 * kLanes <= dp; c += 4 * kLanes) dk_tile<kStream, 4>(dL, ldS, Q, Ta, dp, c, d, n, out);
    for (; c < dp; c += kLanes) dk_tile<kStream, 1>(dL, ldS, Q, Ta, dp, c, d, n, out);
  }
}

// ------------------------------------------------------------------------------------ the pairs
struct Problem {
  int64_t B, H, T, N, d;
  int64_t dp;  // d rounded up to 8: the fp32 row stride of the scratch tiles
  int64_t Np;  // N rounded up to 8: the row stride of the logits scratch
  float scale;
  bool stream_dk;  // write dk with non-temporal stores (see stream8)
  const float* w;  // [B, T] token weights: mask / (H * count)
  at::ScalarType dtype;
  const void* q;
  const void* k;
};

// Per-task scratch, allocated once per parallel chunk.
struct Scratch {
  std::vector<float> buf;
  float *Q, *K, *S, *row, *g;
  std::vector<int64_t> active;
  Scratch(const Problem& p, bool own_k) {
    const int64_t qn = p.T * p.dp, kn = own_k ? p.N * p.dp : 0, sn = p.T * p.Np;
    buf.assign(qn + kn + sn + 2 * p.Np, 0.f);
    Q = buf.data();
    K = Q + qn;
    S = K + kn;
    row = S + sn;
    g = row + p.Np;
    active.resize(p.T);
  }
};

// k[b, h] as fp32 rows of stride dp: the input itself when it already is, else widened into scratch.
template <typename T>
BUS_INLINE const float* key_tile(const Problem& p, int64_t bh, Scratch& s) {
  const T* k = static_cast<const T*>(p.k) + bh * p.N * p.d;
  if (std::is_same<T, float>::value && p.d == p.dp) return reinterpret_cast<const float*>(k);
  widen_rows(k, p.N, p.d, p.dp, s.K);
  return s.K;
}

BUS_INLINE bool needs_key_scratch(const Problem& p) { return p.dtype != at::kFloat || p.d != p.dp; }

// x[0:N] <- exp(x - max x), x[N:Np] <- 0; returns the max and the sum of the exps.
struct RowNorm {
  float max, sum;
};
BUS_INLINE RowNorm exp_row(float* x, int64_t N, int64_t Np) {
  for (int64_t n = N; n < Np; ++n) x[n] = -kInf;  // exp(-inf) = 0: the tail drops out
  vf mv = splat(-kInf);
  for (int64_t n = 0; n < Np; n += kLanes) mv = vmax(mv, loadu(x + n));
  const float m = hmax(mv);
  const vf vm = splat(m);
  vf sv{};
  for (int64_t n = 0; n < Np; n += kLanes) {
    const vf e = vexp(loadu(x + n) - vm);
    storeu(x + n, e);
    sv += e;
  }
  return {m, hsum(sv)};
}

// Adds sum_t w[t] softmax(S[t]) of pair (b, h) to `row` (Np wide) and writes lse[b, h, :].
template <typename T>
BUS_INLINE void forward_pair(const Problem& p, int64_t bh, Scratch& s, float* row, float* lse) {
  const int64_t b = bh / p.H, T_ = p.T, N = p.N, Np = p.Np;
  widen_rows(static_cast<const T*>(p.q) + bh * T_ * p.d, T_, p.d, p.dp, s.Q);
  const float* K = key_tile<T>(p, bh, s);
  logits(s.Q, T_, K, N, p.dp, p.scale, s.S, Np);
  const float* w = p.w + b * T_;
  for (int64_t t = 0; t < T_; ++t) {
    float* x = s.S + t * Np;
    const RowNorm r = exp_row(x, N, Np);
    const float sum = r.sum;
    lse[bh * T_ + t] = r.max + std::log(sum);
    if (w[t] == 0.f) continue;  // a padding token: it has an lse but no weight
    const vf c = splat(w[t] / sum);
    for (int64_t n = 0; n < Np; n += kLanes) storeu(row + n, loadu(row + n) + c * loadu(x + n));
  }
}

template <typename T>
BUS_INLINE void forward_range_typed(const Problem& p, int64_t begin, int64_t end, bool per_sample,
                                    float* out, float* lse) {
  Scratch s(p, needs_key_scratch(p));
  for (int64_t i = begin; i < end; ++i) {
    std::fill(s.row, s.row + p.Np, 0.f);
    if (per_sample) {
      for (int64_t h = 0; h < p.H; ++h) forward_pair<T>(p, i * p.H + h, s, s.row, lse);
    } else {
      forward_pair<T>(p, i, s, s.row, lse);
    }
    std::memcpy(out + i * p.N, s.row, p.N * sizeof(float));
  }
}

// Returns CALL with T the element type of `dtype` (float32, bfloat16 or float16: make_problem
// checks). A macro, not a generic lambda: a lambda's body is a function of its own, and one that
// the compiler leaves out of line is compiled for the baseline even when called from the
// BUS_TARGET_AVX2 variant.
#define BUS_DTYPE_SWITCH(dtype, CALL) \
  switch (dtype) {                    \
    case at::kFloat: {                \
      using T = float;                \
      return CALL;                    \
    }                                 \
    case at::kBFloat16: {             \
      using T = c10::BFloat16;        \
      return CALL;                    \
    }                                 \
    default: {                        \
      using T = c10::Half;            \
      return CALL;                    \
    }                                 \
  }

BUS_INLINE void forward_range_body(const Problem& p, int64_t begin, int64_t end, bool per_sample, float* out,
                                   float* lse) {
  BUS_DTYPE_SWITCH(p.dtype, forward_range_typed<T>(p, begin, end, per_sample, out, lse));
}

template <typename T>
BUS_INLINE void backward_pair(const Problem& p, int64_t bh, Scratch& s, const float* grad, T* dq, T* dk) {
  const int64_t b = bh / p.H, T_ = p.T, N = p.N, Np = p.Np, d = p.d, dp = p.dp;
  const float* w = p.w + b * T_;
  const T* q = static_cast<const T*>(p.q) + bh * T_ * d;
  // Only weighted tokens have a gradient: compact them so that padding costs no products.
  int64_t Ta = 0;
  for (int64_t t = 0; t < T_; ++t) {
    if (w[t] != 0.f) {
      s.active[Ta] = t;
      widen_rows(q + t * d, 1, d, dp, s.Q + Ta * dp);
      ++Ta;
    } else {
      std::fill(dq + (bh * T_ + t) * d, dq + (bh * T_ + t + 1) * d, static_cast<T>(0.f));
    }
  }
  const float* K = key_tile<T>(p, bh, s);
  logits(s.Q, Ta, K, N, dp, p.scale, s.S, Np);
  std::memcpy(s.g, grad + b * N, N * sizeof(float));  // s.g[N:Np] stays 0
  // P = e / sum with e = exp(x - max) and sum recomputed from the logits row already in scratch
  // (one extra max sweep, small beside the three products), not exp(x - lse): lse is rounded to
  // fp32, so that would carry a relative error of |lse| * 2^-24 into every P, 2e-4 at lse = 3500.
  for (int64_t i = 0; i < Ta; ++i) {
    const int64_t t = s.active[i];
    float* x = s.S + i * Np;
    const RowNorm norm = exp_row(x, N, Np);
    const float inv = 1.f / norm.sum;
    vf rv{};
    for (int64_t n = 0; n < Np; n += kLanes) rv += loadu(x + n) * loadu(s.g + n);
    const vf r = splat(hsum(rv) * inv);  // <g, P[t]>
    const vf c = splat(w[t] * p.scale * inv);
    for (int64_t n = 0; n < Np; n += kLanes) storeu(x + n, loadu(x + n) * (loadu(s.g + n) - r) * c);
  }
  T* rows[2];
  int64_t i = 0;
  for (; i + 2 <= Ta; i += 2) {
    rows[0] = dq + (bh * T_ + s.active[i]) * d;
    rows[1] = dq + (bh * T_ + s.active[i + 1]) * d;
    dq_rows<2>(s.S + i * Np, Np, K, N, dp, d, rows);
  }
  if (i < Ta) {
    rows[0] = dq + (bh * T_ + s.active[i]) * d;
    dq_rows<1>(s.S + i * Np, Np, K, N, dp, d, rows);
  }
  T* dk_pair = dk + bh * N * d;
  if (p.stream_dk && d == dp && reinterpret_cast<uintptr_t>(dk_pair) % 16 == 0) {
    dk_rows<true>(s.S, Np, s.Q, Ta, N, dp, d, dk_pair);
  } else {
    dk_rows<false>(s.S, Np, s.Q, Ta, N, dp, d, dk_pair);
  }
}

template <typename T>
BUS_INLINE void backward_range_typed(const Problem& p, int64_t begin, int64_t end, const float* grad,
                                     void* dq, void* dk) {
  Scratch s(p, needs_key_scratch(p));
  for (int64_t bh = begin; bh < end; ++bh)
    backward_pair<T>(p, bh, s, grad, static_cast<T*>(dq), static_cast<T*>(dk));
#ifdef BUS_HAVE_STREAM
  _mm_sfence();  // streamed dk stores are weakly ordered: make them visible before the task ends
#endif
}

BUS_INLINE void backward_range_body(const Problem& p, int64_t begin, int64_t end, const float* grad,
                                    void* dq, void* dk) {
  BUS_DTYPE_SWITCH(p.dtype, backward_range_typed<T>(p, begin, end, grad, dq, dk));
}

// The same bodies compiled for the baseline and for AVX2 + FMA.
void forward_range_base(const Problem& p, int64_t begin, int64_t end, bool per_sample, float* out, float* lse) {
  forward_range_body(p, begin, end, per_sample, out, lse);
}
void backward_range_base(const Problem& p, int64_t begin, int64_t end, const float* grad, void* dq,
                         void* dk) {
  backward_range_body(p, begin, end, grad, dq, dk);
}

#ifdef BUS_X86_DISPATCH
BUS_TARGET_AVX2 void forward_range_avx2(const Problem& p, int64_t begin, int64_t end, bool per_sample,
                                        float* out, float* lse) {
  forward_range_body(p, begin, end, per_sample, out, lse);
}
BUS_TARGET_AVX2 void backward_range_avx2(const Problem& p, int64_t begin, int64_t end, const float* grad,
                                         void* dq, void* dk) {
  backward_range_body(p, begin, end, grad, dq, dk);
}
#endif

// Items [begin, end): samples (out is scores [B, N]) or (b, h) pairs (out is partial rows [B*H, N]).
void forward_range(const Problem& p, int64_t begin, int64_t end, bool per_sample, float* out, float* lse) {
#ifdef BUS_X86_DISPATCH
  if (has_avx2_fma()) return forward_range_avx2(p, begin, end, per_sample, out, lse);
#endif
  forward_range_base(p, begin, end, per_sample, out, lse);
}

// (b, h) pairs [begin, end): each writes its own dq[b, h] and dk[b, h], so pairs never race.
void backward_range(const Problem& p, int64_t begin, int64_t end, const float* grad, void* dq, void* dk) {
#ifdef BUS_X86_DISPATCH
  if (has_avx2_fma()) return backward_range_avx2(p, begin, end, grad, dq, dk);
#endif
  backward_range_base(p, begin, end, grad, dq, dk);
}

// ------------------------------------------------------------------------- checks and entries
void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
}

// Checks q, k (and q_mask) and returns the problem with the token weights in `w`.
Problem make_problem(const char* op, const at::Tensor& q, const at::Tensor& k,
                     const std::optional<at::Tensor>& q_mask, double scale, std::vector<float>& w) {
  check_cpu(op, "q", q);
  check_cpu(op, "k", k);
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, T, d], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be [B, H, N, d], got shape ", k.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, op, ": k must have q's dtype ", dt, ", got ", k.scalar_type());
  Problem p{};
  p.B = q.size(0);
  p.H = q.size(1);
  p.T = q.size(2);
  p.d = q.size(3);
  p.N = k.size(2);
  TORCH_CHECK(p.T >= 1, op, ": q must have T >= 1 text tokens, got shape ", q.sizes());
  TORCH_CHECK(k.size(0) == p.B && k.size(1) == p.H && k.size(3) == p.d, op, ": k must be [B=", p.B,
              ", H=", p.H, ", N, d=", p.d, "] to match q, got ", k.sizes());
  p.dp = round_up(p.d);
  p.Np = round_up(p.N);
  p.scale = static_cast<float>(scale);
  p.dtype = dt;
  w.assign(p.B * p.T, 0.f);
  if (q_mask.has_value()) {
    const at::Tensor& m = *q_mask;
    check_cpu(op, "q_mask", m);
    check_q_mask(op, m, p.B, p.T);
    const at::Tensor mc = m.contiguous();
    const bool* mask = mc.data_ptr<bool>();
    for (int64_t b = 0; b < p.B; ++b) {
      int64_t count = 0;
      for (int64_t t = 0; t < p.T; ++t) count += mask[b * p.T + t];
      TORCH_CHECK(count > 0, op, ": q_mask row ", b, " has no True; every sample needs at least one real text token");
      const float wb = 1.0f / static_cast<float>(p.H * count);
      for (int64_t t = 0; t < p.T; ++t) w[b * p.T + t] = mask[b * p.T + t] ? wb : 0.f;
    }
  } else if (p.H > 0) {
    std::fill(w.begin(), w.end(), static_cast<float>(1.0 / static_cast<double>(p.H * p.T)));
  }
  p.w = w.data();
  return p;
}

std::tuple<at::Tensor, at::Tensor> relevance_scores_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        double scale, const std::optional<at::Tensor>& q_mask) {
  const char* op = "bus_kernels_C::relevance_scores";
  std::vector<float> w;
  Problem p = make_problem(op, q_in, k_in, q_mask, scale, w);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({p.B, p.H, p.T}, f32);
  // One sample per task keeps the head sum inside the task; with fewer samples than threads the
  // (b, h) pairs are spread instead and their partial rows summed afterwards.
  if (p.B >= at::get_num_threads() || p.H <= 1) {
    at::Tensor scores = at::empty({p.B, p.N}, f32);
    float* out = scores.data_ptr<float>();
    float* l = lse.data_ptr<float>();
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) { forward_range(p, b0, b1, true, out, l); });
    return {scores, lse};
  }
  at::Tensor part = at::empty({p.B, p.H, p.N}, f32);
  float* out = part.data_ptr<float>();
  float* l = lse.data_ptr<float>();
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t i0, int64_t i1) { forward_range(p, i0, i1, false, out, l); });
  return {part.sum(1), lse};
}

std::tuple<at::Tensor, at::Tensor> relevance_scores_backward_cpu(const at::Tensor& grad_in,
                                                                 const at::Tensor& q_in, const at::Tensor& k_in,
                                                                 const at::Tensor& lse_in, double scale,
                                                                 const std::optional<at::Tensor>& q_mask) {
  const char* op = "bus_kernels_C::relevance_scores_backward";
  std::vector<float> w;
  Problem p = make_problem(op, q_in, k_in, q_mask, scale, w);
  check_cpu(op, "grad", grad_in);
  check_cpu(op, "lse", lse_in);
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat, op, ": grad must be float32, got ", grad_in.scalar_type());
  check_grad_lse(op, grad_in, lse_in, p.B, p.H, p.T, p.N);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  p.stream_dk = dk.nbytes() >= kStreamMinBytes;
  const float* g = grad.data_ptr<float>();
  void* dq_ptr = dq.data_ptr();
  void* dk_ptr = dk.data_ptr();
  at::parallel_for(0, p.B * p.H, 1,
                   [&](int64_t i0, int64_t i1) { backward_range(p, i0, i1, g, dq_ptr, dk_ptr); });
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(bus_kernels_C, CPU, m) {
  m.impl("relevance_scores", &relevance_scores_cpu);
  m.impl("relevance_scores_backward", &relevance_scores_backward_cpu);
}

}  // namespace bus_kernels
