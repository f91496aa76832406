// dsv4._C: operator schemas of the dsv4 namespace + the Python module init.
//
// Every op is declared here once (one TORCH_LIBRARY per namespace); each op family's .cpp in
// this directory adds its CUDA implementation with TORCH_LIBRARY_IMPL(dsv4, CUDA, m). The CPU
// implementation (the pure-PyTorch reference) and the fake (shape-only) implementation are
// registered from Python in python/dsv4/ops/_ext.py.
//
// Only <torch/library.h> and <Python.h> are included (no torch/extension.h, no pybind11):
// the extension exposes ops, not Python functions, and this keeps compile times low.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dsv4, m) {
  // y = weight * (x * rsqrt(mean(x^2, -1) + eps)), fp32 math; architecture.md §10.1.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

// `import dsv4._C` loads this shared library, which runs the static registrations above.
// The module itself is empty (the pattern of PyTorch's "custom C++ and CUDA operators" guide).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "dsv4._C",                                          // m_name
      "dsv4 compiled kernels (ops live in torch.ops.dsv4)",  // m_doc
      -1,                                                 // m_size
      nullptr,                                            // m_methods
  };
  return PyModule_Create(&module_def);
}
