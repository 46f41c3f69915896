// ATen wrappers of the CUDA relevance_scores kernels (relevance.cu), forward and backward. Every
// argument is checked here so that a direct call through torch.ops.bus_kernels_C.* cannot make
// a kernel touch memory outside its tensors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "../common.h"
#include "cuda_checks.h"
#include "launchers.h"

namespace bus_kernels {
namespace {

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ", t.device());
}

// q [B,H,T,d], k [B,H,N,d] (same dtype), q_mask bool [B,T] if given; returns the shape.
RelevanceShape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const std::optional<at::Tensor>& q_mask, double scale) {
  TORCH_CHECK(q.defined() && q.is_cuda(), op, ": q must be a CUDA tensor");
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, T, d], got ", q.sizes());
  check_same_device(op, "k", k, q);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k must be [B=", q.size(0), ", H=", q.size(1), ", N, d=", q.size(3), "], got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  if (q_mask.has_value() && q_mask->defined()) {
    check_same_device(op, "q_mask", *q_mask, q);
    check_q_mask(op, *q_mask, q.size(0), q.size(2));
  }
  RelevanceShape s{};
  s.B = q.size(0);
  s.H = q.size(1);
  s.T = q.size(2);
  s.N = k.size(2);
  s.d = q.size(3);
  s.scale = static_cast<float>(scale);
  s.dtype = dtype_code(op, "q", q);
  return s;
}

// fp32 [B, T] weights of the mean over heads and real tokens: mask / (H * count), or 1 / (H * T).
at::Tensor token_weights(const RelevanceShape& s, const at::Tensor& q, const std::optional<at::Tensor>& q_mask) {
  const auto opt = q.options().dtype(at::kFloat);
  if (!q_mask.has_value() || !q_mask->defined()) return at::full({s.B, s.T}, 1.0 / double(s.H * s.T), opt);
  const at::Tensor m = q_mask->to(at::kFloat);
  return (m / (m.sum(1, /*keepdim=*/true) * double(s.H))).contiguous();
}

bool empty(const RelevanceShape& s) { return s.B == 0 || s.H == 0 || s.T == 0 || s.N == 0; }

void check_grid(const char* op, const RelevanceShape& s) {
  TORCH_CHECK(relevance_grid_blocks(s) <= std::numeric_limits<int32_t>::max(), op, ": the problem [B=", s.B, ", H=",
              s.H, ", T=", s.T, ", N=", s.N, ", d=", s.d, "] needs more thread blocks than one CUDA grid holds");
}

std::tuple<at::Tensor, at::Tensor> relevance_scores_cuda(const at::Tensor& q_in, const at::Tensor& k_in, double scale,
                                                         const std::optional<at::Tensor>& q_mask) {
  const char* op = "bus_kernels_C::relevance_scores";
  const RelevanceShape s = check_inputs(op, q_in, k_in, q_mask, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto opt = q_in.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({s.B, s.H, s.T}, opt);
  if (empty(s)) {
    // Softmax over no keys: lse = -inf; no heads or no queries: every score is an empty sum.
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {at::zeros({s.B, s.N}, opt), lse};
  }
  at::Tensor scores = at::empty({s.B, s.N}, opt);
  check_grid(op, s);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor w = token_weights(s, q, q_mask);
  check_launch(op, launch_relevance_forward(s, q.data_ptr(), k.data_ptr(), w.data_ptr<float>(),
                                            scores.data_ptr<float>(), lse.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream()));
  return {scores, lse};
}

std::tuple<at::Tensor, at::Tensor> relevance_scores_backward_cuda(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                                  const at::Tensor& k_in, const at::Tensor& lse_in,
                                                                  double scale,
                                                                  const std::optional<at::Tensor>& q_mask) {
  const char* op = "bus_kernels_C::relevance_scores_backward";
  const RelevanceShape s = check_inputs(op, q_in, k_in, q_mask, scale);
  check_same_device(op, "grad", grad_in, q_in);
  check_same_device(op, "lse", lse_in, q_in);
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()), op, ": grad must be floating, got ", grad_in.scalar_type());
  check_grad_lse(op, grad_in, lse_in, s.B, s.H, s.T, s.N);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  if (empty(s)) return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options())};
  check_grid(op, s);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor w = token_weights(s, q, q_mask);
  at::Tensor row = at::empty({s.B, s.H, s.T}, q.options().dtype(at::kFloat));
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  check_launch(op, launch_relevance_backward(s, q.data_ptr(), k.data_ptr(), w.data_ptr<float>(),
                                             lse.data_ptr<float>(), grad.data_ptr<float>(), row.data_ptr<float>(),
                                             dq.data_ptr(), dk.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(bus_kernels_C, CUDA, m) {
  m.impl("relevance_scores", &relevance_scores_cuda);
  m.impl("relevance_scores_backward", &relevance_scores_backward_cuda);
}

}  // namespace bus_kernels
