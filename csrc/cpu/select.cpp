// select_tokens / select_tokens_varlen on CPU, forward and backward.
//
// One task per row (at::parallel_for over the batch). A row is ranked with std::nth_element on
// column indices under the contract's order (higher score first, lower index on ties), then read
// once: kept rows are copied to their slots, dropped rows are accumulated into the fused token in
// fp32. The backward derives kept/dropped from `indices` and writes every row of grad_x exactly
// once, so it needs no zero-fill pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string_view>
#include <vector>

#include "../common.h"

namespace bus_kernels {
namespace {

enum class Fuse { kNone, kSum, kMean };

Fuse parse_fuse(const char* op, std::string_view fuse) {
  if (fuse == "none") return Fuse::kNone;
  if (fuse == "sum") return Fuse::kSum;
  if (fuse == "mean") return Fuse::kMean;
  TORCH_CHECK(false, op, ": fuse must be 'none', 'sum' or 'mean', got '", fuse, "'");
  return Fuse::kNone;  // unreachable
}

// The float loops below are where the time goes once the row is ranked; clones let the loader
// pick AVX2+FMA where the CPU has it while the library still runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BK_HOT __attribute__((target_clones("avx2", "default")))
#else
#define BK_HOT
#endif

BK_HOT void axpy(float* __restrict acc, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * x[i];
}

BK_HOT float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  // Eight partial sums: a vectorisable reduction without -ffast-math.
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

BK_HOT void scale_to(float* __restrict out, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a * x[i];
}

// A row as fp32: the row itself for float tensors, else converted into `buf`.
template <typename T>
const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename T>
void store(T* dst, const float* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// Order-preserving uint32 image of an fp32 score (as csrc/cuda/select.cu): -0.0 ties +0.0, and
// every NaN, of either sign, ranks above +inf as torch.sort ranks it. Comparing keys instead of
// floats also gives std::nth_element the strict weak order it needs when a NaN gets through
// (value checks off): float `>` with a NaN does not, and is undefined behaviour there.
inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;
  if ((u & 0x7fffffffu) == 0u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Columns 0..n-1 of one row; afterwards the first k are the row's top k (contract order), in
// index order or, with by_score, in descending score.
void rank_top_k(const float* s, int64_t n, int64_t k, bool by_score, std::vector<int64_t>& cols) {
  cols.resize(n);
  std::iota(cols.begin(), cols.end(), 0);
  auto before = [s](int64_t a, int64_t b) {
    const uint32_t ka = order_key(s[a]), kb = order_key(s[b]);
    return ka > kb || (ka == kb && a < b);
  };
  if (k > 0 && k < n) std::nth_element(cols.begin(), cols.begin() + (k - 1), cols.end(), before);
  if (by_score) {
    std::sort(cols.begin(), cols.begin() + k, before);
  } else {
    std::sort(cols.begin(), cols.begin() + k);
  }
}

void check_select_common(const char* op, const at::Tensor& x, const at::Tensor& scores, int64_t num_prefix) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, N, D], got ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16, op,
              ": x must be float32/float16/bfloat16, got ", xt);
  const auto st = scores.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": scores must be float32/float16/bfloat16, got ", st);
  TORCH_CHECK(scores.device() == x.device(), op, ": scores must be on ", x.device());
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= x.size(1), op, ": num_prefix=", num_prefix,
              " must be in [0, N=", x.size(1), "]");
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == x.size(0) && scores.size(1) == x.size(1) - num_prefix,
              op, ": scores must be [B=", x.size(0), ", N - num_prefix=", x.size(1) - num_prefix, "], got ",
              scores.sizes());
}

// The checked, contiguous x and scores of one call, its fuse mode and sizes (n = N - P rankable
// tokens per row).
struct Call {
  at::Tensor x, scores;
  Fuse fuse;
  int64_t B, N, D, P, n;
};

// Checks and prepares the arguments all four ops share.
Call prepare(const char* op, const at::Tensor& x_in, const at::Tensor& scores_in, int64_t num_prefix,
             c10::string_view fuse_s) {
  check_select_common(op, x_in, scores_in, num_prefix);
  const Fuse fuse = parse_fuse(op, std::string_view(fuse_s.data(), fuse_s.size()));
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(1);
  return {x, scores_in.contiguous(), fuse, x.size(0), N, x.size(2), num_prefix, N - num_prefix};
}

// One row's scores as fp32 in `buf` (scores are small next to x, so always copy).
template <typename S>
void load_scores(const S* src, int64_t n, std::vector<float>& buf) {
  buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
}

// Writes prefix rows, kept rows (from `cols[0..k)`) and, unless fuse is none, the fused token of
// one row. `out` points at the row's first output token.
template <typename T>
void select_row(const T* x, const float* s, int64_t n, int64_t D, int64_t P, int64_t k, Fuse fuse,
                const std::vector<int64_t>& cols, std::vector<char>& kept, std::vector<float>& acc,
                std::vector<float>& xbuf, T* out) {
  std::memcpy(out, x, P * D * sizeof(T));
  for (int64_t i = 0; i < k; ++i) std::memcpy(out + (P + i) * D, x + (P + cols[i]) * D, D * sizeof(T));
  if (fuse == Fuse::kNone) return;
  kept.assign(n, 0);
  for (int64_t i = 0; i < k; ++i) kept[cols[i]] = 1;
  acc.assign(D, 0.f);
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    if (kept[j]) continue;
    total += s[j];
    axpy(acc.data(), as_float(x + (P + j) * D, xbuf.data(), D), s[j], D);
  }
  if (fuse == Fuse::kMean) {
    // Divide (not multiply by 1/S, which overflows for subnormal S); nothing dropped or S == 0 -> 0.
    for (int64_t d = 0; d < D; ++d) acc[d] = total != 0.f ? acc[d] / total : 0.f;
  }
  store(out + (P + k) * D, acc.data(), D);
}

// grad_x rows and grad_scores of one row. `g` points at the row's first output-gradient token,
// `cols[0..k)` are the kept columns in output-slot order.
template <typename T, typename S>
void select_row_backward(const T* g, const T* x, const float* s, int64_t n, int64_t D, int64_t P,
                         int64_t k, Fuse fuse, const int64_t* cols, std::vector<char>& kept,
                         std::vector<float>& gdot, std::vector<float>& gbuf, std::vector<float>& xbuf,
                         std::vector<float>& rowbuf, T* gx, S* gs) {
  std::memcpy(gx, g, P * D * sizeof(T));
  kept.assign(n, 0);
  for (int64_t i = 0; i < k; ++i) {
    kept[cols[i]] = 1;
    std::memcpy(gx + (P + cols[i]) * D, g + (P + i) * D, D * sizeof(T));
  }
  if (fuse == Fuse::kNone) {
    for (int64_t j = 0; j < n; ++j) {
      if (!kept[j]) std::memset(gx + (P + j) * D, 0, D * sizeof(T));
      gs[j] = S(0.f);
    }
    return;
  }
  const float* gf = as_float(g + (P + k) * D, gbuf.data(), D);
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j)
    if (!kept[j]) total += s[j];
  // d/dx_j = coef_j g_f with coef_j = s_j (sum) or s_j / S (mean); d/ds_j needs <g_f, x_j>.
  gdot.assign(n, 0.f);
  float gf_dot_fused = 0.f;  // mean: <g_f, f> = sum_j coef_j <g_f, x_j>
  for (int64_t j = 0; j < n; ++j) {
    if (kept[j]) continue;
    gdot[j] = dot(gf, as_float(x + (P + j) * D, xbuf.data(), D), D);
    float coef = s[j];
    if (fuse == Fuse::kMean) {
      coef = total != 0.f ? s[j] / total : 0.f;
      gf_dot_fused += coef * gdot[j];
    }
    scale_to(rowbuf.data(), gf, coef, D);
    store(gx + (P + j) * D, rowbuf.data(), D);
  }
  for (int64_t j = 0; j < n; ++j) {
    float v = 0.f;
    if (!kept[j]) {
      if (fuse == Fuse::kSum) {
        v = gdot[j];
      } else if (total != 0.f) {
        v = (gdot[j] - gf_dot_fused) / total;
      }
    }
    gs[j] = S(v);
  }
}

// Per-thread scratch, sized once per task.
struct Scratch {
  std::vector<float> s, acc, xbuf, gbuf, rowbuf, gdot;
  std::vector<int64_t> cols;
  std::vector<char> kept;
  explicit Scratch(int64_t D) : acc(D), xbuf(D), gbuf(D), rowbuf(D) {}
};

// fp32/fp16/bf16 only (the op checks): fewer instantiations than AT_DISPATCH_FLOATING_TYPES_AND2.
#define BK_DISPATCH(TYPE, NAME, ...)                                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                  \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Where row b of a selection lives: its kept count, its first output (or output-gradient)
// token and its first index. The fixed-k ops are the varlen layout with every keep[b] = k.
struct Rows {
  const int64_t* keep = nullptr;     // per-row counts (varlen), or null: every row keeps k
  const int32_t* cu = nullptr;       // first token of row b (varlen), or null: b * rows
  const int64_t* offsets = nullptr;  // first index of row b (varlen), or null: b * k
  int64_t k = 0, rows = 0;
  int64_t count(int64_t b) const { return keep ? keep[b] : k; }
  int64_t token(int64_t b) const { return cu ? int64_t(cu[b]) : b * rows; }
  int64_t index(int64_t b) const { return offsets ? offsets[b] : b * k; }
};

// Runs body(T{}, S{}, b, kb, w) for every row b, rows in parallel: T and S are the element types
// of x and scores, kb the row's keep count, w the task's scratch with the row's scores as fp32 in
// w.s. Shared by the forward and the backward.
template <typename F>
void for_each_row(const at::Tensor& x, const at::Tensor& scores, int64_t P, const Rows& r,
                  const F& body) {
  const int64_t B = x.size(0), D = x.size(2), n = x.size(1) - P;
  BK_DISPATCH(x.scalar_type(), "select_tokens_cpu", [&] {
    using T = scalar_t;
    BK_DISPATCH(scores.scalar_type(), "select_scores", [&] {
      using S = scalar_t;
      const S* sp = scores.data_ptr<S>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        Scratch w(D);
        for (int64_t b = b0; b < b1; ++b) {
          load_scores(sp + b * n, n, w.s);
          body(T{}, S{}, b, r.count(b), w);
        }
      });
    });
  });
}

// Ranks every row, writes its indices and tokens into `indices` and `out`.
void select_forward(const at::Tensor& x, const at::Tensor& scores, int64_t P, Fuse fuse, bool by_score,
                    const Rows& r, at::Tensor& out, at::Tensor& indices) {
  const int64_t N = x.size(1), D = x.size(2), n = N - P;
  int64_t* ip = indices.data_ptr<int64_t>();
  for_each_row(x, scores, P, r, [&](auto t, auto, int64_t b, int64_t kb, Scratch& w) {
    using T = decltype(t);
    rank_top_k(w.s.data(), n, kb, by_score, w.cols);
    for (int64_t i = 0; i < kb; ++i) ip[r.index(b) + i] = w.cols[i] + P;
    select_row(x.data_ptr<T>() + b * N * D, w.s.data(), n, D, P, kb, fuse, w.cols, w.kept, w.acc, w.xbuf,
               out.data_ptr<T>() + r.token(b) * D);
  });
}

// grad_x and grad_scores of every row from `grad` (laid out as the forward's output).
void select_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scores,
                     const at::Tensor& indices, int64_t P, Fuse fuse, const Rows& r, at::Tensor& gx,
                     at::Tensor& gs) {
  const int64_t N = x.size(1), D = x.size(2), n = N - P;
  const int64_t* ip = indices.data_ptr<int64_t>();
  for_each_row(x, scores, P, r, [&](auto t, auto s, int64_t b, int64_t kb, Scratch& w) {
    using T = decltype(t);
    using S = decltype(s);
    w.cols.resize(kb);
    for (int64_t i = 0; i < kb; ++i) w.cols[i] = ip[r.index(b) + i] - P;
    select_row_backward(grad.data_ptr<T>() + r.token(b) * D, x.data_ptr<T>() + b * N * D, w.s.data(), n, D, P, kb,
                        fuse, w.cols.data(), w.kept, w.gdot, w.gbuf, w.xbuf, w.rowbuf, gx.data_ptr<T>() + b * N * D,
                        gs.data_ptr<S>() + b * n);
  });
}

std::tuple<at::Tensor, at::Tensor> select_tokens_cpu(const at::Tensor& x_in, const at::Tensor& scores_in,
                                                     int64_t k, int64_t num_prefix, c10::string_view fuse_s,
                                                     c10::string_view order) {
  const char* op = "bus_kernels_C::select_tokens";
  const auto [x, scores, fuse, B, N, D, P, n] = prepare(op, x_in, scores_in, num_prefix, fuse_s);
  TORCH_CHECK(order == "index" || order == "score", op, ": order must be 'index' or 'score', got '", order, "'");
  TORCH_CHECK(k >= 1 && k <= n, op, ": k=", k, " must be in [1, N - num_prefix=", n, "]");
  const int64_t rows = P + k + (fuse != Fuse::kNone);
  at::Tensor out = at::empty({B, rows, D}, x.options());
  at::Tensor indices = at::empty({B, k}, x.options().dtype(at::kLong));
  const bool by_score = order == "score";
  Rows r;
  r.k = k;
  r.rows = rows;
  select_forward(x, scores, P, fuse, by_score, r, out, indices);
  return {out, indices};
}

// Kept columns (indices - P) of each row, checked to lie in [0, n) so that no malformed
// `indices` reaching the op directly can address memory outside x.
void check_indices(const char* op, const int64_t* idx, int64_t count, int64_t P, int64_t N) {
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(idx[i] >= P && idx[i] < N, op, ": indices must be in [num_prefix=", P, ", N=", N, "), got ", idx[i]);
}

std::tuple<at::Tensor, at::Tensor> select_tokens_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                              const at::Tensor& scores_in, const at::Tensor& indices_in,
                                                              int64_t num_prefix, c10::string_view fuse_s) {
  const char* op = "bus_kernels_C::select_tokens_backward";
  const auto [x, scores, fuse, B, N, D, P, n] = prepare(op, x_in, scores_in, num_prefix, fuse_s);
  TORCH_CHECK(indices_in.dim() == 2 && indices_in.size(0) == B && indices_in.scalar_type() == at::kLong &&
                  indices_in.size(1) <= n,
              op, ": indices must be int64 [B=", B, ", k <= ", n, "], got ", indices_in.scalar_type(), " ",
              indices_in.sizes());
  const at::Tensor indices = indices_in.contiguous();
  const int64_t k = indices.size(1), rows = P + k + (fuse != Fuse::kNone);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == rows && grad_in.size(2) == D &&
                  grad_in.scalar_type() == x.scalar_type() && grad_in.device() == x.device(),
              op, ": grad must be ", x.scalar_type(), " [B=", B, ", ", rows, ", D=", D, "], got ",
              grad_in.scalar_type(), " ", grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous();
  check_indices(op, indices.data_ptr<int64_t>(), B * k, P, N);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gs = at::empty_like(scores);
  Rows r;
  r.k = k;
  r.rows = rows;
  select_backward(grad, x, scores, indices, P, fuse, r, gx, gs);
  return {gx, gs};
}

// keep [B] and cu_seqlens [B+1] of the varlen ops: every keep[b] in [0, n], every sequence
// exactly P + keep[b] + fused rows long, ending at `total`. Returns the offsets of each row's
// indices (exclusive prefix sum of keep).
std::vector<int64_t> check_varlen(const char* op, const at::Tensor& keep, const at::Tensor& cu, int64_t B,
                                  int64_t n, int64_t extra, int64_t total) {
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == B && keep.scalar_type() == at::kLong && keep.device().is_cpu(),
              op, ": keep must be int64 [B=", B, "] on CPU, got ", keep.scalar_type(), " ", keep.sizes());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) == B + 1 && cu.scalar_type() == at::kInt && cu.device().is_cpu(), op,
              ": cu_seqlens must be int32 [B+1=", B + 1, "] on CPU, got ", cu.scalar_type(), " ", cu.sizes());
  const int64_t* kp = keep.data_ptr<int64_t>();
  const int32_t* cp = cu.data_ptr<int32_t>();
  TORCH_CHECK(cp[0] == 0, op, ": cu_seqlens must start at 0, got ", cp[0]);
  std::vector<int64_t> offsets(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(kp[b] >= 0 && kp[b] <= n, op, ": keep[", b, "]=", kp[b], " must be in [0, N - num_prefix=", n, "]");
    TORCH_CHECK(int64_t(cp[b + 1]) - cp[b] == kp[b] + extra, op, ": sequence ", b, " must have ",
                kp[b] + extra, " rows (num_prefix + keep[b] + fused), cu_seqlens says ", int64_t(cp[b + 1]) - cp[b]);
    offsets[b + 1] = offsets[b] + kp[b];
  }
  TORCH_CHECK(cp[B] == total, op, ": cu_seqlens must end at total=", total, ", got ", cp[B]);
  return offsets;
}

std::tuple<at::Tensor, at::Tensor> select_tokens_varlen_cpu(const at::Tensor& x_in, const at::Tensor& scores_in,
                                                            const at::Tensor& keep_in, const at::Tensor& cu_in,
                                                            int64_t total, int64_t num_prefix, c10::string_view fuse_s) {
  const char* op = "bus_kernels_C::select_tokens_varlen";
  const auto [x, scores, fuse, B, N, D, P, n] = prepare(op, x_in, scores_in, num_prefix, fuse_s);
  const at::Tensor keep = keep_in.contiguous(), cu = cu_in.contiguous();
  const int64_t extra = P + (fuse != Fuse::kNone);
  const std::vector<int64_t> offsets = check_varlen(op, keep, cu, B, n, extra, total);
  at::Tensor out = at::empty({total, D}, x.options());
  at::Tensor indices = at::empty({offsets[B]}, x.options().dtype(at::kLong));
  Rows r;
  r.keep = keep.data_ptr<int64_t>();
  r.cu = cu.data_ptr<int32_t>();
  r.offsets = offsets.data();
  select_forward(x, scores, P, fuse, /*by_score=*/false, r, out, indices);
  return {out, indices};
}

std::tuple<at::Tensor, at::Tensor> select_tokens_varlen_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scores_in, const at::Tensor& indices_in,
    const at::Tensor& keep_in, const at::Tensor& cu_in, int64_t num_prefix, c10::string_view fuse_s) {
  const char* op = "bus_kernels_C::select_tokens_varlen_backward";
  const auto [x, scores, fuse, B, N, D, P, n] = prepare(op, x_in, scores_in, num_prefix, fuse_s);
  const at::Tensor keep = keep_in.contiguous(), cu = cu_in.contiguous();
  const int64_t extra = P + (fuse != Fuse::kNone);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(1) == D && grad_in.scalar_type() == x.scalar_type() &&
                  grad_in.device() == x.device(),
              op, ": grad must be ", x.scalar_type(), " [total, D=", D, "], got ", grad_in.scalar_type(), " ",
              grad_in.sizes());
  const std::vector<int64_t> offsets = check_varlen(op, keep, cu, B, n, extra, grad_in.size(0));
  TORCH_CHECK(indices_in.dim() == 1 && indices_in.size(0) == offsets[B] && indices_in.scalar_type() == at::kLong,
              op, ": indices must be int64 [keep.sum()=", offsets[B], "], got ", indices_in.scalar_type(), " ",
              indices_in.sizes());
  const at::Tensor grad = grad_in.contiguous(), indices = indices_in.contiguous();
  check_indices(op, indices.data_ptr<int64_t>(), offsets[B], P, N);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gs = at::empty_like(scores);
  Rows r;
  r.keep = keep.data_ptr<int64_t>();
  r.cu = cu.data_ptr<int32_t>();
  r.offsets = offsets.data();
  select_backward(grad, x, scores, indices, P, fuse, r, gx, gs);
  return {gx, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(bus_kernels_C, CPU, m) {
  m.impl("select_tokens", &select_tokens_cpu);
  m.impl("select_tokens_backward", &select_tokens_backward_cpu);
  m.impl("select_tokens_varlen", &select_tokens_varlen_cpu);
  m.impl("select_tokens_varlen_backward", &select_tokens_varlen_backward_cpu);
}

}  // namespace bus_kernels
