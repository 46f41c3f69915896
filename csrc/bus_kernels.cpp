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

TORCH_LIBRARY(bus_kernels_C, m) {
  // x [B, L, ...] -> [total, ...]: row cu_seqlens[b] + i is x[b, i].
  m.def("pack(Tensor x, Tensor cu_seqlens, int total) -> Tensor");
  // packed [total, ...] -> zero-padded [B, max_seqlen, ...].
  m.def("unpack(Tensor packed, Tensor cu_seqlens, int max_seqlen) -> Tensor");
}
