// select_tokens / select_tokens_varlen on CUDA, forward and backward. Free of torch headers (the
// ATen wrappers are in select_cuda.cpp); launchers are declared in launchers.h.
//
// Forward (2 launches, 3 for order="score"):
//   1. select_rank_kernel, grid (B): one block ranks row b. Scores are read as fp32 and mapped
//      to order-preserving uint32 keys (-0.0 first becomes +0.0, so the two tie). A 4-pass radix
//      select (8 bits a pass, shared-memory histogram with integer atomics) finds T, the key of
//      the kb-th largest score, and need = kb - #{key > T}. One pass in index order then keeps
//      every key > T and the first `need` keys == T (lower index first): a block-wide exclusive
//      scan of the packed pair (#greater, #equal) gives each column its slot among the kept
//      columns, gt_before + min(eq_before, need). It writes slot[b, j] (kept: output slot in
//      index order; dropped: -1), coef[b, j] (the score of a dropped column, 0 for a kept one),
//      dropped_sum[b] (the sum of the dropped scores, a fixed-order block reduction) and the
//      kept positions in index order. No limit on the row length: the scores are re-read from
//      global memory (L1/L2) in each of the 5 passes; nothing of size n lives in shared memory.
//   2. select_score_order_kernel (order="score" only), grid (B, k/256): the rank of kept column
//      c among the kept ones by (score desc, index asc) is the number of kept columns before it
//      in that total order; each thread counts them over shared-memory tiles (O(k^2) compares per
//      row, spread over k/256 blocks), then writes indices[b, rank] and slot[b, c] = rank.
//   3. select_gather_kernel, grid (B, D tiles): streams row b's tokens once: prefix tokens and
//      kept tokens are copied to their output rows (16-byte vectors when D * elem_size and the
//      pointers allow, else element by element), dropped tokens are accumulated in fp32
//      registers weighted by coef; the per-thread partials are summed in a fixed order through
//      shared memory and written as the fused row (divided by dropped_sum for "mean", zero when
//      that is 0).
// Backward (3 launches):
//   1. select_bwd_prep_kernel, grid (B): slot[b, j] from `indices` (kept: its output slot, else
//      -1), S = the dropped-score sum, coef[b, j] = s_j ("sum") or s_j / S ("mean", 0 if S == 0)
//      for dropped columns, 0 for kept ones.
//   2. select_bwd_kernel, grid (B, row tiles), one warp per token row: grad_x rows (prefix and kept
//      rows copy their output row's gradient, dropped rows get coef * g_fused, 0 without a fuse)
//      and dot[b, j] = <g_fused, x_j> for dropped rows (fp32, warp butterfly reduction).
//   3. select_bwd_scores_kernel, grid (B): grad_scores = dot ("sum") or (dot - <g, fused>) / S
//      ("mean", with <g, fused> = sum_i coef_i dot_i, 0 if S == 0) for dropped columns, 0 for kept.
// Every reduction has a fixed order (no float atomics): results are bitwise reproducible.
#include <cub/block/block_scan.cuh>

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "device_utils.cuh"
#include "launchers.h"

namespace bus_kernels {
namespace {

using dev::Pack;

constexpr int kRankThreads = 256;
constexpr int kOrderThreads = 256;
constexpr int kGatherThreads = 256;
constexpr int kBwdWarps = 8;
constexpr int kBwdThreads = 32 * kBwdWarps;
constexpr int64_t kMaxGridY = 65535;

// Order-preserving uint32 image of an fp32 score: a > b as floats <=> key(a) > key(b); -0.0 and
// +0.0 get the same key. Every NaN, whatever its sign and payload, gets the largest key (above
// +inf), so NaNs rank first and tie among themselves (lower index first), as torch.sort and the
// reference rank them. Without this, a NaN with the sign bit set (-NaN, e.g. from 0 * -inf)
// would rank last. Only reachable when value checks are off (direct torch.ops calls, or
// bus_kernels.set_value_checks(False)).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;
  if ((u & 0x7fffffffu) == 0u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Where row b's outputs go (see SelectShape); ok = false if they would leave the buffers.
struct RowLayout {
  int64_t base;      // first output row (prefix tokens, then kept tokens, then the fused token)
  int64_t kb;        // kept tokens
  int64_t idx_base;  // first entry in indices
  bool ok;
};

__device__ __forceinline__ RowLayout row_layout(const SelectShape& s, int64_t b, int64_t n) {
  const int64_t extra = s.num_prefix + (s.has_fuse ? 1 : 0);
  RowLayout r;
  if (s.keep != nullptr) {
    r.kb = s.keep[b];
    r.base = s.cu_seqlens[b];
    r.idx_base = r.base - b * extra;
  } else {
    r.kb = s.k;
    r.base = b * (extra + s.k);
    r.idx_base = b * s.k;
  }
  r.ok = r.kb >= 0 && r.kb <= n && r.base >= 0 && r.base + extra + r.kb <= s.out_rows && r.idx_base >= 0 &&
         r.idx_base + r.kb <= s.num_kept;
  return r;
}

// ---------------------------------------------------------------------------------- forward

template <typename S>
__global__ void __launch_bounds__(kRankThreads)
    select_rank_kernel(SelectShape s, const typename S::raw* __restrict__ scores, int32_t* __restrict__ slot,
                       float* __restrict__ coef, float* __restrict__ dropped_sum,
                       int64_t* __restrict__ kept_out) {
  using Scan = cub::BlockScan<unsigned long long, kRankThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int hist[256];
  __shared__ float red[kRankThreads];
  __shared__ uint32_t sh_digit;
  __shared__ int64_t sh_rem;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t n = s.N - s.num_prefix;
  const typename S::raw* srow = scores + b * n;
  int32_t* slot_row = slot + b * n;
  float* coef_row = coef + b * n;
  const RowLayout r = row_layout(s, b, n);
  if (!r.ok) {  // uniform over the block; unreachable through the validated wrappers
    for (int64_t j = tid; j < n; j += kRankThreads) {
      slot_row[j] = -1;
      coef_row[j] = 0.0f;
    }
    if (tid == 0) dropped_sum[b] = 0.0f;
    return;
  }

  // Radix select of T, the kb-th largest key, 8 bits at a time from the top. `rem` is the rank
  // (1-based) of T among the keys that match `prefix` on the bits decided so far; at the end it
  // is the number of keys == T to keep. kb == 0 keeps nothing: T = max key, need = 0.
  uint32_t prefix = 0xffffffffu;
  int64_t rem = 0;
  if (r.kb > 0) {
    prefix = 0u;
    uint32_t mask = 0u;
    rem = r.kb;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kRankThreads) hist[i] = 0;
      __syncthreads();
      for (int64_t j = tid; j < n; j += kRankThreads) {
        const uint32_t key = order_key(S::to(srow[j]));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
      }
      __syncthreads();
      if (tid == 0) {
        // Highest digit whose cumulative count from the top reaches rem (rem <= the candidates).
        int64_t above = 0;
        int d = 255;
        for (; d > 0; --d) {
          if (above + hist[d] >= rem) break;
          above += hist[d];
        }
        sh_digit = static_cast<uint32_t>(d);
        sh_rem = rem - above;
      }
      __syncthreads();
      prefix |= sh_digit << shift;
      mask |= 0xffu << shift;
      rem = sh_rem;
      // The next pass clears hist only after its own barrier, which thread 0 passes after
      // every thread has read sh_digit / sh_rem here, so no extra barrier is needed.
    }
  }
  const uint32_t T = prefix;
  const int64_t need = rem;

  // Keep key > T, and the first `need` keys == T in index order. Chunks of kRankThreads
  // columns; carry holds (#greater << 32 | #equal) of the columns before the chunk (n < 2^31, so
  // neither half overflows).
  unsigned long long carry = 0ull;
  float dsum = 0.0f;
  for (int64_t j0 = 0; j0 < n; j0 += kRankThreads) {
    const int64_t j = j0 + tid;
    const bool valid = j < n;
    const float sc = valid ? S::to(srow[j]) : 0.0f;
    const uint32_t key = order_key(sc);
    const bool gt = valid && key > T;
    const bool eq = valid && key == T;
    const unsigned long long v = (static_cast<unsigned long long>(gt) << 32) | static_cast<unsigned long long>(eq);
    unsigned long long excl, chunk_total;
    Scan(scan_tmp).ExclusiveSum(v, excl, chunk_total);
    excl += carry;
    carry += chunk_total;
    const int64_t gt_before = static_cast<int64_t>(excl >> 32);
    const int64_t eq_before = static_cast<int64_t>(excl & 0xffffffffull);
    const bool kept = gt || (eq && eq_before < need);
    if (valid) {
      const int64_t pos = gt_before + (eq_before < need ? eq_before : need);  // kept columns before j
      if (kept && pos < r.kb) {
        slot_row[j] = static_cast<int32_t>(pos);
        coef_row[j] = 0.0f;
        kept_out[r.idx_base + pos] = s.num_prefix + j;
      } else {
        slot_row[j] = -1;
        coef_row[j] = sc;
        dsum += sc;
      }
    }
    __syncthreads();  // scan_tmp is reused by the next chunk
  }
  const float total = dev::block_sum<kRankThreads>(dsum, red);
  if (tid == 0) dropped_sum[b] = total;
}

// order="score": indices[b, rank] and slot[b, c] by (score desc, index asc) among the kept
// columns kept_in[b, :] (positions P + c in index order, from the rank kernel).
template <typename S>
__global__ void __launch_bounds__(kOrderThreads)
    select_score_order_kernel(SelectShape s, const typename S::raw* __restrict__ scores,
                              const int64_t* __restrict__ kept_in, int64_t* __restrict__ indices,
                              int32_t* __restrict__ slot) {
  __shared__ uint32_t keys_s[kOrderThreads];
  __shared__ int64_t cols_s[kOrderThreads];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t n = s.N - s.num_prefix;
  const int64_t k = s.k;
  const typename S::raw* srow = scores + b * n;
  const int64_t* kin = kept_in + b * k;

  for (int64_t i0 = int64_t(blockIdx.y) * kOrderThreads; i0 < k; i0 += int64_t(gridDim.y) * kOrderThreads) {
    const int64_t i = i0 + tid;
    int64_t col = -1;
    uint32_t key = 0u;
    if (i < k) {
      col = kin[i] - s.num_prefix;
      if (col >= 0 && col < n) key = order_key(S::to(srow[col]));
      else col = -1;
    }
    int64_t rank = 0;
    for (int64_t e0 = 0; e0 < k; e0 += kOrderThreads) {
      const int64_t e = e0 + tid;
      if (e < k) {
        int64_t c = kin[e] - s.num_prefix;
        if (c >= 0 && c < n) {
          keys_s[tid] = order_key(S::to(srow[c]));
        } else {  // never produced by the rank kernel; sorts last
          c = n;
          keys_s[tid] = 0u;
        }
        cols_s[tid] = c;
      }
      __syncthreads();
      if (col >= 0) {
        const int lim = static_cast<int>(k - e0 < kOrderThreads ? k - e0 : kOrderThreads);
        for (int q = 0; q < lim; ++q) {
          const uint32_t kq = keys_s[q];
          rank += (kq > key || (kq == key && cols_s[q] < col)) ? 1 : 0;
        }
      }
      __syncthreads();
    }
    if (col >= 0 && rank < k) {
      indices[b * k + rank] = s.num_prefix + col;
      slot[b * n + col] = static_cast<int32_t>(rank);
    }
  }
}

// Copies prefix and kept tokens to their output rows and writes the fused token. Thread
// (tx, ty): vector unit u = tile * tx_dim + tx of the row, token rows ty, ty + ty_dim, ...
template <typename E, int VEC>
__global__ void __launch_bounds__(kGatherThreads)
    select_gather_kernel(SelectShape s, const typename E::raw* __restrict__ x, typename E::raw* __restrict__ out,
                         const int32_t* __restrict__ slot, const float* __restrict__ coef,
                         const float* __restrict__ dropped_sum, int tx_dim) {
  using V = Pack<typename E::raw, VEC>;
  __shared__ float red[kGatherThreads * VEC];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t N = s.N, P = s.num_prefix, n = N - P;
  const RowLayout r = row_layout(s, b, n);
  if (!r.ok) return;  // uniform over the block
  const int tx = tid % tx_dim, ty = tid / tx_dim, ty_dim = kGatherThreads / tx_dim;
  const int64_t units = s.D / VEC;
  const int64_t tiles = (units + tx_dim - 1) / tx_dim;
  const V* xb = reinterpret_cast<const V*>(x) + b * N * units;
  V* o = reinterpret_cast<V*>(out);
  const int32_t* slot_row = slot + b * n;
  const float* coef_row = coef + b * n;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t u = tile * tx_dim + tx;
    const bool active = u < units;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    for (int64_t t = ty; t < N; t += ty_dim) {
      int64_t dst = -1;
      bool fuse_row = false;
      float c = 0.0f;
      if (t < P) {
        dst = r.base + t;
      } else {
        const int64_t j = t - P;
        const int32_t sl = slot_row[j];
        if (sl >= 0) {
          if (sl < r.kb) dst = r.base + P + sl;
        } else if (s.has_fuse) {
          fuse_row = true;
          c = coef_row[j];
        }
      }
      if (!active) continue;
      if (dst >= 0) {
        o[dst * units + u] = xb[t * units + u];
      } else if (fuse_row) {
        const V v = xb[t * units + u];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = fmaf(c, E::to(v.v[i]), acc[i]);
      }
    }
    if (s.has_fuse) {  // uniform over the block
#pragma unroll
      for (int i = 0; i < VEC; ++i) red[(ty * tx_dim + tx) * VEC + i] = acc[i];
      __syncthreads();
      if (ty == 0 && active) {
        const float denom = dropped_sum[b];
        V f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float tot = 0.0f;
          for (int y = 0; y < ty_dim; ++y) tot += red[(y * tx_dim + tx) * VEC + i];
          float val = tot;
          if (s.fuse_mean) val = (denom != 0.0f) ? __fdiv_rn(tot, denom) : 0.0f;
          f.v[i] = E::from(val);
        }
        o[(r.base + P + r.kb) * units + u] = f;
      }
      __syncthreads();  // red is reused by the next tile
    }
  }
}

// --------------------------------------------------------------------------------- backward

template <typename S>
__global__ void __launch_bounds__(kRankThreads)
    select_bwd_prep_kernel(SelectShape s, const typename S::raw* __restrict__ scores,
                           const int64_t* __restrict__ indices, int32_t* slot, float* __restrict__ coef,
                           float* __restrict__ dropped_sum) {
  // slot is written and then read back by this block: no __restrict__ (no read-only cache path).
  __shared__ float red[kRankThreads];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t n = s.N - s.num_prefix;
  const typename S::raw* srow = scores + b * n;
  int32_t* slot_row = slot + b * n;
  float* coef_row = coef + b * n;
  const RowLayout r = row_layout(s, b, n);

  for (int64_t j = tid; j < n; j += kRankThreads) slot_row[j] = -1;
  __syncthreads();  // orders this block's global writes before the scatter below
  if (r.ok) {
    for (int64_t i = tid; i < r.kb; i += kRankThreads) {
      const int64_t c = indices[r.idx_base + i] - s.num_prefix;
      if (c >= 0 && c < n) slot_row[c] = static_cast<int32_t>(i);
    }
  }
  __syncthreads();

  float part = 0.0f;
  for (int64_t j = tid; j < n; j += kRankThreads) {
    if (slot_row[j] < 0) part += S::to(srow[j]);
  }
  const float total = dev::block_sum<kRankThreads>(part, red);
  for (int64_t j = tid; j < n; j += kRankThreads) {
    float c = 0.0f;
    if (slot_row[j] < 0) {
      const float sc = S::to(srow[j]);
      // Divide by S rather than multiply by 1/S (1/S overflows for tiny S).
      c = s.fuse_mean ? (total != 0.0f ? __fdiv_rn(sc, total) : 0.0f) : sc;
    }
    coef_row[j] = c;
  }
  if (tid == 0) dropped_sum[b] = total;
}

template <typename E, int VEC>
__global__ void __launch_bounds__(kBwdThreads)
    select_bwd_kernel(SelectShape s, const typename E::raw* __restrict__ g, const typename E::raw* __restrict__ x,
                      typename E::raw* __restrict__ gx, const int32_t* __restrict__ slot,
                      const float* __restrict__ coef, float* __restrict__ dot) {
  using V = Pack<typename E::raw, VEC>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x;
  const int64_t N = s.N, P = s.num_prefix, n = N - P;
  const RowLayout r = row_layout(s, b, n);
  if (!r.ok) return;  // uniform over the block; unreachable through the validated wrappers
  const int64_t units = s.D / VEC;
  const V* gv = reinterpret_cast<const V*>(g);
  const int64_t fused_row = r.base + P + r.kb;  // a real row only when has_fuse

  for (int64_t t = int64_t(blockIdx.y) * kBwdWarps + warp; t < N; t += int64_t(gridDim.y) * kBwdWarps) {
    int64_t src = -1;  // output row whose gradient this token row receives
    float c = 0.0f;
    if (t < P) {
      src = r.base + t;
    } else {
      const int32_t sl = slot[b * n + (t - P)];
      if (sl >= 0 && sl < r.kb) src = r.base + P + sl;
      else c = coef[b * n + (t - P)];
    }
    const V* xr = reinterpret_cast<const V*>(x) + (b * N + t) * units;
    V* gr = reinterpret_cast<V*>(gx) + (b * N + t) * units;
    float d_acc = 0.0f;
    for (int64_t u = lane; u < units; u += 32) {
      V outv;
      if (src >= 0) {
        outv = gv[src * units + u];
      } else if (s.has_fuse) {
        const V gf = gv[fused_row * units + u];
        const V xv = xr[u];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float gfi = E::to(gf.v[i]);
          outv.v[i] = E::from(c * gfi);
          d_acc = fmaf(gfi, E::to(xv.v[i]), d_acc);
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) outv.v[i] = E::from(0.0f);
      }
      gr[u] = outv;
    }
    if (t >= P) {  // uniform over the warp
      const float tot = dev::warp_sum(d_acc);
      if (lane == 0) dot[b * n + (t - P)] = (src < 0 && s.has_fuse) ? tot : 0.0f;
    }
  }
}

template <typename S>
__global__ void __launch_bounds__(kRankThreads)
    select_bwd_scores_kernel(SelectShape s, typename S::raw* __restrict__ grad_scores,
                             const float* __restrict__ dot, const int32_t* __restrict__ slot,
                             const float* __restrict__ coef, const float* __restrict__ dropped_sum) {
  __shared__ float red[kRankThreads];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t n = s.N - s.num_prefix;
  const int64_t row = b * n;
  // <g, fused> = sum_i coef_i <g, x_i> (coef is 0 for kept columns).
  float part = 0.0f;
  if (s.fuse_mean) {
    for (int64_t j = tid; j < n; j += kRankThreads) part = fmaf(coef[row + j], dot[row + j], part);
  }
  const float g_fused = dev::block_sum<kRankThreads>(part, red);
  const float denom = dropped_sum[b];
  for (int64_t j = tid; j < n; j += kRankThreads) {
    float gs = 0.0f;
    if (s.has_fuse && slot[row + j] < 0) {
      const float d = dot[row + j];
      gs = s.fuse_mean ? (denom != 0.0f ? __fdiv_rn(d - g_fused, denom) : 0.0f) : d;
    }
    grad_scores[row + j] = S::from(gs);
  }
}

// --------------------------------------------------------------------------------- launchers

// Widest vector (16 bytes) when D * elem_size and every pointer allow it, else one element.
bool vectorizable(int64_t D, int64_t elem, std::initializer_list<const void*> ptrs) {
  if ((D * elem) % 16 != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Threads along D: the smallest power of two >= the vector units of a row, at most a warp.
int gather_tx(int64_t units) {
  int tx = 1;
  while (tx < 32 && tx < units) tx <<= 1;
  return tx;
}

template <typename E, int VEC>
void launch_gather(const SelectShape& s, const void* x, void* tokens, const SelectScratch& w, cudaStream_t stream) {
  const int64_t units = s.D / VEC;
  const int tx = gather_tx(units);
  const int64_t tiles = (units + tx - 1) / tx;
  const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY));
  select_gather_kernel<E, VEC><<<grid, kGatherThreads, 0, stream>>>(
      s, static_cast<const typename E::raw*>(x), static_cast<typename E::raw*>(tokens), w.slot, w.coef,
      w.dropped_sum, tx);
}

template <typename E, int VEC>
void launch_bwd_rows(const SelectShape& s, const void* grad, const void* x, void* grad_x, const SelectScratch& w,
                     cudaStream_t stream) {
  const int64_t tiles = (s.N + kBwdWarps - 1) / kBwdWarps;
  const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY));
  select_bwd_kernel<E, VEC><<<grid, kBwdThreads, 0, stream>>>(
      s, static_cast<const typename E::raw*>(grad), static_cast<const typename E::raw*>(x),
      static_cast<typename E::raw*>(grad_x), w.slot, w.coef, w.dot);
}

bool grid_ok(const SelectShape& s) { return s.B <= 0x7fffffff && s.N - s.num_prefix <= 0x7fffffff; }

}  // namespace

cudaError_t launch_select_forward(const SelectShape& s, const void* x, const void* scores, void* tokens,
                                  int64_t* indices, bool score_order, const SelectScratch& w,
                                  cudaStream_t stream) {
  if (s.B == 0) return cudaSuccess;
  if (!grid_ok(s) || (score_order && s.keep != nullptr)) return cudaErrorInvalidValue;
  int64_t* kept_out = score_order ? w.kept_tmp : indices;
  const unsigned B = static_cast<unsigned>(s.B);
  bool ok = dev::dispatch_dtype(s.scores_dtype, [&](auto tag) {
    using S = decltype(tag);
    const auto* sc = static_cast<const typename S::raw*>(scores);
    select_rank_kernel<S><<<B, kRankThreads, 0, stream>>>(s, sc, w.slot, w.coef, w.dropped_sum, kept_out);
    if (score_order && s.k > 0 && cudaPeekAtLastError() == cudaSuccess) {
      const int64_t tiles = (s.k + kOrderThreads - 1) / kOrderThreads;
      const dim3 grid(B, static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY));
      select_score_order_kernel<S><<<grid, kOrderThreads, 0, stream>>>(s, sc, w.kept_tmp, indices, w.slot);
    }
  });
  if (!ok) return cudaErrorInvalidValue;
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || s.D == 0) return err;
  ok = dev::dispatch_dtype(s.x_dtype, [&](auto tag) {
    using E = decltype(tag);
    constexpr int kVec = 16 / sizeof(typename E::raw);
    if (vectorizable(s.D, sizeof(typename E::raw), {x, tokens})) launch_gather<E, kVec>(s, x, tokens, w, stream);
    else launch_gather<E, 1>(s, x, tokens, w, stream);
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t launch_select_backward(const SelectShape& s, const void* grad, const void* x, const void* scores,
                                   const int64_t* indices, void* grad_x, void* grad_scores,
                                   const SelectScratch& w, cudaStream_t stream) {
  if (s.B == 0) return cudaSuccess;
  if (!grid_ok(s)) return cudaErrorInvalidValue;
  const unsigned B = static_cast<unsigned>(s.B);
  bool ok = dev::dispatch_dtype(s.scores_dtype, [&](auto tag) {
    using S = decltype(tag);
    select_bwd_prep_kernel<S><<<B, kRankThreads, 0, stream>>>(s, static_cast<const typename S::raw*>(scores),
                                                                indices, w.slot, w.coef, w.dropped_sum);
  });
  if (!ok) return cudaErrorInvalidValue;
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (s.N > 0) {
    ok = dev::dispatch_dtype(s.x_dtype, [&](auto tag) {
      using E = decltype(tag);
      constexpr int kVec = 16 / sizeof(typename E::raw);
      if (vectorizable(s.D, sizeof(typename E::raw), {grad, x, grad_x})) {
        launch_bwd_rows<E, kVec>(s, grad, x, grad_x, w, stream);
      } else {
        launch_bwd_rows<E, 1>(s, grad, x, grad_x, w, stream);
      }
    });
    if (!ok) return cudaErrorInvalidValue;
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  ok = dev::dispatch_dtype(s.scores_dtype, [&](auto tag) {
    using S = decltype(tag);
    select_bwd_scores_kernel<S><<<B, kRankThreads, 0, stream>>>(
        s, static_cast<typename S::raw*>(grad_scores), w.dot, w.slot, w.coef, w.dropped_sum);
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace bus_kernels
