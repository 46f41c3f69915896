// Plain-C++ entry points of the .cu kernels (no torch types), called by the ATen wrappers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace bus_kernels {

// Copies sequence b's rows between the padded layout (rows b*L ...) and the packed layout
// (rows cu[b] ...). row_bytes: bytes per row. Returns the launch error, if any.
cudaError_t launch_copy_rows(const void* src, void* dst, const int32_t* cu, int64_t B, int64_t L,
                             int64_t row_bytes, int64_t total, bool to_packed, cudaStream_t stream);

}  // namespace bus_kernels
