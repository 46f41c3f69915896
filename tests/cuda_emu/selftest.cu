// Kernels that check the emulator itself (tests/test_cuda_emulated.py): that its warp collectives
// and barriers compute what a GPU computes, and that it reports the faults it claims to report.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// out[i] for thread i: the warp butterfly sum, shfl_down/up/idx results, the ballot of odd
// lanes, and a block-wide shared-memory sum behind two barriers.
__global__ void collectives_kernel(const float* in, float* out) {
  __shared__ float sm[256];
  const int tid = threadIdx.x, lane = tid & 31;
  const float v = in[blockIdx.x * blockDim.x + tid];
  float s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const float down = __shfl_down_sync(0xffffffffu, v, 3);
  const float up = __shfl_up_sync(0xffffffffu, v, 2);
  const float idx = __shfl_sync(0xffffffffu, v, 7);
  const unsigned ballot = __ballot_sync(0xffffffffu, lane & 1);
  sm[tid] = v;
  __syncthreads();
  float block = 0.0f;
  for (int i = 0; i < static_cast<int>(blockDim.x); ++i) block += sm[i];
  __syncthreads();
  float* o = out + (blockIdx.x * blockDim.x + tid) * 6;
  o[0] = s;
  o[1] = down;
  o[2] = up;
  o[3] = idx;
  o[4] = static_cast<float>(ballot == 0xaaaaaaaau);
  o[5] = block;
}

// Warp 0 waits at the block barrier while warp 1 waits at a shuffle and then at a second
// barrier: a deadlock.
__global__ void deadlock_kernel(float* out) {
  const int warp = threadIdx.x >> 5;
  float v = 1.0f;
  if (warp == 0) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// Warp 1 exits; warp 0 waits at a barrier (a conditional __syncthreads, undefined in CUDA).
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Lane 5 has exited but is in the shuffle's mask.
__global__ void exited_lane_kernel(float* out) {
  if ((threadIdx.x & 31) == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void noop_kernel() {}

// Thread i reads its neighbour's shared slot without a barrier between the write and the read.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float sm[64];
  const int tid = threadIdx.x;
  sm[tid] = static_cast<float>(tid + 1);
  out[tid] = sm[(tid + 1) % 64];
}

}  // namespace

extern "C" {
int emu_selftest_collectives(const float* in, float* out, int blocks, int threads) {
  collectives_kernel<<<blocks, threads>>>(in, out);
  return static_cast<int>(cudaGetLastError());
}
int emu_selftest_deadlock(float* out) {
  deadlock_kernel<<<1, 64>>>(out);
  return static_cast<int>(cudaGetLastError());
}
int emu_selftest_divergent_barrier(float* out) {
  divergent_barrier_kernel<<<1, 64>>>(out);
  return static_cast<int>(cudaGetLastError());
}
int emu_selftest_exited_lane(float* out) {
  exited_lane_kernel<<<1, 32>>>(out);
  return static_cast<int>(cudaGetLastError());
}
int emu_selftest_missing_barrier(float* out) {
  missing_barrier_kernel<<<1, 64>>>(out);
  return static_cast<int>(cudaGetLastError());
}
int emu_selftest_config(unsigned gx, unsigned gy, unsigned threads) {
  noop_kernel<<<dim3(gx, gy), threads>>>();
  return static_cast<int>(cudaGetLastError());
}
}
