// The curvkern operator library: schemas and their CPU kernels.
// Fake (meta) implementations live in curvkern/_ops.py so torch.compile can trace every op.
#include <Python.h>
#include <torch/library.h>

#include "bandwidth.h"

// A real Python module, so `import curvkern._C` loads this library and runs TORCH_LIBRARY.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(curvkern, m) {
  m.def("stream_axpy_(Tensor(a!) a, Tensor b, float scalar) -> ()");
}

TORCH_LIBRARY_IMPL(curvkern, CPU, m) {
  m.impl("stream_axpy_", &curvkern::stream_axpy_);
}
