// relevance_scores on CUDA, forward and backward. Free of torch headers (the ATen wrapper is in
// relevance_cuda.cpp); launchers are declared in launchers.h.
//
//   s[b, n] = sum_{h,t} w[b,t] P[b,h,t,n],  P = softmax_n(scale * <q[b,h,t], k[b,h,n]>)
//
// Every kernel is built on one tile: a block of 256 threads computes the 8 x 32 logits of
// queries t0..t0+7 (one warp each) against keys n0..n0+31 (one lane each), staging q and k in
// shared memory 64 dims at a time (fp32, converted on load). Each logit is one fp32 fma chain
// over d = 0, 1, ..., d-1, then one rounded multiply by scale, so every kernel recomputes exactly
// the same logits (fp32 IEEE: no TF32, no tensor cores). The [B, H, T, N] matrix never exists.
//
// Forward (2 launches):
//   relevance_lse_kernel     block = (b, h, 8 queries): online max / sum over the key tiles,
//                            lse[b, h, t] (natural log) is stored for the backward.
//   relevance_scores_kernel  block = (b, 32 keys): loops over every head and query tile,
//                            accumulating w[t] * exp(logit - lse) per thread, then sums the
//                            8 warps' partials in a fixed order: scores[b, n], no atomics.
// Backward (3 launches), dl[t, n] = P[t, n] (g[n] - r[t]) w[t] scale:
//   relevance_row_kernel     block = (b, h, 8 queries): r[b, h, t] = sum_n g[n] P[t, n].
//   relevance_dq_kernel      block = (b, h, 8 queries, 64 dims): dq[t, :] = sum_n dl[t, n] k[n, :].
//   relevance_dk_kernel      block = (b, h, 32 keys, 64 dims): dk[n, :] = sum_t dl[t, n] q[t, :].
// Each output element is accumulated by one thread in a fixed order: bitwise reproducible.
#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"
#include "launchers.h"

namespace bus_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kTQ = 8;   // queries per tile (one warp each)
constexpr int kTN = 32;  // keys per tile (one lane each)
constexpr int kDC = 64;  // dims staged in shared memory at a time; also the dq / dk column tile
static_assert(kTQ * 32 == kThreads && kTN == 32 && kTN % kTQ == 0 && kDC == 64, "tile shape");
constexpr int64_t kMaxGridX = 0x7fffffff;
// Two resident blocks per SM at least (<= 128 registers a thread): without a minimum, ptxas
// aims at 64 registers and spills a few bytes in the backward kernels.
constexpr int kMinBlocks = 2;

struct TileSmem {
  float q[kTQ][kDC];
  float k[kTN][kDC + 1];  // +1: lane nn reads row nn, conflict-free
};

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Stages rows row0 .. row0 + ROWS - 1, columns col0 .. col0 + kDC - 1 of the [rows, d] matrix
// src into dst (row stride LD floats, fp32), zeros past the matrix. Every thread takes part.
template <typename E, int ROWS, int LD>
__device__ __forceinline__ void stage(float* dst, const typename E::raw* __restrict__ src, int64_t row0,
                                      int64_t rows, int64_t col0, int64_t d) {
  for (int e = threadIdx.x; e < ROWS * kDC; e += kThreads) {
    const int rr = e / kDC, c = e % kDC;
    const int64_t row = row0 + rr, col = col0 + c;
    dst[rr * LD + c] = (row < rows && col < d) ? E::to(src[row * d + col]) : 0.0f;
  }
}

// Logit (before scale) of query t0 + warp against key n0 + lane; 0 for rows past T or N. Every
// thread of the block must call it (it synchronises).
template <typename E>
__device__ __forceinline__ float tile_dot(const typename E::raw* __restrict__ qbh, const typename E::raw* __restrict__ kbh,
                                          int64_t T, int64_t N, int64_t d, int64_t t0, int64_t n0, TileSmem& sm) {
  const int tid = threadIdx.x, tq = tid >> 5, nn = tid & 31;
  float acc = 0.0f;
  for (int64_t d0 = 0; d0 < d; d0 += kDC) {
    stage<E, kTQ, kDC>(&sm.q[0][0], qbh, t0, T, d0, d);
    stage<E, kTN, kDC + 1>(&sm.k[0][0], kbh, n0, N, d0, d);
    __syncthreads();
    const int lim = (d - d0 < kDC) ? static_cast<int>(d - d0) : kDC;
#pragma unroll 4
    for (int c = 0; c < lim; ++c) acc = fmaf(sm.q[tq][c], sm.k[nn][c], acc);
    __syncthreads();
  }
  return acc;
}

template <typename E>
__device__ __forceinline__ float logit(const RelevanceShape& s, const typename E::raw* qbh, const typename E::raw* kbh,
                                       int64_t t0, int64_t n0, TileSmem& sm) {
  // __fmul_rn: never contracted into a neighbouring add, so all kernels agree bit for bit.
  return __fmul_rn(tile_dot<E>(qbh, kbh, s.T, s.N, s.d, t0, n0, sm), s.scale);
}

// ---------------------------------------------------------------------------------- forward

template <typename E>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    relevance_lse_kernel(RelevanceShape s, const typename E::raw* __restrict__ q, const typename E::raw* __restrict__ k,
                         float* __restrict__ lse) {
  __shared__ TileSmem sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Block = (bh, query tile); 32-bit index math (the launcher keeps the grid below 2^31).
  const uint32_t t_tiles = static_cast<uint32_t>(cdiv(s.T, kTQ));
  {
    const int64_t bh = blockIdx.x / t_tiles, t0 = int64_t(blockIdx.x % t_tiles) * kTQ;
    const typename E::raw* qbh = q + bh * s.T * s.d;
    const typename E::raw* kbh = k + bh * s.N * s.d;
    float m = dev::neg_inf(), l = 0.0f;
    for (int64_t n0 = 0; n0 < s.N; n0 += kTN) {
      float x = logit<E>(s, qbh, kbh, t0, n0, sm);
      const bool valid = n0 + lane < s.N;
      if (!valid) x = dev::neg_inf();
      const float m_new = fmaxf(m, dev::warp_max(x));  // finite: lane 0's key is valid
      const float e = valid ? expf(x - m_new) : 0.0f;
      l = l * expf(m - m_new) + dev::warp_sum(e);
      m = m_new;
    }
    const int64_t t = t0 + warp;
    if (lane == 0 && t < s.T) lse[bh * s.T + t] = m + logf(l);
  }
}

template <typename E>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    relevance_scores_kernel(RelevanceShape s, const typename E::raw* __restrict__ q,
                            const typename E::raw* __restrict__ k, const float* __restrict__ w,
                            const float* __restrict__ lse, float* __restrict__ scores) {
  __shared__ TileSmem sm;
  __shared__ float red[kTQ][kTN];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t n_tiles = static_cast<uint32_t>(cdiv(s.N, kTN));
  {
    const int64_t b = blockIdx.x / n_tiles, n0 = int64_t(blockIdx.x % n_tiles) * kTN;
    const int64_t n = n0 + lane;
    float acc = 0.0f;
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t bh = b * s.H + h;
      const typename E::raw* qbh = q + bh * s.T * s.d;
      const typename E::raw* kbh = k + bh * s.N * s.d;
      for (int64_t t0 = 0; t0 < s.T; t0 += kTQ) {
        const float x = logit<E>(s, qbh, kbh, t0, n0, sm);
        const int64_t t = t0 + warp;
        if (t < s.T && n < s.N) acc = fmaf(w[b * s.T + t], expf(x - lse[bh * s.T + t]), acc);
      }
    }
    red[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && n < s.N) {
      float sum = 0.0f;
      for (int i = 0; i < kTQ; ++i) sum += red[i][lane];
      scores[b * s.N + n] = sum;
    }
  }
}

// --------------------------------------------------------------------------------- backward

template <typename E>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    relevance_row_kernel(RelevanceShape s, const typename E::raw* __restrict__ q, const typename E::raw* __restrict__ k,
                         const float* __restrict__ lse, const float* __restrict__ g, float* __restrict__ row) {
  __shared__ TileSmem sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t t_tiles = static_cast<uint32_t>(cdiv(s.T, kTQ));
  {
    const uint32_t bh32 = blockIdx.x / t_tiles;
    const int64_t bh = bh32, t0 = int64_t(blockIdx.x % t_tiles) * kTQ, b = bh32 / static_cast<uint32_t>(s.H);
    const int64_t t = t0 + warp;
    const bool valid_t = t < s.T;
    const float lse_t = valid_t ? lse[bh * s.T + t] : 0.0f;
    const typename E::raw* qbh = q + bh * s.T * s.d;
    const typename E::raw* kbh = k + bh * s.N * s.d;
    float acc = 0.0f;
    for (int64_t n0 = 0; n0 < s.N; n0 += kTN) {
      const float x = logit<E>(s, qbh, kbh, t0, n0, sm);
      const int64_t n = n0 + lane;
      if (valid_t && n < s.N) acc = fmaf(g[b * s.N + n], expf(x - lse_t), acc);
    }
    const float r = dev::warp_sum(acc);
    if (lane == 0 && valid_t) row[bh * s.T + t] = r;
  }
}

// Block of a dq / dk grid (b, h, tile of `rows` in steps of `tile`, 64 columns), blockIdx.x =
// (bh * tiles + tile) * d_tiles + column tile; 32-bit index math (the grid is below 2^31).
struct GradBlock {
  int64_t dc0, tile0, bh, b;
};

__device__ __forceinline__ GradBlock grad_block(const RelevanceShape& s, int64_t rows, int tile) {
  const uint32_t tiles = static_cast<uint32_t>(cdiv(rows, tile)), d_tiles = static_cast<uint32_t>(cdiv(s.d, kDC));
  const uint32_t rest = blockIdx.x / d_tiles, bh32 = rest / tiles;
  return GradBlock{int64_t(blockIdx.x % d_tiles) * kDC, int64_t(rest % tiles) * tile, bh32,
                   bh32 / static_cast<uint32_t>(s.H)};
}

// dl[t, n] = P (g[n] - r[t]) w[t] scale, in the reference's order; 0 outside the tile's range.
__device__ __forceinline__ float dlogit(float x, float lse_t, float g_n, float r_t, float w_t, float scale) {
  return expf(x - lse_t) * (g_n - r_t) * w_t * scale;
}

template <typename E>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    relevance_dq_kernel(RelevanceShape s, const typename E::raw* __restrict__ q, const typename E::raw* __restrict__ k,
                        const float* __restrict__ w, const float* __restrict__ lse, const float* __restrict__ g,
                        const float* __restrict__ row, typename E::raw* __restrict__ dq) {
  __shared__ TileSmem sm;
  __shared__ float dl_s[kTQ][kTN];
  __shared__ float kc[kTN][kDC];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  {
    const GradBlock gb = grad_block(s, s.T, kTQ);
    const int64_t dc0 = gb.dc0, t0 = gb.tile0, bh = gb.bh, b = gb.b;
    const int64_t t = t0 + warp;
    const bool valid_t = t < s.T;
    const float lse_t = valid_t ? lse[bh * s.T + t] : 0.0f;
    const float r_t = valid_t ? row[bh * s.T + t] : 0.0f;
    const float w_t = valid_t ? w[b * s.T + t] : 0.0f;
    const typename E::raw* qbh = q + bh * s.T * s.d;
    const typename E::raw* kbh = k + bh * s.N * s.d;
    float acc0 = 0.0f, acc1 = 0.0f;  // columns dc0 + lane, dc0 + lane + 32
    for (int64_t n0 = 0; n0 < s.N; n0 += kTN) {
      const float x = logit<E>(s, qbh, kbh, t0, n0, sm);
      const int64_t n = n0 + lane;
      dl_s[warp][lane] = (valid_t && n < s.N) ? dlogit(x, lse_t, g[b * s.N + n], r_t, w_t, s.scale) : 0.0f;
      stage<E, kTN, kDC>(&kc[0][0], kbh, n0, s.N, dc0, s.d);
      __syncthreads();
#pragma unroll 8
      for (int nn = 0; nn < kTN; ++nn) {
        const float dl = dl_s[warp][nn];
        acc0 = fmaf(dl, kc[nn][lane], acc0);
        acc1 = fmaf(dl, kc[nn][lane + 32], acc1);
      }
      __syncthreads();
    }
    if (valid_t) {
      typename E::raw* out = dq + (bh * s.T + t) * s.d;
      if (dc0 + lane < s.d) out[dc0 + lane] = E::from(acc0);
      if (dc0 + lane + 32 < s.d) out[dc0 + lane + 32] = E::from(acc1);
    }
  }
}

template <typename E>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    relevance_dk_kernel(RelevanceShape s, const typename E::raw* __restrict__ q, const typename E::raw* __restrict__ k,
                        const float* __restrict__ w, const float* __restrict__ lse, const float* __restrict__ g,
                        const float* __restrict__ row, typename E::raw* __restrict__ dk) {
  constexpr int kKeysPerWarp = kTN / kTQ;  // 4: keys n0 + warp + 8 i
  __shared__ TileSmem sm;
  __shared__ float dl_s[kTQ][kTN];
  __shared__ float qc[kTQ][kDC];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  {
    const GradBlock gb = grad_block(s, s.N, kTN);
    const int64_t dc0 = gb.dc0, n0 = gb.tile0, bh = gb.bh, b = gb.b;
    const typename E::raw* qbh = q + bh * s.T * s.d;
    const typename E::raw* kbh = k + bh * s.N * s.d;
    const int64_t n = n0 + lane;
    const float g_n = n < s.N ? g[b * s.N + n] : 0.0f;
    float acc[kKeysPerWarp][2];
#pragma unroll
    for (int i = 0; i < kKeysPerWarp; ++i) acc[i][0] = acc[i][1] = 0.0f;
    for (int64_t t0 = 0; t0 < s.T; t0 += kTQ) {
      const float x = logit<E>(s, qbh, kbh, t0, n0, sm);
      const int64_t t = t0 + warp;
      float dl = 0.0f;
      if (t < s.T && n < s.N) {
        dl = dlogit(x, lse[bh * s.T + t], g_n, row[bh * s.T + t], w[b * s.T + t], s.scale);
      }
      dl_s[warp][lane] = dl;
      stage<E, kTQ, kDC>(&qc[0][0], qbh, t0, s.T, dc0, s.d);
      __syncthreads();
#pragma unroll
      for (int tq = 0; tq < kTQ; ++tq) {
        const float q0 = qc[tq][lane], q1 = qc[tq][lane + 32];
#pragma unroll
        for (int i = 0; i < kKeysPerWarp; ++i) {
          const float dlv = dl_s[tq][warp + kTQ * i];
          acc[i][0] = fmaf(dlv, q0, acc[i][0]);
          acc[i][1] = fmaf(dlv, q1, acc[i][1]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kKeysPerWarp; ++i) {
      const int64_t nk = n0 + warp + kTQ * i;
      if (nk >= s.N) continue;
      typename E::raw* out = dk + (bh * s.N + nk) * s.d;
      if (dc0 + lane < s.d) out[dc0 + lane] = E::from(acc[i][0]);
      if (dc0 + lane + 32 < s.d) out[dc0 + lane + 32] = E::from(acc[i][1]);
    }
  }
}

// --------------------------------------------------------------------------------- launchers

unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(blocks); }

bool empty(const RelevanceShape& s) { return s.B == 0 || s.H == 0 || s.T == 0 || s.N == 0; }

}  // namespace

int64_t relevance_grid_blocks(const RelevanceShape& s) {
  const int64_t bh = s.B * s.H, d_tiles = cdiv(s.d, kDC);
  const int64_t a = bh * cdiv(s.T, kTQ) * (d_tiles > 1 ? d_tiles : 1);
  const int64_t c = bh * cdiv(s.N, kTN) * (d_tiles > 1 ? d_tiles : 1);
  return a > c ? a : c;
}

cudaError_t launch_relevance_forward(const RelevanceShape& s, const void* q, const void* k, const float* w,
                                     float* scores, float* lse, cudaStream_t stream) {
  if (empty(s)) return cudaSuccess;  // the wrapper fills the outputs of empty problems
  if (relevance_grid_blocks(s) > kMaxGridX) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaSuccess;
  const bool ok = dev::dispatch_dtype(s.dtype, [&](auto tag) {
    using E = decltype(tag);
    const auto* qq = static_cast<const typename E::raw*>(q);
    const auto* kk = static_cast<const typename E::raw*>(k);
    relevance_lse_kernel<E><<<grid_for(s.B * s.H * cdiv(s.T, kTQ)), kThreads, 0, stream>>>(s, qq, kk, lse);
    err = cudaGetLastError();
    if (err != cudaSuccess) return;
    relevance_scores_kernel<E><<<grid_for(s.B * cdiv(s.N, kTN)), kThreads, 0, stream>>>(s, qq, kk, w, lse, scores);
    err = cudaGetLastError();
  });
  return ok ? err : cudaErrorInvalidValue;
}

cudaError_t launch_relevance_backward(const RelevanceShape& s, const void* q, const void* k, const float* w,
                                      const float* lse, const float* grad, float* row, void* dq, void* dk,
                                      cudaStream_t stream) {
  if (empty(s)) return cudaSuccess;  // the wrapper zero-fills dq and dk of empty problems
  if (relevance_grid_blocks(s) > kMaxGridX) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaSuccess;
  const bool ok = dev::dispatch_dtype(s.dtype, [&](auto tag) {
    using E = decltype(tag);
    const auto* qq = static_cast<const typename E::raw*>(q);
    const auto* kk = static_cast<const typename E::raw*>(k);
    relevance_row_kernel<E><<<grid_for(s.B * s.H * cdiv(s.T, kTQ)), kThreads, 0, stream>>>(s, qq, kk, lse, grad, row);
    err = cudaGetLastError();
    if (err != cudaSuccess || s.d == 0) return;
    relevance_dq_kernel<E><<<grid_for(s.B * s.H * cdiv(s.T, kTQ) * cdiv(s.d, kDC)), kThreads, 0, stream>>>(
        s, qq, kk, w, lse, grad, row, static_cast<typename E::raw*>(dq));
    err = cudaGetLastError();
    if (err != cudaSuccess) return;
    relevance_dk_kernel<E><<<grid_for(s.B * s.H * cdiv(s.N, kTN) * cdiv(s.d, kDC)), kThreads, 0, stream>>>(
        s, qq, kk, w, lse, grad, row, static_cast<typename E::raw*>(dk));
    err = cudaGetLastError();
  });
  return ok ? err : cudaErrorInvalidValue;
}

}  // namespace bus_kernels
