#pragma once
#include <ATen/ATen.h>

namespace curvkern {

// a += scalar * b in place, in one OpenMP parallel region.
void stream_axpy_(at::Tensor& a, const at::Tensor& b, double scalar);

}  // namespace curvkern
