// dsv4._C: the dsv4 operator namespace + the Python module init.
//
// The namespace is opened here (one TORCH_LIBRARY per namespace). Each op family's .cpp in this
// directory declares its schemas with TORCH_LIBRARY_FRAGMENT(dsv4, m) and adds its CUDA
// implementation with TORCH_LIBRARY_IMPL(dsv4, CUDA, m). The CPU implementation (the
// pure-PyTorch reference) and the fake (shape-only) implementation are registered from the
// family's Python module (python/dsv4/ops/<family>.py) with the same schema string.
//
// Only <torch/library.h> and <Python.h> are included (no torch/extension.h, no pybind11):
// the extension exposes ops, not Python functions, and this keeps compile times low.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dsv4, m) {}

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
