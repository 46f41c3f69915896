// Device helpers shared by the select and relevance kernels: element types handled as raw bits
// (no torch headers, and no reliance on the __half / __nv_bfloat16 operators that the build
// disables), and reductions whose summation order is fixed, so that results are bitwise
// reproducible from run to run.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace bus_kernels {
namespace dev {

// Element type tags: `raw` is the storage type, to/from convert to and from fp32 (round to
// nearest even on the way back, as torch's .to() does).
struct F32 {
  using raw = uint32_t;
  static __device__ __forceinline__ float to(raw r) { return __uint_as_float(r); }
  static __device__ __forceinline__ raw from(float f) { return __float_as_uint(f); }
};
struct F16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float to(raw r) { return __half2float(__ushort_as_half(r)); }
  static __device__ __forceinline__ raw from(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float to(raw r) { return __bfloat162float(__ushort_as_bfloat16(r)); }
  static __device__ __forceinline__ raw from(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// VEC consecutive elements moved as one load/store (16 bytes when VEC * sizeof(raw) == 16).
template <typename Raw, int VEC>
struct alignas(sizeof(Raw) * VEC) Pack {
  Raw v[VEC];
};

// Calls f(Tag{}) for the element type of `dtype`; false for an unknown code.
template <typename F>
inline bool dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(F32{}); return true;
    case DType::kFloat16: f(F16{}); return true;
    case DType::kBFloat16: f(BF16{}); return true;
  }
  return false;
}

constexpr unsigned kFullMask = 0xffffffffu;

// Butterfly reductions: every lane ends with the same, order-fixed result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the block of one value per thread, in a fixed tree order; every thread gets the
// result. `smem` holds THREADS floats. Must be reached by every thread of the block.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* smem) {
  static_assert((THREADS & (THREADS - 1)) == 0, "THREADS must be a power of two");
  const int tid = threadIdx.x;
  smem[tid] = v;
  __syncthreads();
#pragma unroll
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (tid < s) smem[tid] += smem[tid + s];
    __syncthreads();
  }
  const float r = smem[0];
  __syncthreads();  // smem may be reused right after
  return r;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

}  // namespace dev
}  // namespace bus_kernels
