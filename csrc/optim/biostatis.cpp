// BiostatisV6 on the CPU, in the passes of docs/biostatis.md ("The fused kernels"):
//
// 1. biostatis_sums runs pass A, one region over all tensors reading (g, m, v): per tensor Σg², Σ|tanh g|,
//    Σm'g, Σm'², Σ|m'| and Σ√v' of the gradient and the updated moments. The group gains need every
//    tensor's sums before any parameter moves. |tanh g| is a short polynomial in every stage of 256
//    gradients below 0.5 in magnitude (nearly all of them in training), the full function elsewhere: with
//    the full function everywhere, pass A's arithmetic took as long as its three streams on AVX2
//    (docs/benchmarks.md, "per instruction-set path").
// 2. biostatis_update_ runs the scalar stage (float64, as eager), then pass B, one region writing m, v,
//    the EMAs and p. It walks the work units from last to first, so it starts on the (g, m, v) that
//    pass A read last, which may still be in the last-level cache.
//
// Rounding mirrors the eager reference (curvkern/optim/biostatis/eager.py) operation by operation,
// including where torch's vectorized CPU kernels fuse: `x.mul_(a).add_(g, alpha=b)` is fma(g, b, x·a)
// and `addcmul_(g, g, value=c)` is fma(c·g, g, ·). The fp32 tanh(C − c*) of the scalar stage goes
// through torch's own tanh, so it rounds exactly as eager's does.
#include "optim/biostatis.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu_dispatch.h"
#include "multi_tensor.h"
#include "vec.h"

namespace curvkern {

namespace {

// The original's constants (docs/biostatis.md, "Hyperparameters and constants"), eager.py's GLOBAL_FACTOR,
// GLOBAL_BLEND, ... under the same names (tests/test_cpp_constants.py checks that they agree).
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

// The sums of one tensor, and the columns of biostatis_sums (its element count first).
enum Sum { kSumGG, kSumTanh, kSumMG, kSumMM, kSumAbsM, kSumSqrtV, kSums };
enum SumColumn { kColNumel, kSumColumns = kSums + 1 };
enum ScalarColumn {
  kColHG,
  kColEG,
  kColH,
  kColE,
  kColTau,
  kColImportance,
  kColAscent,
  kColSqrtBc2,
  kColCoef,
  kColumns
};

// Everything the passes read: pointers per tensor and the per-tensor scalars of the update, in the state
// type S (pass A fills the gradients, the moments and their constants).
template <typename P>
struct Plan {
  using S = at::opmath_type<P>;
  std::vector<P*> params;
  std::vector<const P*> grads;
  std::vector<S*> exp_avgs, exp_avg_sqs;
  std::vector<S*> emas;  // tensor-major, num_memories per tensor
  int num_memories = 0;
  // decay is 1 − lr·wd: exactly 1 without weight decay, and p·1 is p bit for bit (NaN, inf and −0
  // included), so the multiply that eager skips then needs no branch here.
  S beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay;
  std::vector<S> memory_decay, memory_keep, memory_weight;  // d_j, 1 − d_j, w_j
  std::vector<S> tau, ascent, sqrt_bc2, coef;               // per tensor, rounded to S where they meet tensors
};

// Whether every |x| of x[0, n) is below `bound` (a NaN is not).
template <typename P, typename S>
CURVKERN_INLINE bool magnitudes_below(const P* x, int64_t n, S bound) {
  int outside = 0;
#pragma omp simd reduction(| : outside)
  for (int64_t i = 0; i < n; ++i) outside |= !(std::fabs(load(x, i)) < bound);
  return outside == 0;
}

// All six sums of one segment: the gradient's and those of the updated moments m', v' (not written),
// kGroupLanes lanes at a time (stream_and_sum). |tanh g| takes its short polynomial in the stages whose
// gradients are all below its bound (vec::abs_tanh_small), the full function in the others.
template <int kGroupLanes, typename P, typename S>
CURVKERN_INLINE void pass_a_segment(const P* grad, const S* exp_avg, const S* exp_avg_sq, int64_t n, S beta1,
                                    S one_minus_beta1, S beta2, S one_minus_beta2, double* out) {
  LaneSums<kSums, S> sums;
  auto add = [&](int64_t i, auto& acc, int l, auto small_gradients) CURVKERN_INLINE_LAMBDA {
    const S g = load(grad, i);
    const S m = std::fma(g, one_minus_beta1, exp_avg[i] * beta1);
    const S v = std::fma(one_minus_beta2 * g, g, exp_avg_sq[i] * beta2);
    // Products fused into their sums: a lane's order of additions is not eager's anyway, and an fma
    // is one rounding closer to the exact sum, and one instruction and one latency shorter.
    acc[kSumGG][l] = std::fma(g, g, acc[kSumGG][l]);
    acc[kSumTanh][l] += small_gradients ? vec::abs_tanh_small(g) : vec::abs_tanh(g);
    acc[kSumMG][l] = std::fma(m, g, acc[kSumMG][l]);
    acc[kSumMM][l] = std::fma(m, m, acc[kSumMM][l]);
    acc[kSumAbsM][l] += std::fabs(m);
    acc[kSumSqrtV][l] += std::sqrt(v);
  };
  auto prefetch = [&](int64_t ahead) CURVKERN_INLINE_LAMBDA {
    prefetch_read(grad + ahead);
    prefetch_read(exp_avg + ahead);
    prefetch_read(exp_avg_sq + ahead);
  };
  auto small_gradients = [&](int64_t begin, int64_t length) CURVKERN_INLINE_LAMBDA {
    return magnitudes_below(grad + begin, length, vec::kAbsTanhSmallBound<S>);
  };
  stream_and_sum_in_two_forms<kGroupLanes>(n, sums, prefetch, small_gradients, add);
  sums.fold(out);
}

// Pass A over one work unit: kSums partials per segment.
template <int kGroupLanes, typename P>
CURVKERN_INLINE void pass_a_unit(const ChunkTable& table, const Plan<P>& plan, double* partials, int64_t unit) {
  for_each_segment(table, unit, [&](int64_t s, const Segment& seg) CURVKERN_INLINE_LAMBDA {
    pass_a_segment<kGroupLanes>(plan.grads[seg.tensor] + seg.start, plan.exp_avgs[seg.tensor] + seg.start,
                                plan.exp_avg_sqs[seg.tensor] + seg.start, seg.length, plan.beta1, plan.one_minus_beta1,
                                plan.beta2, plan.one_minus_beta2, partials + s * kSums);
  });
}

// Pass B over one segment. kMemories ≥ 0 is the number of memory EMAs, fixed at compile time so the
// element loop vectorizes; −1 loops over plan.num_memories (any count, without the simd loop).
template <int kMemories, typename P>
CURVKERN_INLINE void pass_b_segment_with_memories(const Plan<P>& plan, const Segment& seg) {
  using S = at::opmath_type<P>;
  const int64_t t = seg.tensor, start = seg.start, n = seg.length;
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
  // Eager's 1 + (½·sign g)·τ for g > 0 and for g < 0, without sign's compares and int→float conversion:
  // ½·(±τ) is exact, so these round as eager does. At g = ±0, eager's factor is 1 and g·factor is g;
  // g·polarity_negative is the same ±0, as τ ∈ [−1, 1] keeps the factor positive (a NaN τ is NaN in both).
  const S polarity_positive = S(1) + polarity_scale * tau, polarity_negative = S(1) - polarity_scale * tau;
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
    S adaptive = g * (g > S(0) ? polarity_positive : polarity_negative);
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

template <typename P>
CURVKERN_INLINE void pass_b_segment(const Plan<P>& plan, const Segment& seg) {
  switch (plan.num_memories) {
    case 0: return pass_b_segment_with_memories<0>(plan, seg);
    case 1: return pass_b_segment_with_memories<1>(plan, seg);
    case 2: return pass_b_segment_with_memories<2>(plan, seg);
    case 3: return pass_b_segment_with_memories<3>(plan, seg);
    case 4: return pass_b_segment_with_memories<4>(plan, seg);
    default: return pass_b_segment_with_memories<-1>(plan, seg);
  }
}

template <typename P>
CURVKERN_INLINE void pass_b_unit(const ChunkTable& table, const Plan<P>& plan, int64_t unit) {
  for_each_segment(table, unit, [&](int64_t, const Segment& seg) CURVKERN_INLINE_LAMBDA { pass_b_segment(plan, seg); });
}

// The passes' OpenMP regions, stamped by macro (why: csrc/cpu_dispatch.h). CURVKERN_FOR_EACH_DTYPE below
// defines biostatis_pass_a_<dtype>_<isa> and biostatis_pass_b_<dtype>_<isa> for every dtype and ISA, each one
// region over all work units, and per dtype run_pass_a and run_pass_b, which run the active ISA's. Pass A
// sums a register's worth of lanes at a time (stream_and_sum); pass B walks the units from last to first.
#define CURVKERN_BIOSTATIS_REGIONS(isa, target, P, dtype)                                                        \
  target void biostatis_pass_a_##dtype##_##isa(const ChunkTable& table, const Plan<P>& plan, double* partials) { \
    constexpr int kGroupLanes = lanes_per_register<at::opmath_type<P>>(kVectorBytes_##isa);                      \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                              \
    for (int64_t u = 0; u < table.num_units(); ++u) pass_a_unit<kGroupLanes>(table, plan, partials, u);          \
  }                                                                                                              \
  target void biostatis_pass_b_##dtype##_##isa(const ChunkTable& table, const Plan<P>& plan) {                   \
    const int64_t last = table.num_units() - 1;                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                              \
    for (int64_t u = 0; u <= last; ++u) pass_b_unit(table, plan, last - u);                                      \
  }
#define CURVKERN_BIOSTATIS_KERNELS(P, dtype)                                        \
  CURVKERN_FOR_EACH_ISA(CURVKERN_BIOSTATIS_REGIONS, P, dtype)                       \
  void run_pass_a(const ChunkTable& table, const Plan<P>& plan, double* partials) { \
    CURVKERN_CALL_ACTIVE_ISA(biostatis_pass_a_##dtype, table, plan, partials);      \
  }                                                                                 \
  void run_pass_b(const ChunkTable& table, const Plan<P>& plan) {                   \
    CURVKERN_CALL_ACTIVE_ISA(biostatis_pass_b_##dtype, table, plan);                \
  }

CURVKERN_FOR_EACH_DTYPE(CURVKERN_BIOSTATIS_KERNELS)
#undef CURVKERN_BIOSTATIS_KERNELS
#undef CURVKERN_BIOSTATIS_REGIONS

// The update's settings as biostatis_update_ takes them (lr read from its tensor).
struct Hyperparameters {
  double lr, beta1, beta2, eps, weight_decay, homeo_rate, coherence_target, energy_target, lambda_energy;
  at::ArrayRef<double> memory_decays, memory_weights;
  double flip_threshold, ascent_strength;
};

// NaN-propagating max, as torch.clamp_min.
double clamp_min(double x, double low) { return x < low ? low : x; }
// Python's max(low, min(high, x)) and C's fmax/fmin: a NaN maps to `high`, not NaN (eager's _clip).
double clip(double x, double low, double high) { return std::fmax(std::fmin(x, high), low); }

// tanh of float64 values rounded to the default dtype, through torch's own tanh (eager's _tanh_default_dtype).
std::vector<double> tanh_in_default_dtype(const std::vector<double>& x) {
  const at::Tensor values = at::tensor(x, at::kDouble).to(at::typeMetaToScalarType(at::get_default_dtype()));
  const at::Tensor result = values.tanh().to(at::kDouble).contiguous();
  return {result.const_data_ptr<double>(), result.const_data_ptr<double>() + result.numel()};
}

// One tensor's row of the scalar stage, from its biostatis_sums row, the group gains, its tanh(C − c*) and
// its step count.
void tensor_scalars(const double* row, double h_global, double e_global, double tanh_offset, double step,
                    const Hyperparameters& hp, double* column) {
  const double* sum = row + 1;
  const double n_local = clamp_min(row[kColNumel], 1.0);
  const double h_local = 1.0 - hp.homeo_rate * tanh_offset;
  const double e_local =
      clip(kLocalBlend[0] * (1 + hp.lambda_energy * (hp.energy_target - sum[kSumGG] / n_local)) + kLocalBlend[1],
           kLocalClamp[0], kLocalClamp[1]);
  const double h = kAlphaGlobal * h_global + (1 - kAlphaGlobal) * h_local;
  const double e = kAlphaGlobal * e_global + (1 - kAlphaGlobal) * e_local;
  const double cos =
      sum[kSumMG] / (clamp_min(std::sqrt(sum[kSumMM]), kCosineEps) * clamp_min(std::sqrt(sum[kSumGG]), kCosineEps));
  const double importance = (sum[kSumAbsM] / n_local) / (sum[kSumSqrtV] / n_local + kImportanceEps);
  const double delta = 1 - std::exp(-kAscentRate * step);
  const double bc1 = 1 - std::pow(hp.beta1, step);
  const double bc2 = 1 - std::pow(hp.beta2, step);
  // lr / bc1, one correctly rounded division, as the original's host doubles and the eager reference.
  const double step_size = hp.lr / bc1;
  column[kColHG] = h_global;
  column[kColEG] = e_global;
  column[kColH] = h;
  column[kColE] = e;
  column[kColTau] = std::tanh(cos);
  column[kColImportance] = importance;
  column[kColAscent] = importance < hp.flip_threshold ? hp.ascent_strength * delta : 0.0;
  column[kColSqrtBc2] = std::sqrt(bc2);
  column[kColCoef] = -step_size * h * e;
}

// The scalar stage, eager.biostatis_scalars in float64, into `columns` (kColumns per tensor): the group
// gains from the group's column sums, then every tensor's row. Group means are count-weighted.
void scalar_stage(const double* rows, const double* group, const std::vector<double>& step_counts,
                  const Hyperparameters& hp, double* columns) {
  const int64_t n = static_cast<int64_t>(step_counts.size());
  const double n_group = clamp_min(group[kColNumel], 1.0);
  const double energy_global = group[1 + kSumGG] / n_group;
  const double coherence_global = group[1 + kSumTanh] / n_group;
  std::vector<double> coherence_offsets(n + 1);  // every tensor's C − c*, then the group's
  for (int64_t t = 0; t < n; ++t) {
    const double* row = rows + t * kSumColumns;
    coherence_offsets[t] = row[1 + kSumTanh] / clamp_min(row[kColNumel], 1.0) - hp.coherence_target;
  }
  coherence_offsets[n] = coherence_global - hp.coherence_target;
  const std::vector<double> tanh_offsets = tanh_in_default_dtype(coherence_offsets);
  const double h_global = 1.0 - kGlobalFactor * hp.homeo_rate * tanh_offsets[n];
  const double e_global = clip(
      kGlobalBlend[0] * (1 + kGlobalFactor * hp.lambda_energy * (hp.energy_target - energy_global)) + kGlobalBlend[1],
      kGlobalClamp[0], kGlobalClamp[1]);
  for (int64_t t = 0; t < n; ++t) {
    tensor_scalars(rows + t * kSumColumns, h_global, e_global, tanh_offsets[t], step_counts[t], hp,
                   columns + t * kColumns);
  }
}

// Increments a step count in place; returns the new count.
double advance_step(at::Tensor step, const char* op) {
  TORCH_CHECK(step.device().is_cpu() && step.numel() == 1, op, ": a step count must be a one-element CPU tensor");
  switch (step.scalar_type()) {
    case at::kFloat: return *step.data_ptr<float>() += 1.0f;
    case at::kDouble: return *step.data_ptr<double>() += 1.0;
    case at::kLong: return static_cast<double>(*step.data_ptr<int64_t>() += 1);
    default: TORCH_CHECK(false, op, ": a step count must be float32, float64 or int64, got ", step.scalar_type());
  }
}

// The step's constants in the state type, as they meet tensors in eager.
template <typename P>
void set_moment_constants(Plan<P>& plan, double beta1, double beta2) {
  using S = at::opmath_type<P>;
  plan.beta1 = static_cast<S>(beta1);
  plan.one_minus_beta1 = static_cast<S>(1 - beta1);
  plan.beta2 = static_cast<S>(beta2);
  plan.one_minus_beta2 = static_cast<S>(1 - beta2);
}

void check_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 const char* op) {
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              op, ": got ", params.size(), " tensors, ", grads.size(), " gradients, ", exp_avgs.size(), " exp_avg and ",
              exp_avg_sqs.size(), " exp_avg_sq");
}

// biostatis_update_'s checks that need no element dtype: list lengths and the two sums tensors.
void check_update_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList memory_emas, at::TensorList steps,
                            const at::Tensor& sums, const at::Tensor& group_sums, const Hyperparameters& hp,
                            const char* op) {
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t memories = static_cast<int64_t>(hp.memory_decays.size());
  check_lists(params, grads, exp_avgs, exp_avg_sqs, op);
  TORCH_CHECK(hp.memory_weights.size() == hp.memory_decays.size(), op, ": got ", hp.memory_decays.size(),
              " memory_decays but ", hp.memory_weights.size(), " memory_weights");
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == n, op, ": got ", n, " parameters but ", steps.size(),
              " step tensors");
  TORCH_CHECK(static_cast<int64_t>(memory_emas.size()) == n * memories, op, ": expected ", n * memories,
              " memory EMAs (", memories, " per parameter), got ", memory_emas.size());
  TORCH_CHECK(
      sums.device().is_cpu() && sums.scalar_type() == at::kDouble && sums.sizes() == at::IntArrayRef({n, kSumColumns}),
      op, ": sums must be biostatis_sums' float64 [", n, ", ", static_cast<int>(kSumColumns), "] of these tensors");
  TORCH_CHECK(
      group_sums.device().is_cpu() && group_sums.scalar_type() == at::kDouble && group_sums.numel() == kSumColumns, op,
      ": group_sums must be the float64 column sums of the whole group's biostatis_sums");
}

// The tensors pass B writes and reads, each checked and in streamable form (StreamableTensors).
struct UpdateViews {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs;
  std::vector<at::Tensor> emas;  // tensor-major, like memory_emas
};

UpdateViews prepare_update_views(StreamableTensors& layout, at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList memory_emas,
                                 int64_t memories, at::ScalarType dtype, const char* op) {
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.scalar_type() == dtype, op, ": a gradient's dtype ", g.scalar_type(),
                " differs from its parameter's ", dtype);
  }
  UpdateViews views;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    std::vector<at::Tensor> mutated = {params[i], exp_avgs[i], exp_avg_sqs[i]};
    for (int64_t j = 0; j < memories; ++j) mutated.push_back(memory_emas[i * memories + j]);
    for (size_t k = 1; k < mutated.size(); ++k) check_state(mutated[k], dtype, op, "optimizer state");
    auto prepared = layout.prepare(i, mutated, {grads[i]});
    views.params.push_back(prepared[0]);
    views.exp_avgs.push_back(prepared[1]);
    views.exp_avg_sqs.push_back(prepared[2]);
    for (int64_t j = 0; j < memories; ++j) views.emas.push_back(prepared[3 + j]);
    views.grads.push_back(prepared.back());
  }
  return views;
}

// Pass B's plan: the views' pointers, the scalar stage's per-tensor columns and the step's constants, each
// rounded to the state type where it meets tensors in eager.
template <typename P>
Plan<P> pass_b_plan(const UpdateViews& views, const double* columns, const Hyperparameters& hp) {
  using S = at::opmath_type<P>;
  Plan<P> plan;
  for (size_t i = 0; i < views.params.size(); ++i) {
    plan.params.push_back(views.params[i].data_ptr<P>());
    plan.grads.push_back(views.grads[i].const_data_ptr<P>());
    plan.exp_avgs.push_back(views.exp_avgs[i].data_ptr<S>());
    plan.exp_avg_sqs.push_back(views.exp_avg_sqs[i].data_ptr<S>());
    const double* column = columns + i * kColumns;
    plan.tau.push_back(static_cast<S>(column[kColTau]));
    plan.ascent.push_back(static_cast<S>(column[kColAscent]));
    plan.sqrt_bc2.push_back(static_cast<S>(column[kColSqrtBc2]));
    plan.coef.push_back(static_cast<S>(column[kColCoef]));
  }
  for (const at::Tensor& ema : views.emas) plan.emas.push_back(ema.data_ptr<S>());
  plan.num_memories = static_cast<int>(hp.memory_decays.size());
  set_moment_constants(plan, hp.beta1, hp.beta2);
  plan.eps = static_cast<S>(hp.eps);
  plan.decay = static_cast<S>(1 - hp.lr * hp.weight_decay);
  for (size_t j = 0; j < hp.memory_decays.size(); ++j) {
    plan.memory_decay.push_back(static_cast<S>(hp.memory_decays[j]));
    plan.memory_keep.push_back(static_cast<S>(1 - hp.memory_decays[j]));
    plan.memory_weight.push_back(static_cast<S>(hp.memory_weights[j]));
  }
  return plan;
}

}  // namespace

at::Tensor biostatis_sums(at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, double beta1,
                          double beta2) {
  constexpr const char* op = "curvkern::biostatis_sums";
  check_lists(grads, grads, exp_avgs, exp_avg_sqs, op);
  const int64_t n = static_cast<int64_t>(grads.size());
  at::Tensor sums = at::zeros({n, kSumColumns}, at::kDouble);
  if (n == 0) return sums;
  const at::ScalarType dtype = common_dtype(grads, op, "gradients");
  StreamableTensors layout(op);
  std::vector<at::Tensor> grad_views, exp_avg_views, exp_avg_sq_views;
  for (int64_t i = 0; i < n; ++i) {
    check_state(exp_avgs[i], dtype, op, "exp_avg");
    check_state(exp_avg_sqs[i], dtype, op, "exp_avg_sq");
    auto views = layout.prepare(i, {}, {grads[i], exp_avgs[i], exp_avg_sqs[i]});
    grad_views.push_back(views[0]);
    exp_avg_views.push_back(views[1]);
    exp_avg_sq_views.push_back(views[2]);
  }
  const std::vector<int64_t> numels = numels_of(grads);
  double* out = sums.data_ptr<double>();
  with_dtype(dtype, op, "gradients", [&](auto tag) {
    using P = typename decltype(tag)::type;
    using S = at::opmath_type<P>;
    Plan<P> plan;
    for (int64_t i = 0; i < n; ++i) {
      plan.grads.push_back(grad_views[i].const_data_ptr<P>());
      plan.exp_avgs.push_back(exp_avg_views[i].data_ptr<S>());
      plan.exp_avg_sqs.push_back(exp_avg_sq_views[i].data_ptr<S>());
    }
    set_moment_constants(plan, beta1, beta2);
    const ChunkTable table(numels, kChunkElements);
    std::vector<double> partials(table.num_segments() * kSums);
    run_pass_a(table, plan, partials.data());
    const std::vector<double> per_tensor = table.reduce_per_tensor(partials, kSums);
    for (int64_t t = 0; t < n; ++t) {
      out[t * kSumColumns + kColNumel] = static_cast<double>(numels[t]);
      // Rounded to the state dtype, as eager's per-tensor sums are.
      for (int k = 0; k < kSums; ++k) {
        out[t * kSumColumns + 1 + k] = static_cast<double>(static_cast<S>(per_tensor[t * kSums + k]));
      }
    }
  });
  return sums;
}

at::Tensor biostatis_update_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList memory_emas, at::TensorList steps,
                             const at::Tensor& sums, const at::Tensor& group_sums, const at::Tensor& lr_tensor,
                             double beta1, double beta2, double eps, double weight_decay, double homeo_rate,
                             double coherence_target, double energy_target, double lambda_energy,
                             at::ArrayRef<double> memory_decays, at::ArrayRef<double> memory_weights,
                             double flip_threshold, double ascent_strength) {
  constexpr const char* op = "curvkern::biostatis_update_";
  const Hyperparameters hp{.lr = learning_rate(lr_tensor, op),
                           .beta1 = beta1,
                           .beta2 = beta2,
                           .eps = eps,
                           .weight_decay = weight_decay,
                           .homeo_rate = homeo_rate,
                           .coherence_target = coherence_target,
                           .energy_target = energy_target,
                           .lambda_energy = lambda_energy,
                           .memory_decays = memory_decays,
                           .memory_weights = memory_weights,
                           .flip_threshold = flip_threshold,
                           .ascent_strength = ascent_strength};
  check_update_arguments(params, grads, exp_avgs, exp_avg_sqs, memory_emas, steps, sums, group_sums, hp, op);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor columns = at::zeros({n, kColumns}, at::kDouble);
  if (n == 0) return columns;

  const at::ScalarType dtype = common_dtype(params, op, "parameters");
  StreamableTensors layout(op);
  const UpdateViews views = prepare_update_views(layout, params, grads, exp_avgs, exp_avg_sqs, memory_emas,
                                                 static_cast<int64_t>(memory_decays.size()), dtype, op);
  const at::Tensor sum_table = sums.contiguous();
  const double* rows = sum_table.const_data_ptr<double>();
  for (int64_t t = 0; t < n; ++t) {
    // A sharded tensor's row is summed over its shards (docs/distributed.md): it counts at least the local ones.
    TORCH_CHECK(rows[t * kSumColumns + kColNumel] >= static_cast<double>(params[t].numel()), op, ": sums row ", t,
                " counts fewer elements than parameter ", t, " holds: it does not belong to it");
  }
  std::vector<double> step_counts(n);
  for (int64_t t = 0; t < n; ++t) step_counts[t] = advance_step(steps[t], op);
  const at::Tensor group_table = group_sums.contiguous();
  scalar_stage(rows, group_table.const_data_ptr<double>(), step_counts, hp, columns.data_ptr<double>());
  with_dtype(dtype, op, "parameters", [&](auto tag) {
    using P = typename decltype(tag)::type;
    run_pass_b(ChunkTable(numels_of(params), kChunkElements),
               pass_b_plan<P>(views, columns.const_data_ptr<double>(), hp));
  });
  layout.write_back();
  return columns;
}

}  // namespace curvkern
