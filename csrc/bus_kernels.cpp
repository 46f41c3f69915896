// Registration of every compiled op in one place. Kernels live in cpu/*.cpp and cuda/*.{cpp,cu}
// and attach to these schemas with TORCH_LIBRARY_IMPL, so the dispatcher routes by device.
#include <Python.h>
#include <torch/library.h>

// `import bus_kernels._C` only has to load this library, which runs the static registrations
// below; the module itself is empty (no pybind11, no Python API to keep in sync).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

#include <atomic>

#include "common.h"

namespace bus_kernels {
namespace {
std::atomic<bool> g_cuda_value_checks{false};
void set_value_checks(bool on) { g_cuda_value_checks.store(on); }
bool get_value_checks() { return g_cuda_value_checks.load(); }
}  // namespace
bool cuda_value_checks() { return g_cuda_value_checks.load(); }
}  // namespace bus_kernels

TORCH_LIBRARY(bus_kernels_C, m) {
  // Value checks of the CUDA wrappers (keep / cu_seqlens read on the host: one sync each).
  m.def("set_value_checks(bool on) -> ()", &bus_kernels::set_value_checks);
  m.def("value_checks() -> bool", &bus_kernels::get_value_checks);

  // x [B, L, ...] -> [total, ...]: row cu_seqlens[b] + i is x[b, i].
  m.def("pack(Tensor x, Tensor cu_seqlens, int total) -> Tensor");
  // packed [total, ...] -> zero-padded [B, max_seqlen, ...].
  m.def("unpack(Tensor packed, Tensor cu_seqlens, int max_seqlen) -> Tensor");

  // The ops below mirror bus_kernels.ops.* (same arguments, minus `backend`); outputs follow the
  // references in bus_kernels/reference: dtypes, shapes and the contract's tie-break.
  // fuse is "none" | "sum" | "mean"; order is "index" | "score".
  // q [B,H,T,d], k [B,H,N,d] -> (scores fp32 [B,N], lse fp32 [B,H,T]).
  m.def("relevance_scores(Tensor q, Tensor k, float scale, Tensor? q_mask) -> (Tensor, Tensor)");
  m.def(
      "relevance_scores_backward(Tensor grad, Tensor q, Tensor k, Tensor lse, float scale, "
      "Tensor? q_mask) -> (Tensor, Tensor)");
  // x [B,N,D], scores [B,N-P] -> (tokens [B,P+k+(fuse!=none),D], indices int64 [B,k]).
  m.def(
      "select_tokens(Tensor x, Tensor scores, int k, int num_prefix, str fuse, str order) "
      "-> (Tensor, Tensor)");
  m.def(
      "select_tokens_backward(Tensor grad, Tensor x, Tensor scores, Tensor indices, int num_prefix, "
      "str fuse) -> (Tensor, Tensor)");
  // keep int64 [B], cu_seqlens int32 [B+1] -> (tokens [total,D], indices int64 [keep.sum()]).
  m.def(
      "select_tokens_varlen(Tensor x, Tensor scores, Tensor keep, Tensor cu_seqlens, int total, "
      "int num_prefix, str fuse) -> (Tensor, Tensor)");
  m.def(
      "select_tokens_varlen_backward(Tensor grad, Tensor x, Tensor scores, Tensor indices, "
      "Tensor keep, Tensor cu_seqlens, int num_prefix, str fuse) -> (Tensor, Tensor)");
  // q, k, v [total,H,d] -> (out [total,H,d], lse fp32 [total,H]); the backward returns
  // (dq, dk, dv, d key_bias), the last an empty [0] tensor when key_bias is None.
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, "
      "float scale, bool causal, Tensor? key_bias) -> (Tensor, Tensor)");
  m.def(
      "varlen_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor cu_seqlens, int max_seqlen, float scale, bool causal, "
      "Tensor? key_bias) -> (Tensor, Tensor, Tensor, Tensor)");
}
