// Checks shared by the ATen wrappers of the CUDA kernels (*_cuda.cpp).
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace bus_kernels {

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The kernels' code for t's element type; float32, float16 and bfloat16 only.
inline DType dtype_code(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16 (float64 runs on the 'torch' backend), got ",
              t.scalar_type());
  return DType::kFloat32;
}

}  // namespace bus_kernels
