// C entry points of the emulated CUDA launchers (launchers.h), for ctypes: flat arguments, the
// launcher's cudaError_t as the result, emu_message() for why a launch failed. Device pointers
// are host pointers here (CPU tensors' data).
#include <cuda_runtime.h>

#include "launchers.h"

using namespace bus_kernels;

namespace {
// Aggregates in launchers.h's field order.
SelectShape select_shape(int64_t B, int64_t N, int64_t D, int64_t P, int64_t k, const int64_t* keep,
                         const int32_t* cu, int64_t out_rows, int64_t num_kept, int fuse, int x_dtype, int s_dtype) {
  return SelectShape{B, N, D, P, k, keep, cu, out_rows, num_kept, fuse != 0, fuse == 2,
                     static_cast<DType>(x_dtype), static_cast<DType>(s_dtype)};
}
RelevanceShape relevance_shape(int64_t B, int64_t H, int64_t T, int64_t N, int64_t d, float scale, int dtype) {
  return RelevanceShape{B, H, T, N, d, scale, static_cast<DType>(dtype)};
}

int done(cudaError_t e) {
  if (e == cudaSuccess) ::emu::state().message.clear();
  return static_cast<int>(e);
}
}  // namespace

extern "C" {
const char* emu_message() { return ::emu::state().message.c_str(); }
int64_t emu_launches() { return ::emu::launches(); }
void emu_set_schedule(int mode, uint64_t seed) {
  ::emu::schedule().mode = static_cast<::emu::Schedule>(mode);
  ::emu::schedule().seed = seed;
}

int emu_select_forward(int64_t B, int64_t N, int64_t D, int64_t P, int64_t k, const int64_t* keep, const int32_t* cu,
                       int64_t out_rows, int64_t num_kept, int fuse, int x_dtype, int s_dtype, const void* x,
                       const void* scores, void* tokens, int64_t* indices, int score_order, int32_t* slot, float* coef,
                       float* dot, float* dropped_sum, int64_t* kept_tmp, float* fuse_partial) {
  const SelectShape s = select_shape(B, N, D, P, k, keep, cu, out_rows, num_kept, fuse, x_dtype, s_dtype);
  const SelectScratch w{slot, coef, dot, dropped_sum, kept_tmp, fuse_partial};
  return done(launch_select_forward(s, x, scores, tokens, indices, score_order != 0, w, nullptr));
}

int emu_select_backward(int64_t B, int64_t N, int64_t D, int64_t P, int64_t k, const int64_t* keep, const int32_t* cu,
                        int64_t out_rows, int64_t num_kept, int fuse, int x_dtype, int s_dtype, const void* grad,
                        const void* x, const void* scores, const int64_t* indices, void* grad_x, void* grad_scores,
                        int32_t* slot, float* coef, float* dot, float* dropped_sum) {
  const SelectShape s = select_shape(B, N, D, P, k, keep, cu, out_rows, num_kept, fuse, x_dtype, s_dtype);
  const SelectScratch w{slot, coef, dot, dropped_sum, nullptr, nullptr};
  return done(launch_select_backward(s, grad, x, scores, indices, grad_x, grad_scores, w, nullptr));
}

int64_t emu_select_partial_floats(int64_t B, int64_t N, int64_t D, int64_t P, int fuse, int x_dtype) {
  return select_gather_partial_floats(select_shape(B, N, D, P, 0, nullptr, nullptr, 0, 0, fuse, x_dtype, 0));
}

int emu_relevance_forward(int64_t B, int64_t H, int64_t T, int64_t N, int64_t d, float scale, int dtype, const void* q,
                          const void* k, const float* w, float* scores, float* lse) {
  return done(launch_relevance_forward(relevance_shape(B, H, T, N, d, scale, dtype), q, k, w, scores, lse, nullptr));
}

int emu_relevance_backward(int64_t B, int64_t H, int64_t T, int64_t N, int64_t d, float scale, int dtype,
                           const void* q, const void* k, const float* w, const float* lse, const float* grad,
                           float* row, void* dq, void* dk) {
  return done(launch_relevance_backward(relevance_shape(B, H, T, N, d, scale, dtype), q, k, w, lse, grad, row, dq, dk,
                                        nullptr));
}

int emu_copy_rows(const void* src, void* dst, const int32_t* cu, int64_t B, int64_t L, int64_t row_bytes,
                  int64_t total, int to_packed) {
  return done(launch_copy_rows(src, dst, cu, B, L, row_bytes, total, to_packed != 0, nullptr));
}
}
