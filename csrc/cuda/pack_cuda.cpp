// ATen wrappers of the CUDA pack / unpack kernels. cu_seqlens values are validated by the Python
// layer (reading them here would cost a device sync); the kernel bounds-checks every write.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "cuda_checks.h"
#include "launchers.h"

namespace bus_kernels {
namespace {

at::Tensor pack_cuda(const at::Tensor& x_in, const at::Tensor& cu_seqlens, int64_t total) {
  const char* op = "bus_kernels_C::pack";
  const std::vector<int64_t> shape = check_pack_args(op, x_in, cu_seqlens, total);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t B = x.size(0), L = x.size(1);
  // Zero-filled so that rows a malformed cu_seqlens would skip never hold garbage.
  at::Tensor out = at::zeros(shape, x.options());
  check_launch(op, launch_copy_rows(x.data_ptr(), out.data_ptr(), cu.data_ptr<int32_t>(), B, L,
                                    row_bytes(x, 2), total, /*to_packed=*/true,
                                    c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor unpack_cuda(const at::Tensor& packed_in, const at::Tensor& cu_seqlens, int64_t max_seqlen) {
  const char* op = "bus_kernels_C::unpack";
  const std::vector<int64_t> shape = check_unpack_args(op, packed_in, cu_seqlens, max_seqlen);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t B = cu.numel() - 1;
  at::Tensor out = at::zeros(shape, packed.options());
  check_launch(op, launch_copy_rows(packed.data_ptr(), out.data_ptr(), cu.data_ptr<int32_t>(), B,
                                    max_seqlen, row_bytes(packed, 1), packed.size(0),
                                    /*to_packed=*/false, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bus_kernels_C, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace bus_kernels
