#pragma once
#include <ATen/ATen.h>

namespace curvkern {

// out = a + scalar * b (STREAM triad), in one OpenMP parallel region.
void stream_triad_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scalar);

}  // namespace curvkern
