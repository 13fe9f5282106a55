// Memory-bandwidth probe: the STREAM triad out = a + scalar * b.
// The benchmarks time it on arrays larger than the last-level cache to get the machine's
// achievable bandwidth, the ceiling every kernel's GB/s is reported against.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include "bandwidth.h"

namespace curvkern {

namespace {

template <typename scalar_t>
void triad_kernel(scalar_t* __restrict out, const scalar_t* __restrict a,
                  const scalar_t* __restrict b, scalar_t scalar, int64_t n) {
  // One static split: each thread streams one contiguous range, so the probe measures DRAM,
  // not scheduling.
#pragma omp parallel for simd schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < n; ++i) {
    out[i] = a[i] + scalar * b[i];
  }
}

}  // namespace

void stream_triad_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scalar) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(),
              "curvkern::stream_triad_: expected CPU tensors, got out on ", out.device(), ", a on ",
              a.device(), ", b on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == out.scalar_type(),
              "curvkern::stream_triad_: out, a and b must share one dtype, got ", out.scalar_type(),
              ", ", a.scalar_type(), ", ", b.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "curvkern::stream_triad_: expected float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes() && a.sizes() == out.sizes(),
              "curvkern::stream_triad_: out, a and b must have one shape, got ", out.sizes(), ", ",
              a.sizes(), ", ", b.sizes());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && out.is_contiguous(),
              "curvkern::stream_triad_: a bandwidth probe needs contiguous tensors");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "stream_triad_", [&] {
    triad_kernel<scalar_t>(out.data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                           b.const_data_ptr<scalar_t>(), static_cast<scalar_t>(scalar), a.numel());
  });
}

}  // namespace curvkern
