// Argument checks shared by the CPU and CUDA wrappers. Python validates first; these keep the
// C++ entry points safe when called directly through torch.ops.bus_kernels_C.
#pragma once
#include <ATen/ATen.h>

namespace bus_kernels {

// Bytes in one row (all dims after the first `lead` dims).
inline int64_t row_bytes(const at::Tensor& t, int64_t lead) {
  int64_t n = t.element_size();
  for (int64_t i = lead; i < t.dim(); ++i) n *= t.size(i);
  return n;
}

// Whether the CUDA wrappers run the checks that read tensor values on the host (a device sync
// each). Off by default; bus_kernels.set_value_checks() / $BUS_KERNELS_VALUE_CHECKS switch it
// through torch.ops.bus_kernels_C.set_value_checks. The CPU kernels always check (no sync on CPU).
// Defined in bus_kernels.cpp.
bool cuda_value_checks();

inline void check_cu_seqlens_meta(const char* op, const at::Tensor& cu, const at::Tensor& data) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, op, ": cu_seqlens must be 1-D [B+1], got ", cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.device() == data.device(), op, ": cu_seqlens must be on ", data.device(), ", got ", cu.device());
}

// Host-side value checks (CPU tensors only): starts at 0, non-decreasing, ends at total,
// no sequence longer than max_len.
inline void check_cu_seqlens_values(const char* op, const int32_t* cu, int64_t B, int64_t total, int64_t max_len) {
  TORCH_CHECK(cu[0] == 0, op, ": cu_seqlens must start at 0, got ", cu[0]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = int64_t(cu[b + 1]) - cu[b];
    TORCH_CHECK(n >= 0, op, ": cu_seqlens must be non-decreasing (at ", b, ")");
    TORCH_CHECK(n <= max_len, op, ": sequence ", b, " has length ", n, " > ", max_len);
  }
  TORCH_CHECK(cu[B] == total, op, ": cu_seqlens must end at total=", total, ", got ", cu[B]);
}

}  // namespace bus_kernels
