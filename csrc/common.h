// Argument checks shared by the CPU and CUDA wrappers. Python validates first; these keep the
// C++ entry points safe when called directly through torch.ops.bus_kernels_C.
#pragma once
#include <ATen/ATen.h>

#include <vector>

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

// relevance_scores: q_mask bool [B, T] (its device is the caller's to check).
inline void check_q_mask(const char* op, const at::Tensor& q_mask, int64_t B, int64_t T) {
  TORCH_CHECK(q_mask.scalar_type() == at::kBool, op, ": q_mask must be bool, got ", q_mask.scalar_type());
  TORCH_CHECK(q_mask.dim() == 2 && q_mask.size(0) == B && q_mask.size(1) == T, op, ": q_mask must be [B=", B,
              ", T=", T, "], got ", q_mask.sizes());
}

// relevance_scores_backward: grad [B, N] and lse float32 [B, H, T] (devices and grad's dtype are
// the caller's to check: the CPU kernel takes float32 only, the CUDA wrapper converts).
inline void check_grad_lse(const char* op, const at::Tensor& grad, const at::Tensor& lse, int64_t B, int64_t H,
                           int64_t T, int64_t N) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == N, op, ": grad must be [B=", B, ", N=", N,
              "], got ", grad.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == T, op, ": lse must be [B=", B,
              ", H=", H, ", T=", T, "], got ", lse.sizes());
}

// pack's arguments: x [B, L, ...], cu_seqlens int32 [B+1] on x's device, total >= 0 (the values
// of cu_seqlens are the caller's to check). Returns the output's shape, [total, ...].
inline std::vector<int64_t> check_pack_args(const char* op, const at::Tensor& x, const at::Tensor& cu_seqlens,
                                            int64_t total) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [B, L, ...], got ", x.sizes());
  TORCH_CHECK(total >= 0, op, ": total must be >= 0, got ", total);
  check_cu_seqlens_meta(op, cu_seqlens, x);
  TORCH_CHECK(cu_seqlens.numel() == x.size(0) + 1, op, ": cu_seqlens must have B+1=", x.size(0) + 1, " entries");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.erase(shape.begin());
  shape[0] = total;
  return shape;
}

// unpack's arguments: packed [total, ...], cu_seqlens int32 [B+1] on packed's device,
// max_seqlen >= 0 (values as for pack). Returns the output's shape, [B, max_seqlen, ...].
inline std::vector<int64_t> check_unpack_args(const char* op, const at::Tensor& packed, const at::Tensor& cu_seqlens,
                                              int64_t max_seqlen) {
  TORCH_CHECK(packed.dim() >= 1, op, ": packed must be [total, ...], got ", packed.sizes());
  TORCH_CHECK(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
  check_cu_seqlens_meta(op, cu_seqlens, packed);
  std::vector<int64_t> shape = packed.sizes().vec();
  shape[0] = max_seqlen;
  shape.insert(shape.begin(), cu_seqlens.numel() - 1);
  return shape;
}

}  // namespace bus_kernels
