// select_tokens / select_tokens_varlen on CUDA, forward and backward. Free of torch headers (the
// ATen wrappers are in select_cuda.cpp); launchers are declared in launchers.h.
//
// Forward (2 launches; +1 for order="score", +1 when a fused row is split over the grid):
//   1. select_rank_kernel, grid (B): one block ranks row b. Scores are read as fp32 and mapped
//      to order-preserving uint32 keys (-0.0 first becomes +0.0, so the two tie). A 4-pass radix
//      select (8 bits a pass, shared-memory histogram with integer atomics) finds T, the key of
//      the kb-th largest score, and need = kb - #{key > T}: in each pass thread i holds the count
//      of digit 255 - i and one block-wide inclusive scan gives every digit its count from the
//      top, so the thread whose range holds rank `rem` names the digit (no thread walks the 256
//      bins). One pass in index order then keeps every key > T and the first `need` keys == T
//      (lower index first): a block-wide exclusive scan of the packed pair (#greater, #equal)
//      gives each column its slot among the kept columns, gt_before + min(eq_before, need). It
//      writes slot[b, j] (kept: output slot in index order; dropped: -1), coef[b, j] (the score
//      of a dropped column, 0 for a kept one), dropped_sum[b] (the sum of the dropped scores, a
//      fixed-order block reduction) and the kept positions in index order. Rows of up to
//      kKeysPerThread * 256 scores hold them in registers (read once); longer rows re-read them
//      from global memory (L1/L2) in each of the 5 passes: no limit on the row length, nothing
//      of size n in shared memory.
//   2. select_score_order_kernel (order="score" only), grid (B, k/256): the rank of kept column
//      c among the kept ones by (score desc, index asc) is the number of kept columns before it
//      in that total order; each thread counts them over shared-memory tiles (O(k^2) compares per
//      row, spread over k/256 blocks), then writes indices[b, rank] and slot[b, c] = rank.
//   3. select_gather_kernel, grid (B, D tiles, row splits): streams row b's tokens once. A block
//      stages the destinations and coefficients of 256 token rows in shared memory, then each
//      thread issues the loads of kGatherUnroll rows before using them (several 16-byte loads in
//      flight): prefix and kept tokens are copied to their output rows (16-byte vectors when
//      D * elem_size and the pointers allow, else element by element), dropped tokens are
//      accumulated in fp32 registers weighted by coef. The per-thread partials are summed in a
//      fixed order through shared memory (laid out so that neighbouring threads hit neighbouring
//      banks) and written as the fused row (divided by dropped_sum for "mean", zero when that is
//      0). When B * D tiles would leave the GPU idle, the token rows are split over grid.z and
//      each split writes its partial sum to scratch; select_fuse_reduce_kernel then adds the
//      splits in a fixed order: deterministic, no atomics.
// Backward (3 launches):
//   1. select_bwd_prep_kernel, grid (B): slot[b, j] from `indices` (kept: its output slot, else
//      -1), S = the dropped-score sum, coef[b, j] = s_j ("sum") or s_j / S ("mean", 0 if S == 0)
//      for dropped columns, 0 for kept ones.
//   2. select_bwd_kernel, grid (B, row tiles), one warp per token row: grad_x rows (prefix and kept
//      rows copy their output row's gradient, dropped rows get coef * g_fused, 0 without a fuse)
//      and dot[b, j] = <g_fused, x_j> for dropped rows (fp32, warp butterfly reduction).
//   3. select_bwd_scores_kernel, grid (B): grad_scores = dot ("sum") or (dot - <g, fused>) / S
//      ("mean", with <g, fused> = sum_i coef_i dot_i, 0 if S == 0) for dropped columns, 0 for kept.
// Every reduction has a fixed order (no float atomics): results are bitwise reproducible from run
// to run for a given shape and pointer alignment (the fused row's summation order follows the
// vector width, chosen from the alignment, and the number of row splits, chosen from B and D).
#include <cub/block/block_scan.cuh>

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "device_utils.cuh"
#include "launchers.h"

namespace bus_kernels {
namespace {

using dev::Pack;

constexpr int kRankThreads = 256;  // also the 256 digits of a radix pass: one per thread
constexpr int kKeysPerThread = 8;  // rows of up to 2048 rankable scores keep them in registers
constexpr int kOrderThreads = 256;
constexpr int kGatherThreads = 256;
constexpr int kStageRows = 256;   // token rows whose destination a gather block stages at a time
constexpr int kGatherUnroll = 4;  // rows whose loads a gather thread issues before using them
constexpr int kFuseThreads = 256;
// Blocks the gather aims at (about two per SM of an H100/H200) before it splits rows over grid.z.
constexpr int64_t kGatherTargetBlocks = 264;
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

// v / S for fuse="mean" (0 when the dropped-score sum S is 0), v for "sum": the fused row's
// scaling, and a dropped column's coefficient in the backward. A division, not a multiply by
// 1/S: 1/S overflows for tiny S.
__device__ __forceinline__ float fuse_scale(bool mean, float v, float S) {
  return mean ? (S != 0.0f ? __fdiv_rn(v, S) : 0.0f) : v;
}

// ---------------------------------------------------------------------------------- forward

// Row b of the scratch and scores, as the rank-side kernels (one block per row) see it.
template <typename S>
struct RankRow {
  int64_t n;
  const typename S::raw* scores;
  int32_t* slot;
  float* coef;
  RowLayout r;
};

template <typename S>
__device__ __forceinline__ RankRow<S> rank_row(const SelectShape& s, const typename S::raw* scores, int32_t* slot,
                                               float* coef) {
  const int64_t b = blockIdx.x, n = s.N - s.num_prefix;
  return RankRow<S>{n, scores + b * n, slot + b * n, coef + b * n, row_layout(s, b, n)};
}

template <typename S>
__global__ void __launch_bounds__(kRankThreads)
    select_rank_kernel(SelectShape s, const typename S::raw* __restrict__ scores, int32_t* __restrict__ slot,
                       float* __restrict__ coef, float* __restrict__ dropped_sum,
                       int64_t* __restrict__ kept_out) {
  static_assert(kRankThreads == 256, "one radix digit per thread");
  using Scan = cub::BlockScan<unsigned long long, kRankThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int hist[256];
  __shared__ float red[kRankThreads];
  __shared__ uint32_t sh_digit;
  __shared__ int64_t sh_rem;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const RankRow<S> row = rank_row<S>(s, scores, slot, coef);
  const int64_t n = row.n;
  const RowLayout r = row.r;
  if (!r.ok) {  // uniform over the block; unreachable through the validated wrappers
    for (int64_t j = tid; j < n; j += kRankThreads) {
      row.slot[j] = -1;
      row.coef[j] = 0.0f;
    }
    if (tid == 0) dropped_sum[b] = 0.0f;
    return;
  }

  // Scores of columns tid + 256 i, read once when the whole row fits (uniform over the block).
  const bool cached = n <= int64_t(kKeysPerThread) * kRankThreads;
  float sv[kKeysPerThread];
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) {
    const int64_t j = tid + int64_t(i) * kRankThreads;
    sv[i] = (cached && j < n) ? S::to(row.scores[j]) : 0.0f;
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
      hist[tid] = 0;
      __syncthreads();
      if (cached) {
#pragma unroll
        for (int i = 0; i < kKeysPerThread; ++i) {
          const uint32_t key = order_key(sv[i]);
          if (tid + int64_t(i) * kRankThreads < n && (key & mask) == prefix) {
            atomicAdd(&hist[(key >> shift) & 0xffu], 1);
          }
        }
      } else {
        for (int64_t j = tid; j < n; j += kRankThreads) {
          const uint32_t key = order_key(S::to(row.scores[j]));
          if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
        }
      }
      __syncthreads();
      // Thread tid holds digit 255 - tid; the inclusive scan is the count at digits >= it. The
      // digit of rank rem is the one whose range (incl - cnt, incl] holds rem (rem <= the
      // candidates, so exactly one thread matches).
      const int digit = 255 - tid;
      const unsigned long long cnt = static_cast<unsigned long long>(hist[digit]);
      unsigned long long incl;
      Scan(scan_tmp).InclusiveSum(cnt, incl);
      const int64_t hi = static_cast<int64_t>(incl), lo = hi - static_cast<int64_t>(cnt);
      if (lo < rem && rem <= hi) {
        sh_digit = static_cast<uint32_t>(digit);
        sh_rem = rem - lo;
      }
      __syncthreads();
      prefix |= sh_digit << shift;
      mask |= 0xffu << shift;
      rem = sh_rem;
      // Every thread has read hist (before the scan's barriers) and sh_digit / sh_rem (before
      // the next pass's first barrier), so the next pass may clear and rewrite them.
    }
  }
  const uint32_t T = prefix;
  const int64_t need = rem;

  // Keep key > T, and the first `need` keys == T in index order. Chunks of kRankThreads
  // columns; carry holds (#greater << 32 | #equal) of the columns before the chunk (n < 2^31, so
  // neither half overflows).
  unsigned long long carry = 0ull;
  float dsum = 0.0f;
  auto chunk = [&](int64_t j, float sc) {  // every thread of the block, once per chunk
    const bool valid = j < n;
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
        row.slot[j] = static_cast<int32_t>(pos);
        row.coef[j] = 0.0f;
        kept_out[r.idx_base + pos] = s.num_prefix + j;
      } else {
        row.slot[j] = -1;
        row.coef[j] = sc;
        dsum += sc;
      }
    }
    __syncthreads();  // scan_tmp is reused by the next chunk
  };
  if (cached) {
#pragma unroll
    for (int i = 0; i < kKeysPerThread; ++i) {
      if (int64_t(i) * kRankThreads < n) chunk(tid + int64_t(i) * kRankThreads, sv[i]);
    }
  } else {
    for (int64_t j0 = 0; j0 < n; j0 += kRankThreads) {
      const int64_t j = j0 + tid;
      chunk(j, j < n ? S::to(row.scores[j]) : 0.0f);
    }
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

// Destination codes of a staged token row: >= 0 is the output row within the sample.
constexpr int32_t kDstFuse = -1;  // dropped, accumulated into the fused token
constexpr int32_t kDstSkip = -2;  // dropped without a fused token (or a slot outside the row)

// Copies prefix and kept tokens to their output rows and writes the fused token (or, with
// gridDim.z > 1 splits of the token rows, its partial sum: fuse_partial[z, b, :]). Thread
// (tx, ty): vector unit u = tile * tx_dim + tx of the row, staged rows ty, ty + ty_dim, ...
template <typename E, int VEC>
__global__ void __launch_bounds__(kGatherThreads)
    select_gather_kernel(SelectShape s, const typename E::raw* __restrict__ x, typename E::raw* __restrict__ out,
                         const int32_t* __restrict__ slot, const float* __restrict__ coef,
                         const float* __restrict__ dropped_sum, float* __restrict__ fuse_partial, int tx_dim,
                         int64_t rows_per_split) {
  using V = Pack<typename E::raw, VEC>;
  __shared__ float red[VEC][kGatherThreads];  // [i][thread]: neighbouring threads, neighbouring banks
  __shared__ int32_t dst_s[kStageRows];
  __shared__ float coef_s[kStageRows];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t N = s.N, P = s.num_prefix, n = N - P;
  const RowLayout r = row_layout(s, b, n);
  if (!r.ok) return;  // uniform over the block
  const int tx = tid % tx_dim, ty = tid / tx_dim, ty_dim = kGatherThreads / tx_dim;
  const int64_t units = s.D / VEC;
  const int64_t tiles = (units + tx_dim - 1) / tx_dim;
  const int64_t t_begin = int64_t(blockIdx.z) * rows_per_split;
  const int64_t t_end = t_begin + rows_per_split < N ? t_begin + rows_per_split : N;
  const V* xb = reinterpret_cast<const V*>(x) + b * N * units;
  V* o = reinterpret_cast<V*>(out) + r.base * units;
  const int32_t* slot_row = slot + b * n;
  const float* coef_row = coef + b * n;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t u = tile * tx_dim + tx;
    const bool active = u < units;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    for (int64_t c0 = t_begin; c0 < t_end; c0 += kStageRows) {
      const int cnt = static_cast<int>(t_end - c0 < kStageRows ? t_end - c0 : kStageRows);
      __syncthreads();  // the previous chunk's dst_s / coef_s are consumed
      for (int i = tid; i < cnt; i += kGatherThreads) {
        const int64_t t = c0 + i;
        int32_t dst = kDstSkip;
        float c = 0.0f;
        if (t < P) {
          dst = static_cast<int32_t>(t);
        } else {
          const int32_t sl = slot_row[t - P];
          if (sl >= 0) {
            if (sl < r.kb) dst = static_cast<int32_t>(P + sl);
          } else if (s.has_fuse) {
            dst = kDstFuse;
            c = coef_row[t - P];
          }
        }
        dst_s[i] = dst;
        coef_s[i] = c;
      }
      __syncthreads();
      if (!active) continue;
      for (int i0 = ty; i0 < cnt; i0 += ty_dim * kGatherUnroll) {
        int32_t dst[kGatherUnroll];
        V v[kGatherUnroll];
#pragma unroll
        for (int q = 0; q < kGatherUnroll; ++q) {  // the loads first: kGatherUnroll in flight
          const int i = i0 + q * ty_dim;
          dst[q] = i < cnt ? dst_s[i] : kDstSkip;
          // A value on every path: a conditional assignment makes ptxas spill on sm_80.
          v[q] = dst[q] != kDstSkip ? xb[(c0 + i) * units + u] : V{};
        }
#pragma unroll
        for (int q = 0; q < kGatherUnroll; ++q) {
          if (dst[q] >= 0) {
            o[int64_t(dst[q]) * units + u] = v[q];
          } else if (dst[q] == kDstFuse) {
            const float c = coef_s[i0 + q * ty_dim];
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] = fmaf(c, E::to(v[q].v[i]), acc[i]);
          }
        }
      }
    }
    if (s.has_fuse) {  // uniform over the block
#pragma unroll
      for (int i = 0; i < VEC; ++i) red[i][tid] = acc[i];
      __syncthreads();
      if (ty == 0 && active) {
        float tot[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          tot[i] = 0.0f;
          for (int y = 0; y < ty_dim; ++y) tot[i] += red[i][y * tx_dim + tx];
        }
        if (gridDim.z == 1) {
          const float denom = dropped_sum[b];
          V f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float val = fuse_scale(s.fuse_mean, tot[i], denom);
            f.v[i] = E::from(val);
          }
          o[(P + r.kb) * units + u] = f;
        } else {
          float* part = fuse_partial + (int64_t(blockIdx.z) * s.B + b) * s.D + u * VEC;
#pragma unroll
          for (int i = 0; i < VEC; ++i) part[i] = tot[i];
        }
      }
      __syncthreads();  // red is reused by the next tile
    }
  }
}

// The fused row from the splits' partial sums, added in split order. Grid (B, D / kFuseThreads).
template <typename E>
__global__ void __launch_bounds__(kFuseThreads)
    select_fuse_reduce_kernel(SelectShape s, const float* __restrict__ fuse_partial,
                              const float* __restrict__ dropped_sum, typename E::raw* __restrict__ out, int splits) {
  const int64_t b = blockIdx.x, n = s.N - s.num_prefix;
  const int64_t col = int64_t(blockIdx.y) * kFuseThreads + threadIdx.x;
  const RowLayout r = row_layout(s, b, n);
  if (!r.ok || col >= s.D) return;
  float tot = 0.0f;
  for (int z = 0; z < splits; ++z) tot += fuse_partial[(int64_t(z) * s.B + b) * s.D + col];
  const float denom = dropped_sum[b];
  const float val = fuse_scale(s.fuse_mean, tot, denom);
  out[(r.base + s.num_prefix + r.kb) * s.D + col] = E::from(val);
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
  const RankRow<S> row = rank_row<S>(s, scores, slot, coef);
  const int64_t n = row.n;
  const typename S::raw* srow = row.scores;
  int32_t* slot_row = row.slot;
  float* coef_row = row.coef;
  const RowLayout r = row.r;

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
      c = fuse_scale(s.fuse_mean, sc, total);
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

// Splits of the token rows over grid.z: enough blocks for the GPU when B * D tiles are few, at
// most one split per kStageRows rows. Returns the rows of a split.
int64_t gather_rows_per_split(const SelectShape& s, int64_t y_blocks) {
  const int64_t blocks = s.B * y_blocks;
  int64_t splits = blocks >= kGatherTargetBlocks ? 1 : (kGatherTargetBlocks + blocks - 1) / blocks;
  const int64_t max_splits = (s.N + kStageRows - 1) / kStageRows;
  splits = splits < max_splits ? splits : max_splits;
  splits = splits < kMaxGridY ? (splits > 0 ? splits : 1) : kMaxGridY;
  return (s.N + splits - 1) / splits;
}

template <typename E, int VEC>
void launch_gather(const SelectShape& s, const void* x, void* tokens, const SelectScratch& w, cudaStream_t stream) {
  const int64_t units = s.D / VEC;
  const int tx = gather_tx(units);
  const int64_t tiles = (units + tx - 1) / tx;
  const int64_t y_blocks = tiles < kMaxGridY ? tiles : kMaxGridY;
  int64_t rows = gather_rows_per_split(s, y_blocks);
  // A fused row split over grid.z needs the partial-sum scratch (select_gather_partial_floats).
  if (s.has_fuse && w.fuse_partial == nullptr) rows = s.N;
  const int64_t splits = s.N > 0 ? (s.N + rows - 1) / rows : 1;
  const dim3 grid(static_cast<unsigned>(s.B), static_cast<unsigned>(y_blocks), static_cast<unsigned>(splits));
  select_gather_kernel<E, VEC><<<grid, kGatherThreads, 0, stream>>>(
      s, static_cast<const typename E::raw*>(x), static_cast<typename E::raw*>(tokens), w.slot, w.coef,
      w.dropped_sum, w.fuse_partial, tx, rows);
  if (s.has_fuse && splits > 1 && cudaPeekAtLastError() == cudaSuccess) {
    const dim3 rgrid(static_cast<unsigned>(s.B), static_cast<unsigned>((s.D + kFuseThreads - 1) / kFuseThreads));
    select_fuse_reduce_kernel<E><<<rgrid, kFuseThreads, 0, stream>>>(
        s, w.fuse_partial, w.dropped_sum, static_cast<typename E::raw*>(tokens), static_cast<int>(splits));
  }
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

// B on grid.x; N (not only n) below 2^31: the gather stages output rows within a sample as int32.
bool grid_ok(const SelectShape& s) { return s.B <= 0x7fffffff && s.N <= 0x7fffffff; }

}  // namespace

int64_t select_gather_partial_floats(const SelectShape& s) {
  if (!s.has_fuse || s.B == 0 || s.N == 0 || s.D == 0 || !grid_ok(s)) return 0;
  // Whatever vector width the call takes, one D tile gives the fewest blocks, so the most splits.
  const int64_t rows = gather_rows_per_split(s, 1);
  const int64_t splits = (s.N + rows - 1) / rows;
  return splits > 1 ? splits * s.B * s.D : 0;
}

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
