// Memory-bandwidth probe: the in-place STREAM-style update a += scalar * b.
// The benchmarks time it on arrays larger than the last-level cache to get the machine's
// achievable bandwidth, the ceiling every kernel's GB/s is reported against. In place, like an
// optimizer step: 2 reads + 1 write per element and no hidden write-allocate read, so the bytes
// it counts are the bytes it moves.
#include "bandwidth.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include "cpu_dispatch.h"

namespace curvkern {

namespace {

// The triad's OpenMP region, stamped by macro (why: csrc/cpu_dispatch.h): axpy_<dtype>_<isa> for fp32 and fp64
// and every ISA, and per dtype run_axpy, which runs the active ISA's.
#define CURVKERN_AXPY_REGION(isa, target, T, dtype)                                               \
  target void axpy_##dtype##_##isa(T* __restrict a, const T* __restrict b, T scalar, int64_t n) { \
    _Pragma("omp parallel for simd schedule(static) num_threads(at::get_num_threads())")          \
    for (int64_t i = 0; i < n; ++i) a[i] += scalar * b[i];                                        \
  }
#define CURVKERN_AXPY_KERNEL(T, dtype)                  \
  CURVKERN_FOR_EACH_ISA(CURVKERN_AXPY_REGION, T, dtype) \
  void run_axpy(T* a, const T* b, T scalar, int64_t n) { CURVKERN_CALL_ACTIVE_ISA(axpy_##dtype, a, b, scalar, n); }

CURVKERN_AXPY_KERNEL(float, f32)
CURVKERN_AXPY_KERNEL(double, f64)
#undef CURVKERN_AXPY_KERNEL
#undef CURVKERN_AXPY_REGION

}  // namespace

void stream_axpy_(at::Tensor& a, const at::Tensor& b, double scalar) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "curvkern::stream_axpy_: expected CPU tensors, got a on ",
              a.device(), " and b on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "curvkern::stream_axpy_: a and b must share one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "curvkern::stream_axpy_: expected float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes(), "curvkern::stream_axpy_: a and b must have one shape, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(),
              "curvkern::stream_axpy_: a bandwidth probe needs contiguous tensors");
  if (a.scalar_type() == at::kFloat) {
    run_axpy(a.data_ptr<float>(), b.const_data_ptr<float>(), static_cast<float>(scalar), a.numel());
  } else {
    run_axpy(a.data_ptr<double>(), b.const_data_ptr<double>(), scalar, a.numel());
  }
}

}  // namespace curvkern
