// pack / unpack on CUDA: a row-copy kernel between the padded and packed layouts.
// Deliberately free of torch headers so that nvcc compiles it in seconds; the ATen wrapper is
// in pack_cuda.cpp.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace bus_kernels {
namespace {

// Grid: (B, chunks). Block x=b copies the n_b * row_words words of sequence b, strided over the
// chunk blocks (B on grid.x, whose limit is 2^31 - 1: grid.y would cap B at 65535). Word W is the widest type (16/8/4/2/1 bytes) that divides the row and both bases.
template <typename W>
__global__ void copy_rows_kernel(const W* __restrict__ src, W* __restrict__ dst,
                                 const int32_t* __restrict__ cu, int64_t L, int64_t row_words,
                                 int64_t total, bool to_packed) {
  const int64_t b = blockIdx.x;
  const int64_t start = cu[b];
  int64_t n = int64_t(cu[b + 1]) - start;
  // Bounds guards: malformed cu_seqlens must not write outside either buffer.
  if (n > L) n = L;
  if (start < 0 || n <= 0 || start + n > total) return;
  const int64_t words = n * row_words;
  const int64_t padded = b * L * row_words, packed = start * row_words;
  const W* s = src + (to_packed ? padded : packed);
  W* d = dst + (to_packed ? packed : padded);
  for (int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; i < words;
       i += int64_t(gridDim.y) * blockDim.x) {
    d[i] = s[i];
  }
}

template <typename W>
cudaError_t launch(const void* src, void* dst, const int32_t* cu, int64_t B, int64_t L,
                   int64_t row_bytes, int64_t total, bool to_packed, cudaStream_t stream) {
  const int64_t row_words = row_bytes / int64_t(sizeof(W));
  const int threads = 256;
  // Enough chunks to fill the GPU for one long sequence (grid.y, at most 1024 < 65535).
  int64_t chunks = (L * row_words + threads * 4 - 1) / (threads * 4);
  chunks = chunks < 1 ? 1 : (chunks > 1024 ? 1024 : chunks);
  if (B > 0x7fffffff) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(chunks));
  copy_rows_kernel<W><<<grid, threads, 0, stream>>>(static_cast<const W*>(src), static_cast<W*>(dst),
                                                    cu, L, row_words, total, to_packed);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_copy_rows(const void* src, void* dst, const int32_t* cu, int64_t B, int64_t L,
                             int64_t row_bytes, int64_t total, bool to_packed, cudaStream_t stream) {
  if (B == 0 || L == 0 || row_bytes == 0) return cudaSuccess;
  const auto align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                     static_cast<uintptr_t>(row_bytes);
  if (align % 16 == 0) return launch<uint4>(src, dst, cu, B, L, row_bytes, total, to_packed, stream);
  if (align % 8 == 0) return launch<uint2>(src, dst, cu, B, L, row_bytes, total, to_packed, stream);
  if (align % 4 == 0) return launch<uint32_t>(src, dst, cu, B, L, row_bytes, total, to_packed, stream);
  if (align % 2 == 0) return launch<uint16_t>(src, dst, cu, B, L, row_bytes, total, to_packed, stream);
  return launch<uint8_t>(src, dst, cu, B, L, row_bytes, total, to_packed, stream);
}

}  // namespace bus_kernels
