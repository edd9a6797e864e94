// hyperkern._C: the one place where every hyperkern op schema is defined.
// Implementations register per dispatch key in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA);
// fake (meta) kernels and autograd are registered from Python (hyperkern/ops/_cpp_*.py).
// Inputs reaching these kernels were validated by hyperkern.ops (shapes, dtypes, devices); the
// kernels only TORCH_CHECK what would otherwise be memory-unsafe.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing hyperkern._C runs the static registrations below; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hyperkern, m) {
  // ---- rank-1 linear (csrc/cpu/rank1_linear.cpp, csrc/cuda/rank1_linear.cu) ----
  // ---- rank-1 conv2d (csrc/cpu/rank1_conv.cpp, csrc/cuda/rank1_conv.cu) ----
}
