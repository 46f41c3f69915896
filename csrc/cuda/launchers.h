// Plain-C++ entry points of the .cu kernels (no torch types), called by the ATen wrappers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace bus_kernels {

// Copies sequence b's rows between the padded layout (rows b*L ...) and the packed layout
// (rows cu[b] ...). row_bytes: bytes per row. Returns the launch error, if any.
cudaError_t launch_copy_rows(const void* src, void* dst, const int32_t* cu, int64_t B, int64_t L,
                             int64_t row_bytes, int64_t total, bool to_packed, cudaStream_t stream);

// ---- select_tokens / select_tokens_varlen (select.cu) and relevance_scores (relevance.cu) ----

// Element type of a tensor, as the wrappers pass it (the .cu files see no torch types).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Shapes and layout of one select call. Row b of x has n = N - num_prefix rankable tokens and
// keeps kb = keep ? keep[b] : k of them. Its output rows start at cu_seqlens[b] (varlen) or at
// b * (num_prefix + k + has_fuse), its kept positions at cu_seqlens[b] - b * (num_prefix +
// has_fuse) (varlen) or at b * k in `indices`. The kernels skip a row whose layout falls
// outside out_rows / num_kept (the wrappers validate the values; this only guards memory).
struct SelectShape {
  int64_t B, N, D, num_prefix;
  int64_t k;                  // keep count of every row (select_tokens); unused when keep != nullptr
  const int64_t* keep;        // select_tokens_varlen: int64 [B], else nullptr
  const int32_t* cu_seqlens;  // select_tokens_varlen: int32 [B+1], else nullptr
  int64_t out_rows;           // rows of tokens (forward) / of the upstream gradient (backward)
  int64_t num_kept;           // entries of indices: B * k, or keep.sum()
  bool has_fuse, fuse_mean;
  DType x_dtype, scores_dtype;
};

// Scratch of the select kernels (the wrapper allocates it): slot int32 [B, n], coef fp32 [B, n],
// dot fp32 [B, n] (backward), dropped_sum fp32 [B], kept_tmp int64 [B, k] (order="score"),
// fuse_partial fp32 [select_gather_partial_floats(shape)] (forward with a fused token; nullptr
// when that is 0: the gather then keeps each row in one block).
struct SelectScratch {
  int32_t* slot;
  float* coef;
  float* dot;
  float* dropped_sum;
  int64_t* kept_tmp;
  float* fuse_partial;
};

// fp32 elements of SelectScratch::fuse_partial that launch_select_forward needs for `s` (0: none).
int64_t select_gather_partial_floats(const SelectShape& s);

// tokens [out_rows, D] (x dtype) and indices int64 [num_kept]. score_order: kept tokens (and
// indices) by descending score instead of by index (select_tokens only).
cudaError_t launch_select_forward(const SelectShape& s, const void* x, const void* scores, void* tokens,
                                  int64_t* indices, bool score_order, const SelectScratch& scratch,
                                  cudaStream_t stream);

// grad [out_rows, D] (x dtype) -> grad_x [B, N, D] (x dtype), grad_scores [B, n] (scores dtype).
cudaError_t launch_select_backward(const SelectShape& s, const void* grad, const void* x, const void* scores,
                                   const int64_t* indices, void* grad_x, void* grad_scores,
                                   const SelectScratch& scratch, cudaStream_t stream);

struct RelevanceShape {
  int64_t B, H, T, N, d;
  float scale;
  DType dtype;
};

// Blocks of the largest grid the relevance launchers use; the wrappers refuse more than 2^31 - 1.
int64_t relevance_grid_blocks(const RelevanceShape& s);

// q [B,H,T,d], k [B,H,N,d], w fp32 [B,T] (mean weights) -> scores fp32 [B,N], lse fp32 [B,H,T].
cudaError_t launch_relevance_forward(const RelevanceShape& s, const void* q, const void* k, const float* w,
                                     float* scores, float* lse, cudaStream_t stream);

// grad fp32 [B,N] -> dq [B,H,T,d], dk [B,H,N,d] (q dtype); row fp32 [B,H,T] is scratch.
cudaError_t launch_relevance_backward(const RelevanceShape& s, const void* q, const void* k, const float* w,
                                      const float* lse, const float* grad, float* row, void* dq, void* dk,
                                      cudaStream_t stream);

}  // namespace bus_kernels
