// HysteroGrad on the CPU: pass A, the scalar stage and pass B of docs/hysterograd.md ("The fused kernels"), each
// pass one OpenMP region over the chunk table of the whole group.
//
// Rounding mirrors the eager reference (curvkern/optim/hysterograd/eager.py) operation by operation,
// including where torch's vectorized CPU kernels fuse: `G.mul_(β).addcmul_(g, g, value=c)` is
// fma(c·g, g, G·β). Nothing else is contracted (the library is built with -ffp-contract=off).
#include "optim/hysterograd.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_dispatch.h"
#include "multi_tensor.h"

namespace curvkern {

namespace {

// The scalar stage's constants: eager.py's CLIP_EPS and ENERGY_EPS (tests/test_cpp_constants.py checks that
// they agree).
constexpr double kClipEps = 1e-6;    // in the clip factor min(1, C / (N + kClipEps))
constexpr double kEnergyEps = 1e-8;  // in the adaptive barrier h·(E + kEnergyEps)

// What pass A reads and writes: per tensor (the chunk table's index) its gradient and G, per segment
// its Σu², and the step's constants in the state type S.
template <typename P>
struct PassA {
  using S = at::opmath_type<P>;
  const ChunkTable& table;
  std::vector<const P*> grads;
  std::vector<S*> metrics;
  double* partials;
  S beta, scaled, epsilon;  // β, (1−β)·s, ε
};

// What pass B reads and writes: per tensor its parameter, gradient and G, and the step's constants.
template <typename P>
struct PassB {
  using S = at::opmath_type<P>;
  const ChunkTable& table;
  std::vector<P*> params;
  std::vector<const P*> grads;
  std::vector<const S*> metrics;
  S epsilon, neg_step;  // ε, −η·k
};

template <typename P, typename S>
CURVKERN_INLINE S preconditioned_step(const P* grad, S* metric, int64_t i, S beta, S scaled, S epsilon) {
  const S g = load(grad, i);
  const S updated = std::fma(scaled * g, g, metric[i] * beta);
  metric[i] = updated;
  return g / (std::sqrt(updated) + epsilon);
}

// Σu² of one segment, updating its G.
template <typename P, typename S>
CURVKERN_INLINE double pass_a_segment(const P* grad, S* metric, int64_t n, S beta, S scaled, S epsilon) {
  LaneSums<1, S> sums;
  auto prefetch = [&](int64_t ahead) CURVKERN_INLINE_LAMBDA {
    prefetch_read(grad + ahead);
    prefetch_write(metric + ahead);
  };
  stream_and_sum<kLanes>(n, sums, prefetch, [&](int64_t i, auto& acc, int l) CURVKERN_INLINE_LAMBDA {
    const S u = preconditioned_step(grad, metric, i, beta, scaled, epsilon);
    acc[0][l] += u * u;
  });
  double total;
  sums.fold(&total);
  return total;
}

template <typename P>
CURVKERN_INLINE void pass_a_unit(const PassA<P>& pass, int64_t unit) {
  for_each_segment(pass.table, unit, [&](int64_t s, const Segment& seg) CURVKERN_INLINE_LAMBDA {
    pass.partials[s] = pass_a_segment(pass.grads[seg.tensor] + seg.start, pass.metrics[seg.tensor] + seg.start,
                                      seg.length, pass.beta, pass.scaled, pass.epsilon);
  });
}

template <typename P, typename S>
CURVKERN_INLINE void pass_b_segment(P* param, const P* grad, const S* metric, int64_t n, S epsilon, S neg_step) {
  auto prefetch = [&](int64_t ahead) CURVKERN_INLINE_LAMBDA {
    prefetch_read(grad + ahead);
    prefetch_read(metric + ahead);
    prefetch_write(param + ahead);
  };
  stream_in_blocks(n, prefetch, [&](int64_t i, int) CURVKERN_INLINE_LAMBDA {
    const S g = load(grad, i);
    const S delta = g / (std::sqrt(metric[i]) + epsilon) * neg_step;
    store(param, i, load(param, i) + delta);
  });
}

template <typename P>
CURVKERN_INLINE void pass_b_unit(const PassB<P>& pass, int64_t unit) {
  for_each_segment(pass.table, unit, [&](int64_t, const Segment& seg) CURVKERN_INLINE_LAMBDA {
    pass_b_segment(pass.params[seg.tensor] + seg.start, pass.grads[seg.tensor] + seg.start,
                   pass.metrics[seg.tensor] + seg.start, seg.length, pass.epsilon, pass.neg_step);
  });
}

// The passes' OpenMP regions, stamped by macro (why: csrc/cpu_dispatch.h). CURVKERN_FOR_EACH_DTYPE below
// defines hysterograd_pass_a_<dtype>_<isa> and hysterograd_pass_b_<dtype>_<isa> for every dtype and ISA, each
// one region over all work units, and per dtype run_pass_a and run_pass_b, which run the active ISA's.
// Partials land per segment, so the per-tensor sums do not depend on the thread count.
#define CURVKERN_HYSTEROGRAD_REGIONS(isa, target, P, dtype)                         \
  target void hysterograd_pass_a_##dtype##_##isa(const PassA<P>& pass) {            \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())") \
    for (int64_t u = 0; u < pass.table.num_units(); ++u) pass_a_unit(pass, u);      \
  }                                                                                 \
  target void hysterograd_pass_b_##dtype##_##isa(const PassB<P>& pass) {            \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())") \
    for (int64_t u = 0; u < pass.table.num_units(); ++u) pass_b_unit(pass, u);      \
  }
#define CURVKERN_HYSTEROGRAD_KERNELS(P, dtype)                                                          \
  CURVKERN_FOR_EACH_ISA(CURVKERN_HYSTEROGRAD_REGIONS, P, dtype)                                         \
  void run_pass_a(const PassA<P>& pass) { CURVKERN_CALL_ACTIVE_ISA(hysterograd_pass_a_##dtype, pass); } \
  void run_pass_b(const PassB<P>& pass) { CURVKERN_CALL_ACTIVE_ISA(hysterograd_pass_b_##dtype, pass); }

CURVKERN_FOR_EACH_DTYPE(CURVKERN_HYSTEROGRAD_KERNELS)
#undef CURVKERN_HYSTEROGRAD_KERNELS
#undef CURVKERN_HYSTEROGRAD_REGIONS

template <typename T>
T& scalar_ref(at::Tensor& t) {
  return *t.data_ptr<T>();
}

// accumulator += per_tensor_sum as torch does it: in the promoted dtype of the two, stored in the
// accumulator's.
template <typename A, typename S>
A add_promoted(A accumulator, S value) {
  using C = std::conditional_t<(sizeof(A) >= sizeof(S)), A, S>;
  return static_cast<A>(static_cast<C>(accumulator) + static_cast<C>(value));
}

void check_group_scalar(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 0, op, ": ", name, " must be a 0-dim CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " like the accumulator, got ",
              t.scalar_type());
}

}  // namespace

void hysterograd_pass_a_(at::TensorList grads, at::TensorList metrics, at::Tensor& accumulator, double beta,
                         double epsilon, double metric_scale) {
  constexpr const char* op = "curvkern::hysterograd_pass_a_";
  TORCH_CHECK(grads.size() == metrics.size(), op, ": got ", grads.size(), " gradients but ", metrics.size(),
              " metrics");
  TORCH_CHECK(accumulator.device().is_cpu() && accumulator.dim() == 0 &&
                  (accumulator.scalar_type() == at::kFloat || accumulator.scalar_type() == at::kDouble),
              op, ": the accumulator must be a 0-dim float32 or float64 CPU tensor");
  if (grads.empty()) return;
  const at::ScalarType dtype = common_dtype(grads, op, "gradients");
  StreamableTensors layout(op);
  std::vector<at::Tensor> grad_views, metric_views;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_state(metrics[i], dtype, op, "G");
    auto views = layout.prepare(i, {metrics[i]}, {grads[i]});
    metric_views.push_back(views[0]);
    grad_views.push_back(views[1]);
  }
  const ChunkTable table(numels_of(grads), kChunkElements);
  std::vector<double> partials(table.num_segments());
  with_dtype(dtype, op, "gradients", [&](auto tag) {
    using P = typename decltype(tag)::type;
    using S = at::opmath_type<P>;
    // (1−β)·s is formed in double and rounded once, as torch rounds the original's Python float.
    PassA<P> pass{.table = table,
                  .partials = partials.data(),
                  .beta = static_cast<S>(beta),
                  .scaled = static_cast<S>((1 - beta) * metric_scale),
                  .epsilon = static_cast<S>(epsilon)};
    for (size_t i = 0; i < grads.size(); ++i) {
      pass.grads.push_back(grad_views[i].const_data_ptr<P>());
      pass.metrics.push_back(metric_views[i].data_ptr<S>());
    }
    run_pass_a(pass);
    layout.write_back();
    const std::vector<double> sums = table.reduce_per_tensor(partials, 1);
    auto accumulate = [&](auto& acc) {
      // Each tensor's Σu² is rounded to the state dtype, then added in group order (eager's `acc += s`).
      for (double sum : sums) acc = add_promoted(acc, static_cast<S>(sum));
    };
    if (accumulator.scalar_type() == at::kFloat) {
      accumulate(scalar_ref<float>(accumulator));
    } else {
      accumulate(scalar_ref<double>(accumulator));
    }
  });
}

namespace {

// NaN-propagating clamp to [0, 1], as torch.clamp.
template <typename A>
A clamp01(A x) {
  return x < A(0) ? A(0) : (x > A(1) ? A(1) : x);
}

// torch's own sqrt of one scalar: its fp32 CPU sqrt (MKL's vector math) is not always correctly
// rounded, and for fp64 parameters these fp32 scalars scale every update, so one ulp apart here is
// 1e-10 apart in the parameters. The per-element sqrt of the passes stays the exact instruction.
template <typename A>
A torch_sqrt(A x) {
  const at::Tensor t = at::scalar_tensor(x, c10::CppTypeToScalarType<A>::value);
  return *at::sqrt(t).template const_data_ptr<A>();
}

template <typename A>
std::tuple<at::Tensor, at::Tensor> scalar_stage(const at::Tensor& accumulator, at::Tensor& tau, at::Tensor& temp,
                                                at::Tensor& energy, double lr, double stiffening_factor, double beta,
                                                double cooling_rate, bool adaptive_threshold,
                                                std::optional<double> grad_clip, double hysteresis_scale) {
  // Every Python float meeting a 0-dim tensor of dtype A is rounded to A first, as in torch.
  const A norm = torch_sqrt(*accumulator.const_data_ptr<A>());
  A clip_scale = A(1);
  double neg_step_size = -lr;
  if (grad_clip.has_value() && *grad_clip != 0.0) {
    // `C / tensor` in Python is torch's `reciprocal(tensor) * C`: two roundings, mirrored here.
    const A ratio = A(1) / (norm + static_cast<A>(kClipEps)) * static_cast<A>(*grad_clip);
    if (ratio < A(1)) {  // a NaN ratio keeps k = 1, as min(1, ratio) does in the original
      clip_scale = ratio;
      neg_step_size = static_cast<double>(static_cast<A>(-lr) * ratio);
    }
  }
  const A g_norm = norm * clip_scale;
  A& t = scalar_ref<A>(tau);
  A& temperature = scalar_ref<A>(temp);
  A& e = scalar_ref<A>(energy);
  t = t + static_cast<A>(lr) * g_norm;
  temperature = temperature * static_cast<A>(cooling_rate);
  e = static_cast<A>(beta) * e + static_cast<A>(1 - beta) * g_norm;
  const A cold_factor = A(1) - clamp01(temperature);
  A barrier = static_cast<A>(stiffening_factor) * torch_sqrt(t) * cold_factor * static_cast<A>(hysteresis_scale);
  if (adaptive_threshold) barrier = barrier * (e + static_cast<A>(kEnergyEps));
  const bool liquid = g_norm > barrier;
  at::Tensor stats = at::empty({3}, accumulator.options());
  A* out = stats.data_ptr<A>();
  out[0] = g_norm;
  out[1] = barrier;
  out[2] = liquid ? A(1) : A(0);
  return {stats, at::scalar_tensor(neg_step_size, accumulator.options().dtype(at::kDouble))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hysterograd_scalars_(const at::Tensor& accumulator, at::Tensor& tau,
                                                        at::Tensor& temp, at::Tensor& energy, const at::Tensor& lr,
                                                        double stiffening_factor, double beta, double cooling_rate,
                                                        bool adaptive_threshold, std::optional<double> grad_clip,
                                                        double hysteresis_scale) {
  constexpr const char* op = "curvkern::hysterograd_scalars_";
  const at::ScalarType dtype = accumulator.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": expected float32 or float64 scalars, got ", dtype);
  check_group_scalar(accumulator, op, "accumulator", dtype);
  check_group_scalar(tau, op, "group_tau", dtype);
  check_group_scalar(temp, op, "group_temp", dtype);
  check_group_scalar(energy, op, "avg_energy", dtype);
  const double learning_rate_value = learning_rate(lr, op);
  if (dtype == at::kFloat) {
    return scalar_stage<float>(accumulator, tau, temp, energy, learning_rate_value, stiffening_factor, beta,
                               cooling_rate, adaptive_threshold, grad_clip, hysteresis_scale);
  }
  return scalar_stage<double>(accumulator, tau, temp, energy, learning_rate_value, stiffening_factor, beta,
                              cooling_rate, adaptive_threshold, grad_clip, hysteresis_scale);
}

void hysterograd_pass_b_(at::TensorList params, at::TensorList grads, at::TensorList metrics, const at::Tensor& stats,
                         const at::Tensor& neg_step_size, double epsilon) {
  constexpr const char* op = "curvkern::hysterograd_pass_b_";
  TORCH_CHECK(params.size() == grads.size() && params.size() == metrics.size(), op, ": got ", params.size(),
              " parameters, ", grads.size(), " gradients and ", metrics.size(), " metrics");
  TORCH_CHECK(stats.device().is_cpu() && stats.dim() == 1 && stats.numel() == 3, op,
              ": stats must be the scalar stage's [N̂, h, gate] on the CPU");
  TORCH_CHECK(neg_step_size.device().is_cpu() && neg_step_size.dim() == 0 && neg_step_size.scalar_type() == at::kDouble,
              op, ": neg_step_size must be a 0-dim float64 CPU tensor");
  if (params.empty()) return;
  const at::ScalarType dtype = common_dtype(params, op, "parameters");
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.scalar_type() == dtype, op, ": a gradient's dtype ", g.scalar_type(),
                " differs from its parameter's ", dtype);
  }
  for (const at::Tensor& m : metrics) check_state(m, dtype, op, "G");
  // The gate selects: a frozen group is not touched at all, so a NaN step never reaches p (docs/hysterograd.md, G10).
  const bool liquid =
      stats.scalar_type() == at::kDouble ? stats.const_data_ptr<double>()[2] > 0 : stats.const_data_ptr<float>()[2] > 0;
  if (!liquid) return;
  StreamableTensors layout(op);
  std::vector<at::Tensor> param_views, grad_views, metric_views;
  for (size_t i = 0; i < params.size(); ++i) {
    auto views = layout.prepare(i, {params[i]}, {grads[i], metrics[i]});
    param_views.push_back(views[0]);
    grad_views.push_back(views[1]);
    metric_views.push_back(views[2]);
  }
  const ChunkTable table(numels_of(params), kChunkElements);
  const double neg_step = *neg_step_size.const_data_ptr<double>();
  with_dtype(dtype, op, "parameters", [&](auto tag) {
    using P = typename decltype(tag)::type;
    using S = at::opmath_type<P>;
    PassB<P> pass{.table = table, .epsilon = static_cast<S>(epsilon), .neg_step = static_cast<S>(neg_step)};
    for (size_t i = 0; i < params.size(); ++i) {
      pass.params.push_back(param_views[i].data_ptr<P>());
      pass.grads.push_back(grad_views[i].const_data_ptr<P>());
      pass.metrics.push_back(metric_views[i].const_data_ptr<S>());
    }
    run_pass_b(pass);
  });
  layout.write_back();
}

}  // namespace curvkern
