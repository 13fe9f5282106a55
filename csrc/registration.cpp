// The curvkern operator library: schemas and their CPU kernels.
// Fake (meta) implementations live in curvkern/_ops.py so torch.compile can trace every op.
#include <Python.h>
#include <torch/library.h>

#include "bandwidth.h"
#include "ce/cross_entropy.h"

// A real Python module, so `import curvkern._C` loads this library and runs TORCH_LIBRARY.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(curvkern, m) {
  m.def("stream_axpy_(Tensor(a!) a, Tensor b, float scalar) -> ()");
  m.def("cross_entropy_forward(Tensor logits, Tensor target, int ignore_index, float label_smoothing) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor logits, Tensor target, Tensor lse, Tensor grad_scale, int ignore_index, "
        "float label_smoothing) -> Tensor");
  m.def("cross_entropy_hvp_(Tensor logits, Tensor target, Tensor u, Tensor scale, int ignore_index, "
        "float label_smoothing, int shift_period, Tensor(a!) out) -> Tensor");
}

TORCH_LIBRARY_IMPL(curvkern, CPU, m) {
  m.impl("stream_axpy_", &curvkern::stream_axpy_);
  m.impl("cross_entropy_forward", &curvkern::cross_entropy_forward);
  m.impl("cross_entropy_backward", &curvkern::cross_entropy_backward);
  m.impl("cross_entropy_hvp_", &curvkern::cross_entropy_hvp_);
}
