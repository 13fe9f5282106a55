// BiostatisV6 on the CPU, scheduled for the fewest trips to memory (shared/specs/biostatis.md §8):
//
// 1. One region over all gradients: per tensor Σg² and Σ|tanh g|. They give the group gains h_G, e_G
//    and each tensor's local gains, which every update needs before any parameter moves.
// 2. The tensors in windows that fit in the last-level cache, all windows in one region. Per window:
//    a read pass over (g, m, v) for Σm'g, Σm'², Σ|m'| and Σ√v' per tensor; the scalar stage of its
//    tensors (one thread); then the update pass writing m, v, the EMAs and p, which finds g, m and v
//    still in cache. Memory traffic: g once for (1), g, m, v for the window pass, and the EMAs and p
//    in the update: 12 arrays per element instead of the 14 of two passes over the whole group.
//
// Rounding mirrors the eager reference (curvkern/optim/biostatis/eager.py) operation by operation,
// including where torch's vectorized CPU kernels fuse: `x.mul_(a).add_(g, alpha=b)` is fma(g, b, x·a)
// and `addcmul_(g, g, value=c)` is fma(c·g, g, ·). The float64 scalar stage is the eager one; the fp32
// tanh(C − c*) goes through torch's own tanh, so it rounds exactly as eager does.
#include "optim/biostatis.h"

#include <ATen/Parallel.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_dispatch.h"
#include "multi_tensor.h"
#include "vec.h"

namespace curvkern {

namespace {

#define CURVKERN_INLINE inline __attribute__((always_inline))

// The original's constants (spec §1).
constexpr double kGlobalFactor = 0.5;
constexpr double kGlobalBlend[2] = {0.9, 0.1};
constexpr double kGlobalClamp[2] = {0.925, 1.075};
constexpr double kLocalBlend[2] = {0.8, 0.2};
constexpr double kLocalClamp[2] = {0.85, 1.15};
constexpr double kAlphaGlobal = 0.3;
constexpr double kPolarityScale = 0.5;
constexpr double kFlowWeight = 0.05;
constexpr double kAdaptiveWeight = 0.01;
constexpr double kAscentRate = 0.02;
constexpr double kImportanceEps = 1e-12;
constexpr double kCosineEps = 1e-8;

enum GradSum { kSumGG, kSumTanh, kGradSums };
enum GradColumn { kColNumel, kColGG, kColTanh, kGradColumns };  // rows of biostatis_grad_sums
enum MomentSum { kSumMG, kSumMM, kSumAbsM, kSumSqrtV, kMomentSums };
enum ScalarColumn { kColHG, kColEG, kColH, kColE, kColTau, kColImportance, kColAscent, kColSqrtBc2, kColCoef, kColumns };

// Everything the passes read: pointers per tensor and the per-tensor scalars of the update.
template <typename P, typename S>
struct Plan {
  std::vector<P*> params, grads;
  std::vector<S*> exp_avgs, exp_avg_sqs;
  std::vector<S*> emas;  // tensor-major, num_memories per tensor
  int num_memories = 0;
  // decay is 1 − lr·wd: exactly 1 without weight decay, and p·1 is p bit for bit (NaN, inf and −0
  // included), so the multiply that eager skips then needs no branch here.
  S beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay;
  std::vector<S> memory_decay, memory_keep, memory_weight;  // d_j, 1 − d_j, w_j
  std::vector<S> tau, ascent, sqrt_bc2, coef;  // per tensor, rounded to S where they meet tensors
};

template <typename P, typename S>
CURVKERN_INLINE void grad_sums_segment(const P* grad, int64_t n, double* out) {
  LaneSums<kGradSums> sums;
  auto add = [&](int64_t i, int l) CURVKERN_INLINE_LAMBDA {
    const S g = load(grad, i);
    sums.lane[kSumGG][l] += static_cast<double>(g * g);
    sums.lane[kSumTanh][l] += static_cast<double>(std::fabs(vec::tanh(g)));
  };
  stream_in_blocks(n, [&](int64_t ahead) CURVKERN_INLINE_LAMBDA { prefetch_read(grad + ahead); }, add);
  sums.fold(out);
}

template <typename P, typename S>
CURVKERN_INLINE void moment_sums_segment(const Plan<P, S>& plan, int64_t t, int64_t start, int64_t n, double* out) {
  const P* grad = plan.grads[t] + start;
  const S* exp_avg = plan.exp_avgs[t] + start;
  const S* exp_avg_sq = plan.exp_avg_sqs[t] + start;
  LaneSums<kMomentSums> sums;
  auto add = [&](int64_t i, int l) CURVKERN_INLINE_LAMBDA {
    const S g = load(grad, i);
    const S m = std::fma(g, plan.one_minus_beta1, exp_avg[i] * plan.beta1);
    const S v = std::fma(plan.one_minus_beta2 * g, g, exp_avg_sq[i] * plan.beta2);
    sums.lane[kSumMG][l] += static_cast<double>(m * g);
    sums.lane[kSumMM][l] += static_cast<double>(m * m);
    sums.lane[kSumAbsM][l] += static_cast<double>(std::fabs(m));
    sums.lane[kSumSqrtV][l] += static_cast<double>(std::sqrt(v));
  };
  auto prefetch = [&](int64_t ahead) CURVKERN_INLINE_LAMBDA {
    prefetch_read(grad + ahead);
    prefetch_read(exp_avg + ahead);
    prefetch_read(exp_avg_sq + ahead);
  };
  stream_in_blocks(n, prefetch, add);
  sums.fold(out);
}

// The update of one segment. kMemories ≥ 0 is the number of memory EMAs, fixed at compile time so the
// element loop vectorizes; −1 loops over plan.num_memories (any count, without the simd loop).
template <int kMemories, typename P, typename S>
CURVKERN_INLINE void update_segment(const Plan<P, S>& plan, int64_t t, int64_t start, int64_t n) {
  P* param = plan.params[t] + start;
  const P* grad = plan.grads[t] + start;
  S* exp_avg = plan.exp_avgs[t] + start;
  S* exp_avg_sq = plan.exp_avg_sqs[t] + start;
  const int memories = kMemories >= 0 ? kMemories : plan.num_memories;
  // Locals, not loads through the plan inside the loop: the compiler cannot rule out that the loop's
  // stores change what such loads read, and would not vectorize.
  constexpr int kSlots = kMemories > 0 ? kMemories : 1;
  S* emas[kSlots];
  S decays[kSlots], keeps[kSlots], weights[kSlots];
  for (int j = 0; j < kMemories; ++j) {
    emas[j] = plan.emas[t * plan.num_memories + j] + start;
    decays[j] = plan.memory_decay[j];
    keeps[j] = plan.memory_keep[j];
    weights[j] = plan.memory_weight[j];
  }
  const S beta1 = plan.beta1, one_minus_beta1 = plan.one_minus_beta1;
  const S beta2 = plan.beta2, one_minus_beta2 = plan.one_minus_beta2;
  const S eps = plan.eps, decay = plan.decay;
  const S tau = plan.tau[t], ascent = plan.ascent[t], sqrt_bc2 = plan.sqrt_bc2[t], coef = plan.coef[t];
  const S polarity_scale = static_cast<S>(kPolarityScale), flow_weight = static_cast<S>(kFlowWeight);
  const S adaptive_weight = static_cast<S>(kAdaptiveWeight);
  auto element = [&](int64_t i, int = 0) CURVKERN_INLINE_LAMBDA {
    const S g = load(grad, i);
    const S m = std::fma(g, one_minus_beta1, exp_avg[i] * beta1);
    const S v = std::fma(one_minus_beta2 * g, g, exp_avg_sq[i] * beta2);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    S flow = S(0);
    for (int j = 0; j < memories; ++j) {
      S* ema = kMemories >= 0 ? emas[j] : plan.emas[t * plan.num_memories + j] + start;
      const S keep = kMemories >= 0 ? keeps[j] : plan.memory_keep[j];
      const S memory_decay = kMemories >= 0 ? decays[j] : plan.memory_decay[j];
      const S weight = kMemories >= 0 ? weights[j] : plan.memory_weight[j];
      const S updated = std::fma(g, keep, ema[i] * memory_decay);
      ema[i] = updated;
      flow = std::fma(updated, weight, flow);
    }
    const S sign = static_cast<S>((g > S(0)) - (g < S(0)));
    S adaptive = g * (S(1) + polarity_scale * sign * tau);
    adaptive = adaptive + ascent * g;
    const S denom = std::sqrt(v) / sqrt_bc2 + eps;
    const S update = (m / denom + flow_weight * flow + adaptive_weight * adaptive) * coef;
    store(param, i, load(param, i) * decay + update);
  };
  if constexpr (kMemories >= 0) {
    auto prefetch = [&](int64_t ahead) CURVKERN_INLINE_LAMBDA {
      prefetch_read(grad + ahead);
      prefetch_write(exp_avg + ahead);
      prefetch_write(exp_avg_sq + ahead);
      for (int j = 0; j < kMemories; ++j) prefetch_write(emas[j] + ahead);
      prefetch_write(param + ahead);
    };
    stream_in_blocks(n, prefetch, element);
  } else {
    for (int64_t i = 0; i < n; ++i) element(i);
  }
}

template <typename P, typename S>
CURVKERN_INLINE void update_dispatch(const Plan<P, S>& plan, const Segment& seg) {
  switch (plan.num_memories) {
    case 0: return update_segment<0>(plan, seg.tensor, seg.start, seg.length);
    case 1: return update_segment<1>(plan, seg.tensor, seg.start, seg.length);
    case 2: return update_segment<2>(plan, seg.tensor, seg.start, seg.length);
    case 3: return update_segment<3>(plan, seg.tensor, seg.start, seg.length);
    case 4: return update_segment<4>(plan, seg.tensor, seg.start, seg.length);
    default: return update_segment<-1>(plan, seg.tensor, seg.start, seg.length);
  }
}

// The tensors [first, last) of one cache-sized window, with their chunk table.
struct Window {
  int64_t first, last;
  ChunkTable table;
};

// Called by one thread between a window's two passes: the window's per-tensor scalars from its sums.
using WindowScalars = void (*)(void* context, const Window& window, const std::vector<double>& moment_sums);

// The ISA clones of the two regions, one set per (parameter, state) dtype pair; the OpenMP regions
// sit in the cloned functions so that GCC outlines and vectorizes their bodies once per clone.
#define CURVKERN_BIOSTATIS_KERNELS(P, S, suffix)                                                               \
  CURVKERN_CLONES void grad_sums_##suffix(const ChunkTable& table, P* const* grads, double* partials) {        \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                            \
    for (int64_t u = 0; u < table.num_units(); ++u) {                                                          \
      for (int64_t s = table.unit_begin(u); s < table.unit_begin(u + 1); ++s) {                                \
        const Segment& seg = table.segment(s);                                                                 \
        grad_sums_segment<P, S>(grads[seg.tensor] + seg.start, seg.length, partials + s * kGradSums);          \
      }                                                                                                        \
    }                                                                                                          \
  }                                                                                                            \
  CURVKERN_CLONES void windows_##suffix(Plan<P, S>& plan, const std::vector<Window>& windows,                 \
                                        WindowScalars scalars, void* context) {                                \
    std::vector<double> partials;                                                                              \
    _Pragma("omp parallel num_threads(at::get_num_threads())")                                                 \
    for (const Window& window : windows) {                                                                     \
      const ChunkTable& table = window.table;                                                                  \
      _Pragma("omp single") partials.assign(table.num_segments() * kMomentSums, 0.0);                          \
      _Pragma("omp for schedule(static)")                                                                      \
      for (int64_t u = 0; u < table.num_units(); ++u) {                                                        \
        for (int64_t s = table.unit_begin(u); s < table.unit_begin(u + 1); ++s) {                              \
          const Segment& seg = table.segment(s);                                                               \
          moment_sums_segment(plan, window.first + seg.tensor, seg.start, seg.length,                          \
                              partials.data() + s * kMomentSums);                                              \
        }                                                                                                      \
      }                                                                                                        \
      _Pragma("omp single") scalars(context, window, table.reduce_per_tensor(partials, kMomentSums));          \
      _Pragma("omp for schedule(static)")                                                                      \
      for (int64_t u = 0; u < table.num_units(); ++u) {                                                        \
        for (int64_t s = table.unit_begin(u); s < table.unit_begin(u + 1); ++s) {                              \
          Segment seg = table.segment(s);                                                                      \
          seg.tensor += window.first;                                                                          \
          update_dispatch(plan, seg);                                                                          \
        }                                                                                                      \
      }                                                                                                        \
    }                                                                                                          \
  }                                                                                                            \
  void grad_sums(const ChunkTable& table, P* const* grads, double* partials) {                                 \
    grad_sums_##suffix(table, grads, partials);                                                                \
  }                                                                                                            \
  void run_windows(Plan<P, S>& plan, const std::vector<Window>& windows, WindowScalars scalars, void* context) { \
    windows_##suffix(plan, windows, scalars, context);                                                         \
  }

CURVKERN_BIOSTATIS_KERNELS(float, float, f32)
CURVKERN_BIOSTATIS_KERNELS(double, double, f64)
CURVKERN_BIOSTATIS_KERNELS(c10::BFloat16, float, bf16)
CURVKERN_BIOSTATIS_KERNELS(c10::Half, float, f16)
#undef CURVKERN_BIOSTATIS_KERNELS

// Elements per window: g, m and v of a window take an eighth of the last-level cache, leaving room
// for the EMAs and p that the update streams past them.
int64_t window_elements(int64_t state_itemsize) {
  long cache = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (cache <= 0) cache = 32L << 20;
  return std::max<int64_t>(kChunkElements, cache / 8 / (3 * state_itemsize));
}

std::vector<Window> make_windows(const std::vector<int64_t>& numels, int64_t limit) {
  std::vector<Window> windows;
  int64_t first = 0, total = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    if (t > first && total + numels[t] > limit) {
      windows.push_back({first, t, ChunkTable({numels.begin() + first, numels.begin() + t}, kChunkElements)});
      first = t;
      total = 0;
    }
    total += numels[t];
  }
  windows.push_back({first, static_cast<int64_t>(numels.size()),
                     ChunkTable({numels.begin() + first, numels.end()}, kChunkElements)});
  return windows;
}

// NaN-propagating max, as torch.clamp_min.
double clamp_min(double x, double low) { return x < low ? low : x; }
// Python's max(low, min(high, x)) and C's fmax/fmin: a NaN maps to `high`, not NaN (eager's _clip).
double clip(double x, double low, double high) { return std::fmax(std::fmin(x, high), low); }

// The scalar stage's inputs that do not depend on the window, and where it writes.
struct ScalarContext {
  std::vector<double> numels, steps, h_local, e_local, gg;
  double h_global, e_global, lr, beta1, beta2, flip_threshold, ascent_strength;
  double* columns;  // the [n, kColumns] result
};

// eager.biostatis_scalars for the window's tensors, in float64.
void window_scalars(void* raw, const Window& window, const std::vector<double>& moment_sums) {
  auto& c = *static_cast<ScalarContext*>(raw);
  for (int64_t t = window.first; t < window.last; ++t) {
    const double* sums = moment_sums.data() + (t - window.first) * kMomentSums;
    const double n_local = clamp_min(c.numels[t], 1.0);
    const double h = kAlphaGlobal * c.h_global + (1 - kAlphaGlobal) * c.h_local[t];
    const double e = kAlphaGlobal * c.e_global + (1 - kAlphaGlobal) * c.e_local[t];
    const double cos = sums[kSumMG] / (clamp_min(std::sqrt(sums[kSumMM]), kCosineEps) *
                                       clamp_min(std::sqrt(c.gg[t]), kCosineEps));
    const double tau = std::tanh(cos);
    const double importance = (sums[kSumAbsM] / n_local) / (sums[kSumSqrtV] / n_local + kImportanceEps);
    const double delta = 1 - std::exp(-kAscentRate * c.steps[t]);
    const double ascent = importance < c.flip_threshold ? c.ascent_strength * delta : 0.0;
    const double bc1 = 1 - std::pow(c.beta1, c.steps[t]);
    const double bc2 = 1 - std::pow(c.beta2, c.steps[t]);
    // `lr / tensor` in Python is torch's `reciprocal(tensor) * lr`: two roundings, mirrored here.
    const double step_size = 1.0 / bc1 * c.lr;
    const double coef = -step_size * h * e;
    double* row = c.columns + t * kColumns;
    row[kColHG] = c.h_global;
    row[kColEG] = c.e_global;
    row[kColH] = h;
    row[kColE] = e;
    row[kColTau] = tau;
    row[kColImportance] = importance;
    row[kColAscent] = ascent;
    row[kColSqrtBc2] = std::sqrt(bc2);
    row[kColCoef] = coef;
  }
}

// tanh of float64 values rounded to the default dtype, through torch's own tanh (eager's _tanh_default_dtype).
std::vector<double> tanh_in_default_dtype(const std::vector<double>& x) {
  const at::Tensor values = at::tensor(x, at::kDouble).to(at::typeMetaToScalarType(at::get_default_dtype()));
  const at::Tensor result = values.tanh().to(at::kDouble).contiguous();
  return {result.const_data_ptr<double>(), result.const_data_ptr<double>() + result.numel()};
}

double read_step(at::Tensor& step, const char* op) {
  TORCH_CHECK(step.device().is_cpu() && step.numel() == 1, op, ": a step count must be a one-element CPU tensor");
  switch (step.scalar_type()) {
    case at::kFloat: return *step.data_ptr<float>() += 1.0f;
    case at::kDouble: return *step.data_ptr<double>() += 1.0;
    case at::kLong: return static_cast<double>(*step.data_ptr<int64_t>() += 1);
    default: TORCH_CHECK(false, op, ": a step count must be float32, float64 or int64, got ", step.scalar_type());
  }
}

#undef CURVKERN_INLINE

}  // namespace

namespace {

// The parameters' dtype, checked to be shared by the gradients.
at::ScalarType param_dtype(at::TensorList params, at::TensorList grads, const char* op) {
  const at::ScalarType dtype = common_dtype(params, op, "parameters");
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.scalar_type() == dtype, op, ": a gradient's dtype ", g.scalar_type(),
                " differs from its parameter's ", dtype);
  }
  return dtype;
}

}  // namespace

at::Tensor biostatis_grad_sums(at::TensorList grads) {
  constexpr const char* op = "curvkern::biostatis_grad_sums";
  const int64_t n = static_cast<int64_t>(grads.size());
  at::Tensor sums = at::zeros({n, kGradColumns}, at::kDouble);
  if (n == 0) return sums;
  const at::ScalarType dtype = common_dtype(grads, op, "gradients");
  StreamableTensors layout(op);
  std::vector<at::Tensor> views;
  for (int64_t i = 0; i < n; ++i) views.push_back(layout.prepare(i, {}, {grads[i]})[0]);
  const std::vector<int64_t> numels = numels_of(grads);
  double* out = sums.data_ptr<double>();
  with_param_types(dtype, op, [&](auto param_tag, auto state_tag) {
    using P = typename decltype(param_tag)::type;
    using S = typename decltype(state_tag)::type;
    std::vector<P*> pointers;
    for (const at::Tensor& v : views) pointers.push_back(v.data_ptr<P>());
    const ChunkTable table(numels, kChunkElements);
    std::vector<double> partials(table.num_segments() * kGradSums);
    grad_sums(table, pointers.data(), partials.data());
    const std::vector<double> per_tensor = table.reduce_per_tensor(partials, kGradSums);
    for (int64_t t = 0; t < n; ++t) {
      // Rounded to the state dtype, as eager's per-tensor sums are.
      out[t * kGradColumns + kColNumel] = static_cast<double>(numels[t]);
      out[t * kGradColumns + kColGG] = static_cast<double>(static_cast<S>(per_tensor[t * kGradSums + kSumGG]));
      out[t * kGradColumns + kColTanh] = static_cast<double>(static_cast<S>(per_tensor[t * kGradSums + kSumTanh]));
    }
  });
  return sums;
}

at::Tensor biostatis_update_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList memory_emas, at::TensorList steps,
                             const at::Tensor& grad_sums, const at::Tensor& group_sums, double lr, double beta1,
                             double beta2, double eps, double weight_decay, double homeo_rate,
                             double coherence_target, double energy_target, double lambda_energy,
                             at::ArrayRef<double> memory_decays, at::ArrayRef<double> memory_weights,
                             double flip_threshold, double ascent_strength) {
  constexpr const char* op = "curvkern::biostatis_update_";
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t memories = static_cast<int64_t>(memory_decays.size());
  TORCH_CHECK(memory_weights.size() == memory_decays.size(), op, ": got ", memory_decays.size(),
              " memory_decays but ", memory_weights.size(), " memory_weights");
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == n && static_cast<int64_t>(steps.size()) == n,
              op, ": got ", n, " parameters, ", grads.size(), " gradients, ", exp_avgs.size(), " exp_avg, ",
              exp_avg_sqs.size(), " exp_avg_sq and ", steps.size(), " step tensors");
  TORCH_CHECK(static_cast<int64_t>(memory_emas.size()) == n * memories, op, ": expected ", n * memories,
              " memory EMAs (", memories, " per parameter), got ", memory_emas.size());
  TORCH_CHECK(grad_sums.device().is_cpu() && grad_sums.scalar_type() == at::kDouble &&
                  grad_sums.sizes() == at::IntArrayRef({n, kGradColumns}),
              op, ": grad_sums must be biostatis_grad_sums' float64 [", n, ", ", kGradColumns, "] of these gradients");
  TORCH_CHECK(group_sums.device().is_cpu() && group_sums.scalar_type() == at::kDouble && group_sums.numel() == kGradColumns,
              op, ": group_sums must be the float64 column sums of the whole group's grad_sums");
  at::Tensor columns = at::zeros({n, kColumns}, at::kDouble);
  if (n == 0) return columns;

  const at::ScalarType dtype = param_dtype(params, grads, op);
  StreamableTensors layout(op);
  std::vector<at::Tensor> param_views, grad_views, exp_avg_views, exp_avg_sq_views, ema_views;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> mutated = {params[i], exp_avgs[i], exp_avg_sqs[i]};
    for (int64_t j = 0; j < memories; ++j) mutated.push_back(memory_emas[i * memories + j]);
    for (size_t k = 1; k < mutated.size(); ++k) check_state(mutated[k], dtype, op, "optimizer state");
    auto views = layout.prepare(i, mutated, {grads[i]});
    param_views.push_back(views[0]);
    exp_avg_views.push_back(views[1]);
    exp_avg_sq_views.push_back(views[2]);
    for (int64_t j = 0; j < memories; ++j) ema_views.push_back(views[3 + j]);
    grad_views.push_back(views.back());
  }

  const at::Tensor sums = grad_sums.contiguous();
  const double* sum_rows = sums.const_data_ptr<double>();
  const double* group = group_sums.contiguous().const_data_ptr<double>();
  ScalarContext context;
  context.numels.resize(n);
  context.steps.resize(n);
  context.gg.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(sum_rows[t * kGradColumns + kColNumel] == static_cast<double>(params[t].numel()), op,
                ": grad_sums row ", t, " does not belong to parameter ", t);
    context.numels[t] = sum_rows[t * kGradColumns + kColNumel];
    context.gg[t] = sum_rows[t * kGradColumns + kColGG];
  }
  for (int64_t t = 0; t < n; ++t) {
    at::Tensor step = steps[t];
    context.steps[t] = read_step(step, op);
  }

  // Group and local gains, as eager.biostatis_scalars computes them.
  const double n_group = clamp_min(group[kColNumel], 1.0);
  const double energy_global = group[kColGG] / n_group;
  const double coherence_global = group[kColTanh] / n_group;
  std::vector<double> coherence_offsets(n + 1);
  context.e_local.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    const double n_local = clamp_min(context.numels[t], 1.0);
    coherence_offsets[t] = sum_rows[t * kGradColumns + kColTanh] / n_local - coherence_target;
    const double e_local = 1 + lambda_energy * (energy_target - context.gg[t] / n_local);
    context.e_local[t] = clip(kLocalBlend[0] * e_local + kLocalBlend[1], kLocalClamp[0], kLocalClamp[1]);
  }
  coherence_offsets[n] = coherence_global - coherence_target;
  const std::vector<double> tanh_offsets = tanh_in_default_dtype(coherence_offsets);
  context.h_local.resize(n);
  for (int64_t t = 0; t < n; ++t) context.h_local[t] = 1.0 - homeo_rate * tanh_offsets[t];
  context.h_global = 1.0 - kGlobalFactor * homeo_rate * tanh_offsets[n];
  const double e_global = 1 + kGlobalFactor * lambda_energy * (energy_target - energy_global);
  context.e_global = clip(kGlobalBlend[0] * e_global + kGlobalBlend[1], kGlobalClamp[0], kGlobalClamp[1]);
  context.lr = lr;
  context.beta1 = beta1;
  context.beta2 = beta2;
  context.flip_threshold = flip_threshold;
  context.ascent_strength = ascent_strength;
  context.columns = columns.data_ptr<double>();

  with_param_types(dtype, op, [&](auto param_tag, auto state_tag) {
    using P = typename decltype(param_tag)::type;
    using S = typename decltype(state_tag)::type;
    Plan<P, S> plan;
    for (int64_t i = 0; i < n; ++i) {
      plan.params.push_back(param_views[i].data_ptr<P>());
      plan.grads.push_back(grad_views[i].data_ptr<P>());
      plan.exp_avgs.push_back(exp_avg_views[i].data_ptr<S>());
      plan.exp_avg_sqs.push_back(exp_avg_sq_views[i].data_ptr<S>());
    }
    for (const at::Tensor& ema : ema_views) plan.emas.push_back(ema.data_ptr<S>());
    plan.num_memories = static_cast<int>(memories);
    plan.beta1 = static_cast<S>(beta1);
    plan.one_minus_beta1 = static_cast<S>(1 - beta1);
    plan.beta2 = static_cast<S>(beta2);
    plan.one_minus_beta2 = static_cast<S>(1 - beta2);
    plan.eps = static_cast<S>(eps);
    plan.decay = static_cast<S>(1 - lr * weight_decay);
    for (int64_t j = 0; j < memories; ++j) {
      plan.memory_decay.push_back(static_cast<S>(memory_decays[j]));
      plan.memory_keep.push_back(static_cast<S>(1 - memory_decays[j]));
      plan.memory_weight.push_back(static_cast<S>(memory_weights[j]));
    }
    plan.tau.resize(n);
    plan.ascent.resize(n);
    plan.sqrt_bc2.resize(n);
    plan.coef.resize(n);
    struct Both {
      ScalarContext* context;
      Plan<P, S>* plan;
    } both{&context, &plan};
    const WindowScalars scalars = [](void* raw, const Window& window, const std::vector<double>& moment_sums) {
      auto& b = *static_cast<Both*>(raw);
      window_scalars(b.context, window, moment_sums);
      for (int64_t t = window.first; t < window.last; ++t) {
        const double* row = b.context->columns + t * kColumns;
        b.plan->tau[t] = static_cast<S>(row[kColTau]);
        b.plan->ascent[t] = static_cast<S>(row[kColAscent]);
        b.plan->sqrt_bc2[t] = static_cast<S>(row[kColSqrtBc2]);
        b.plan->coef[t] = static_cast<S>(row[kColCoef]);
      }
    };
    run_windows(plan, make_windows(numels_of(params), window_elements(sizeof(S))), scalars, &both);
  });
  layout.write_back();
  return columns;
}

}  // namespace curvkern
