// ATen wrappers of the CUDA select_tokens / select_tokens_varlen kernels (select.cu), forward and
// backward. Every argument is checked here, so that a direct call through
// torch.ops.bus_kernels_C.* cannot make a kernel touch memory outside its tensors. Nothing here
// reads tensor values on the host by default (no device sync, CUDA-graph capturable): the
// varlen outputs are sized from `total` (forward) or from grad / indices (backward), and the
// kernels skip any row whose keep / cu_seqlens would leave the buffers (row_layout in
// select.cu), so malformed values cannot touch memory outside the tensors. With value checks on
// (bus_kernels.set_value_checks(True), cuda_value_checks()) keep and cu_seqlens are also
// copied to the host and validated, with an error naming the bad entry.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <string_view>

#include "../common.h"
#include "cuda_checks.h"
#include "launchers.h"

namespace bus_kernels {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like x, got ", t.device());
}

// "none" -> 0, "sum" -> 1, "mean" -> 2.
int fuse_code(const char* op, std::string_view fuse) {
  if (fuse == "none") return 0;
  if (fuse == "sum") return 1;
  if (fuse == "mean") return 2;
  TORCH_CHECK(false, op, ": fuse='", std::string(fuse), "' must be 'none', 'sum' or 'mean'");
  return 0;
}

// x [B, N, D] and scores [B, N - num_prefix]: checks shared by the four ops; returns n.
int64_t check_x_scores(const char* op, const at::Tensor& x, const at::Tensor& scores, int64_t num_prefix) {
  TORCH_CHECK(x.defined() && x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, N, D], got ", x.sizes());
  dtype_code(op, "x", x);
  check_cuda(op, "scores", scores, x.device());
  dtype_code(op, "scores", scores);
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= N, op, ": num_prefix=", num_prefix, " must be in [0, N=", N, "]");
  const int64_t n = N - num_prefix;
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == B && scores.size(1) == n, op, ": scores must be [B=", B,
              ", N - num_prefix=", n, "], got ", scores.sizes());
  TORCH_CHECK(B <= kInt32Max, op, ": B=", B, " rows exceed the kernel grid (at most ", kInt32Max, ")");
  TORCH_CHECK(N <= kInt32Max, op, ": N=", N, " exceeds ", kInt32Max, " tokens a row");
  return n;
}

// keep int64 [B] and cu_seqlens int32 [B+1]: device, dtype and shape (no sync).
void check_varlen_meta(const char* op, const at::Tensor& x, const at::Tensor& keep, const at::Tensor& cu_seqlens) {
  const int64_t B = x.size(0);
  check_cuda(op, "keep", keep, x.device());
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == B, op, ": keep must be [B=", B, "], got ", keep.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kLong, op, ": keep must be int64, got ", keep.scalar_type());
  check_cu_seqlens_meta(op, cu_seqlens, x);
  TORCH_CHECK(cu_seqlens.numel() == B + 1, op, ": cu_seqlens must have B+1=", B + 1, " entries, got ",
              cu_seqlens.numel());
}

// Value checks (value checks on only: one device-to-host copy of keep and cu_seqlens, a sync):
// 0 <= keep[b] <= n, cu_seqlens starts at 0, row b has num_prefix + keep[b] + has_fuse rows and
// the last ends at `total`.
void check_varlen_values(const char* op, const at::Tensor& x, const at::Tensor& keep, const at::Tensor& cu_seqlens,
                         int64_t n, int64_t num_prefix, bool has_fuse, int64_t total) {
  const int64_t B = x.size(0);
  const at::Tensor keep_h = keep.to(at::kCPU).contiguous();
  const at::Tensor cu_h = cu_seqlens.to(at::kCPU).contiguous();
  const int64_t* kp = keep_h.data_ptr<int64_t>();
  const int32_t* cp = cu_h.data_ptr<int32_t>();
  TORCH_CHECK(cp[0] == 0, op, ": cu_seqlens must start at 0, got ", cp[0]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(kp[b] >= 0 && kp[b] <= n, op, ": keep[", b, "]=", kp[b], " must be in [0, N - num_prefix=", n, "]");
    const int64_t len = int64_t(cp[b + 1]) - cp[b];
    const int64_t want = num_prefix + kp[b] + (has_fuse ? 1 : 0);
    TORCH_CHECK(len == want, op, ": sequence ", b, " has cu_seqlens length ", len, ", expected num_prefix + keep[b]",
                has_fuse ? " + 1" : "", " = ", want);
  }
  TORCH_CHECK(int64_t(cp[B]) == total, op, ": cu_seqlens must end at total=", total, ", got ", cp[B]);
}

// Entries of indices implied by total rows: total - B * (num_prefix + has_fuse), checked >= 0.
int64_t kept_from_total(const char* op, int64_t total, int64_t B, int64_t num_prefix, bool has_fuse) {
  const int64_t extra = num_prefix + (has_fuse ? 1 : 0);
  TORCH_CHECK(total >= B * extra, op, ": total=", total, " is smaller than B * (num_prefix + fused token) = ",
              B * extra);
  return total - B * extra;
}

SelectShape make_shape(const at::Tensor& x, const at::Tensor& scores, int64_t num_prefix, int64_t k, int fuse,
                       const char* op) {
  SelectShape s{};
  s.B = x.size(0);
  s.N = x.size(1);
  s.D = x.size(2);
  s.num_prefix = num_prefix;
  s.k = k;
  s.keep = nullptr;
  s.cu_seqlens = nullptr;
  s.has_fuse = fuse != 0;
  s.fuse_mean = fuse == 2;
  s.x_dtype = dtype_code(op, "x", x);
  s.scores_dtype = dtype_code(op, "scores", scores);
  return s;
}

SelectScratch make_scratch(const at::TensorOptions& opt, int64_t B, int64_t n, bool with_dot, int64_t kept_tmp,
                           std::vector<at::Tensor>& keep_alive, int64_t fuse_partial = 0) {
  keep_alive.push_back(at::empty({B, n}, opt.dtype(at::kInt)));
  keep_alive.push_back(at::empty({B, n}, opt.dtype(at::kFloat)));
  keep_alive.push_back(at::empty({with_dot ? B : 0, n}, opt.dtype(at::kFloat)));
  keep_alive.push_back(at::empty({B}, opt.dtype(at::kFloat)));
  keep_alive.push_back(at::empty({kept_tmp}, opt.dtype(at::kLong)));
  keep_alive.push_back(at::empty({fuse_partial}, opt.dtype(at::kFloat)));
  SelectScratch w{};
  w.slot = keep_alive[0].data_ptr<int32_t>();
  w.coef = keep_alive[1].data_ptr<float>();
  w.dot = with_dot ? keep_alive[2].data_ptr<float>() : nullptr;
  w.dropped_sum = keep_alive[3].data_ptr<float>();
  w.kept_tmp = kept_tmp > 0 ? keep_alive[4].data_ptr<int64_t>() : nullptr;
  w.fuse_partial = fuse_partial > 0 ? keep_alive[5].data_ptr<float>() : nullptr;
  return w;
}

std::tuple<at::Tensor, at::Tensor> select_tokens_cuda(const at::Tensor& x_in, const at::Tensor& scores_in, int64_t k,
                                                      int64_t num_prefix, std::string_view fuse,
                                                      std::string_view order) {
  const char* op = "bus_kernels_C::select_tokens";
  const int64_t n = check_x_scores(op, x_in, scores_in, num_prefix);
  const int f = fuse_code(op, fuse);
  TORCH_CHECK(order == "index" || order == "score", op, ": order='", std::string(order),
              "' must be 'index' or 'score'");
  TORCH_CHECK(k >= 1 && k <= n, op, ": k=", k, " must be in [1, N - num_prefix=", n, "]");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const bool score_order = order == "score";
  SelectShape s = make_shape(x, scores, num_prefix, k, f, op);
  const int64_t rows = num_prefix + k + (s.has_fuse ? 1 : 0);
  s.out_rows = s.B * rows;
  s.num_kept = s.B * k;
  at::Tensor tokens = at::empty({s.B, rows, s.D}, x.options());
  at::Tensor indices = at::empty({s.B, k}, x.options().dtype(at::kLong));
  std::vector<at::Tensor> scratch;
  const SelectScratch w = make_scratch(x.options(), s.B, n, false, score_order ? s.B * k : 0, scratch,
                                       select_gather_partial_floats(s));
  check_launch(op, launch_select_forward(s, x.data_ptr(), scores.data_ptr(), tokens.data_ptr(),
                                         indices.data_ptr<int64_t>(), score_order, w,
                                         c10::cuda::getCurrentCUDAStream()));
  return {tokens, indices};
}

std::tuple<at::Tensor, at::Tensor> select_tokens_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                               const at::Tensor& scores_in,
                                                               const at::Tensor& indices_in, int64_t num_prefix,
                                                               std::string_view fuse) {
  const char* op = "bus_kernels_C::select_tokens_backward";
  const int64_t n = check_x_scores(op, x_in, scores_in, num_prefix);
  const int f = fuse_code(op, fuse);
  const int64_t B = x_in.size(0), D = x_in.size(2);
  check_cuda(op, "indices", indices_in, x_in.device());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices_in.scalar_type());
  TORCH_CHECK(indices_in.dim() == 2 && indices_in.size(0) == B && indices_in.size(1) <= n, op,
              ": indices must be [B=", B, ", k <= N - num_prefix=", n, "], got ", indices_in.sizes());
  const int64_t k = indices_in.size(1);
  const int64_t rows = num_prefix + k + (f != 0 ? 1 : 0);
  check_cuda(op, "grad", grad_in, x_in.device());
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()), op, ": grad must be floating, got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == rows && grad_in.size(2) == D, op,
              ": grad must be [B=", B, ", num_prefix + k + (fuse != 'none')=", rows, ", D=", D, "], got ",
              grad_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  SelectShape s = make_shape(x, scores, num_prefix, k, f, op);
  s.out_rows = B * rows;
  s.num_kept = B * k;
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_scores = at::empty(scores.sizes(), scores.options());
  std::vector<at::Tensor> scratch;
  const SelectScratch w = make_scratch(x.options(), B, n, true, 0, scratch);
  check_launch(op, launch_select_backward(s, grad.data_ptr(), x.data_ptr(), scores.data_ptr(),
                                          indices.data_ptr<int64_t>(), grad_x.data_ptr(), grad_scores.data_ptr(), w,
                                          c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_scores};
}

std::tuple<at::Tensor, at::Tensor> select_tokens_varlen_cuda(const at::Tensor& x_in, const at::Tensor& scores_in,
                                                             const at::Tensor& keep_in, const at::Tensor& cu_in,
                                                             int64_t total, int64_t num_prefix, std::string_view fuse) {
  const char* op = "bus_kernels_C::select_tokens_varlen";
  const int64_t n = check_x_scores(op, x_in, scores_in, num_prefix);
  const int f = fuse_code(op, fuse);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_varlen_meta(op, x_in, keep_in, cu_in);
  const int64_t kept = kept_from_total(op, total, x_in.size(0), num_prefix, f != 0);
  if (cuda_value_checks()) check_varlen_values(op, x_in, keep_in, cu_in, n, num_prefix, f != 0, total);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const at::Tensor cu = cu_in.contiguous();
  SelectShape s = make_shape(x, scores, num_prefix, 0, f, op);
  s.keep = keep.data_ptr<int64_t>();
  s.cu_seqlens = cu.data_ptr<int32_t>();
  s.out_rows = total;
  s.num_kept = kept;
  at::Tensor tokens = at::empty({total, s.D}, x.options());
  at::Tensor indices = at::empty({kept}, x.options().dtype(at::kLong));
  std::vector<at::Tensor> scratch;
  const SelectScratch w = make_scratch(x.options(), s.B, n, false, 0, scratch, select_gather_partial_floats(s));
  check_launch(op, launch_select_forward(s, x.data_ptr(), scores.data_ptr(), tokens.data_ptr(),
                                         indices.data_ptr<int64_t>(), /*score_order=*/false, w,
                                         c10::cuda::getCurrentCUDAStream()));
  return {tokens, indices};
}

std::tuple<at::Tensor, at::Tensor> select_tokens_varlen_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scores_in, const at::Tensor& indices_in,
    const at::Tensor& keep_in, const at::Tensor& cu_in, int64_t num_prefix, std::string_view fuse) {
  const char* op = "bus_kernels_C::select_tokens_varlen_backward";
  const int64_t n = check_x_scores(op, x_in, scores_in, num_prefix);
  const int f = fuse_code(op, fuse);
  const int64_t D = x_in.size(2);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_varlen_meta(op, x_in, keep_in, cu_in);
  check_cuda(op, "grad", grad_in, x_in.device());
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()), op, ": grad must be floating, got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(1) == D, op, ": grad must be [total, D=", D, "], got ",
              grad_in.sizes());
  // The sizes come from the tensors (no sync): total rows of grad, keep.sum() entries of indices.
  const int64_t total = grad_in.size(0);
  const int64_t kept = kept_from_total(op, total, x_in.size(0), num_prefix, f != 0);
  check_cuda(op, "indices", indices_in, x_in.device());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices_in.scalar_type());
  TORCH_CHECK(indices_in.dim() == 1 && indices_in.size(0) == kept, op,
              ": indices must be [keep.sum() = total - B * (num_prefix + fused)=", kept, "], got ",
              indices_in.sizes());
  if (cuda_value_checks()) check_varlen_values(op, x_in, keep_in, cu_in, n, num_prefix, f != 0, total);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const at::Tensor cu = cu_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  SelectShape s = make_shape(x, scores, num_prefix, 0, f, op);
  s.keep = keep.data_ptr<int64_t>();
  s.cu_seqlens = cu.data_ptr<int32_t>();
  s.out_rows = total;
  s.num_kept = kept;
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_scores = at::empty(scores.sizes(), scores.options());
  std::vector<at::Tensor> scratch;
  const SelectScratch w = make_scratch(x.options(), s.B, n, true, 0, scratch);
  check_launch(op, launch_select_backward(s, grad.data_ptr(), x.data_ptr(), scores.data_ptr(),
                                          indices.data_ptr<int64_t>(), grad_x.data_ptr(), grad_scores.data_ptr(), w,
                                          c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(bus_kernels_C, CUDA, m) {
  m.impl("select_tokens", &select_tokens_cuda);
  m.impl("select_tokens_backward", &select_tokens_backward_cuda);
  m.impl("select_tokens_varlen", &select_tokens_varlen_cuda);
  m.impl("select_tokens_varlen_backward", &select_tokens_varlen_backward_cuda);
}

}  // namespace bus_kernels
