// pack / unpack on CPU: one memcpy per sequence, sequences in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../common.h"

namespace bus_kernels {
namespace {

// Copies sequence b between the padded layout (b * L rows) and the packed one (cu[b] rows).
void copy_sequences(const char* src, char* dst, const int32_t* cu, int64_t B, int64_t L,
                    int64_t row, bool to_packed) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = int64_t(cu[b + 1]) - cu[b];
      const int64_t padded = b * L * row, packed = int64_t(cu[b]) * row;
      if (to_packed) {
        std::memcpy(dst + packed, src + padded, n * row);
      } else {
        std::memcpy(dst + padded, src + packed, n * row);
      }
    }
  });
}

at::Tensor pack_cpu(const at::Tensor& x_in, const at::Tensor& cu_seqlens, int64_t total) {
  const char* op = "bus_kernels_C::pack";
  const std::vector<int64_t> shape = check_pack_args(op, x_in, cu_seqlens, total);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), L = x.size(1);
  const at::Tensor cu = cu_seqlens.contiguous();
  check_cu_seqlens_values(op, cu.data_ptr<int32_t>(), B, total, L);
  at::Tensor out = at::empty(shape, x.options());
  copy_sequences(static_cast<const char*>(x.data_ptr()), static_cast<char*>(out.data_ptr()),
                 cu.data_ptr<int32_t>(), B, L, row_bytes(x, 2), /*to_packed=*/true);
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& packed_in, const at::Tensor& cu_seqlens, int64_t max_seqlen) {
  const char* op = "bus_kernels_C::unpack";
  const std::vector<int64_t> shape = check_unpack_args(op, packed_in, cu_seqlens, max_seqlen);
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t B = cu.numel() - 1;
  check_cu_seqlens_values(op, cu.data_ptr<int32_t>(), B, packed.size(0), max_seqlen);
  at::Tensor out = at::zeros(shape, packed.options());
  copy_sequences(static_cast<const char*>(packed.data_ptr()), static_cast<char*>(out.data_ptr()),
                 cu.data_ptr<int32_t>(), B, max_seqlen, row_bytes(packed, 1), /*to_packed=*/false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bus_kernels_C, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace bus_kernels
