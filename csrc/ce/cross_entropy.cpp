// Fused cross-entropy kernels on CPU: forward (loss, lse), backward (gradient) and the loss-Hessian-vector
// product, following docs/cross_entropy.md.
//
// One OpenMP parallel region per kernel splits the rows across threads. The HVP reads a row in two sweeps:
// the first (stats_sweep) keeps an online max, sum of e^{z-max} and <e^{z-max}, u> block by block (a block
// is re-read from L1 right after its max is taken) and keeps each e^{z - shift} in a per-thread row buffer;
// the second (hvp_sweep) rescales them into p and writes, reading u while it is still in L2 (a
// 50k-vocabulary row is 200 KB of fp32), so each element costs one exp (csrc/vec.h). K tangents share the
// row's sweep 1 and its kept exps: each further tangent costs one read of itself for its sums and one
// write (tangent_sums, hvp_tangent). Ignored rows are
// written as zeros without reading the logits. bf16/fp16 accumulate in fp32, fp64 in fp64. Indexing is
// 64-bit and a row may start anywhere (row stride >= V, or 0 for a broadcast u); the last dimension must be
// dense.
#include "ce/cross_entropy.h"

#include <ATen/Parallel.h>
#include <omp.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_dispatch.h"
#include "huge_pages.h"
#include "vec.h"

namespace curvkern {

namespace {

// Elements per block of the online sweep: small enough that its second read hits L1.
constexpr int64_t kBlock = 1024;

template <typename A>
struct RowStats {
  A max;        // running max (the shift of every e^{z - max} below)
  A sum_exp;    // sum of e^{z - max}
  A sum_exp_u;  // <e^{z - max}, u>
  A sum_z;      // sum of z (label smoothing)
  A sum_u;      // sum of u (label smoothing)
  A sum_d;      // Σ d_j, the row's dense target (probability targets; DenseTarget)
};

// A row's target without a dense part: the sweeps sum z and u themselves (kSums) where smoothing asks.
struct NoDenseTarget {
  static constexpr bool kActive = false, kProbs = false;
};

// The part d_j of the row's weighted target q̃ on every class (docs/cross_entropy.md, "Loss variants"), where
// it is more than a constant: α/V·w_j for a class index with class weights and label smoothing (the label's
// (1 − α)·w_y apart; their sum α/V·Σ w is `total`), w_j·((1 − α)·t_j + α/V) for probability targets t (w_j = 1
// without weights; their sum per row is taken by the sweeps). The sweeps then sum d⊙z and d⊙u instead of z
// and u, and the gradient subtracts d_j instead of α/V.
template <typename T, bool kProbabilities, bool kWeighted>
struct DenseTarget {
  using A = at::opmath_type<T>;
  static constexpr bool kActive = true, kProbs = kProbabilities;
  const T* probs;   // the row's t (kProbs)
  const T* weight;  // w (kWeighted)
  A keep;           // 1 − α
  A uniform;        // α/V
  A total;          // Σ_j d_j, without kProbs

  CURVKERN_INLINE A at(int64_t j) const {
    A d = uniform;
    if constexpr (kProbs) d = keep * load(probs, j) + uniform;
    if constexpr (kWeighted) d *= load(weight, j);
    return d;
  }
};

// The hardware prefetcher of the benchmark VM falls behind loops with work per element (see
// csrc/multi_tensor.h): request the next block of the row's streams while this one is computed.
template <bool kWithU, typename T>
CURVKERN_INLINE void prefetch_next_block(const T* z, const T* u, int64_t next, int64_t v) {
  constexpr int64_t kLineElements = 64 / sizeof(T);
  const int64_t end = std::min(next + kBlock, v);
  for (int64_t k = next; k < end; k += kLineElements) {
    prefetch_read(z + k);
    if constexpr (kWithU) prefetch_read(u + k);
  }
}

// Sweep 1 over one row: online max and sums, block by block. With u (the HVP), each e^{z - shift} is also
// kept in ``exps`` and each block's shift in ``shifts`` (-inf where the block was shifted by 0, everything
// before it being -inf), so sweep 2 rescales them instead of computing exp again. kCap: the logits are
// capped, z = cap·tanh(x/cap) (cap > 0), and the sums over u are over J⊙u with J = dz/dx = 1 − tanh²; the
// max is taken on x and capped after (the cap is increasing).
// With a dense target (Dense::kActive), sum_z and sum_u are Σ d⊙z and Σ d⊙u (J⊙u with a cap), and sum_d is Σ d
// with kProbs; kSums is then ignored.
template <bool kWithU, bool kSums, bool kCap = false, typename T, typename Dense = NoDenseTarget>
CURVKERN_INLINE RowStats<at::opmath_type<T>> stats_sweep(const T* z, const T* u, int64_t v, at::opmath_type<T>* exps,
                                                         at::opmath_type<T>* shifts,
                                                         at::opmath_type<T> cap = at::opmath_type<T>(0),
                                                         const Dense& dense = Dense{}) {
  using A = at::opmath_type<T>;
  constexpr A minus_inf = -std::numeric_limits<A>::infinity();
  RowStats<A> stats{minus_inf, A(0), A(0), A(0), A(0), A(0)};
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t length = std::min(kBlock, v - start);
    const T* zb = z + start;
    prefetch_next_block<kWithU>(z, u, start + kBlock, v);
    A block_max = minus_inf;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < length; ++j) {
      A x = load(zb, j);
      block_max = x > block_max ? x : block_max;
    }
    const A inverse_cap = kCap ? A(1) / cap : A(0);
    if constexpr (kCap) block_max = cap * vec::tanh(block_max * inverse_cap);
    if (block_max > stats.max) {
      A rescale = vec::exp(stats.max - block_max);
      stats.sum_exp *= rescale;
      stats.sum_exp_u *= rescale;
      stats.max = block_max;
    }
    // While everything seen is -inf, shift by 0: -inf entries add e^{-inf} = 0 and NaN still propagates.
    const A shift = stats.max == minus_inf ? A(0) : stats.max;
    A sum_exp = 0, sum_exp_u = 0, sum_z = 0, sum_u = 0, sum_d = 0;
    if constexpr (kWithU) {
      const T* ub = u + start;
      A* eb = exps + start;
      shifts[start / kBlock] = stats.max;
#pragma omp simd reduction(+ : sum_exp, sum_exp_u, sum_u, sum_d)
      for (int64_t j = 0; j < length; ++j) {
        A x = load(zb, j);
        A uj = load(ub, j);
        if constexpr (kCap) {
          const A t = vec::tanh(x * inverse_cap);
          x = cap * t;
          uj *= A(1) - t * t;
        }
        A e = vec::exp(x - shift);
        eb[j] = e;
        sum_exp += e;
        sum_exp_u += e * uj;
        if constexpr (Dense::kActive) {
          const A d = dense.at(start + j);
          sum_u += d * uj;
          if constexpr (Dense::kProbs) sum_d += d;
        } else if constexpr (kSums) {
          sum_u += uj;
        }
      }
    } else {
#pragma omp simd reduction(+ : sum_exp, sum_z, sum_d)
      for (int64_t j = 0; j < length; ++j) {
        A x = load(zb, j);
        if constexpr (kCap) x = cap * vec::tanh(x * inverse_cap);
        sum_exp += vec::exp(x - shift);
        if constexpr (Dense::kActive) {
          const A d = dense.at(start + j);
          sum_z += d * x;
          if constexpr (Dense::kProbs) sum_d += d;
        } else if constexpr (kSums) {
          sum_z += x;
        }
      }
    }
    stats.sum_exp += sum_exp;
    stats.sum_exp_u += sum_exp_u;
    stats.sum_z += sum_z;
    stats.sum_u += sum_u;
    if constexpr (Dense::kProbs) stats.sum_d += sum_d;
  }
  return stats;
}

// stats_sweep with its template flags chosen at run time.
template <bool kWithU, typename T>
CURVKERN_INLINE RowStats<at::opmath_type<T>> stats_sweep_for(bool sums, at::opmath_type<T> cap, const T* z, const T* u,
                                                             int64_t v, at::opmath_type<T>* exps,
                                                             at::opmath_type<T>* shifts) {
  if (cap != 0) {
    return sums ? stats_sweep<kWithU, true, true>(z, u, v, exps, shifts, cap)
                : stats_sweep<kWithU, false, true>(z, u, v, exps, shifts, cap);
  }
  return sums ? stats_sweep<kWithU, true>(z, u, v, exps, shifts) : stats_sweep<kWithU, false>(z, u, v, exps, shifts);
}

// fp32 HVP results larger than the caches, written into a caller's buffer, go out with streaming stores
// (AVX-512, when avx512 is the active ISA): an ordinary store first reads the line it writes
// (read-for-ownership), a third more traffic on the output of a memory-bound kernel. Not into a fresh
// allocation: there the kernel's zeroing of each newly touched page has just put it in cache, and
// ordinary stores measured faster. Same values, same rounding: only the store instruction differs.
constexpr int64_t kStreamingBytes = 64 << 20;

#if defined(__x86_64__)
__attribute__((target("avx512f"))) void stream_hvp_block(float* out, const float* exps, const float* u, float factor,
                                                         float u_coef, float p_dot_u, int64_t length) {
  int64_t j = 0;
  for (; j < length && reinterpret_cast<uintptr_t>(out + j) % 64 != 0; ++j)
    out[j] = factor * exps[j] * (u_coef * u[j] - p_dot_u);
  const __m512 factors = _mm512_set1_ps(factor), coefs = _mm512_set1_ps(u_coef), shift = _mm512_set1_ps(p_dot_u);
  for (; j + 16 <= length; j += 16) {
    const __m512 scaled = _mm512_mul_ps(factors, _mm512_loadu_ps(exps + j));
    const __m512 uj = _mm512_mul_ps(coefs, _mm512_loadu_ps(u + j));
    _mm512_stream_ps(out + j, _mm512_mul_ps(scaled, _mm512_sub_ps(uj, shift)));
  }
  for (; j < length; ++j) out[j] = factor * exps[j] * (u_coef * u[j] - p_dot_u);
}
#endif

template <typename T>
bool streams_output(int64_t rows, int64_t classes) {
#if defined(__x86_64__)
  return std::is_same_v<T, float> && rows * classes * int64_t(sizeof(float)) >= kStreamingBytes &&
         active_isa() == CpuIsa::kAvx512;
#else
  return false;
#endif
}

// Streaming stores are weakly ordered: a thread drains its own before the region's closing barrier.
CURVKERN_INLINE void drain_streaming_stores() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Per-thread room for one row's e^{z - shift} and its blocks' shifts.
int64_t scratch_size(int64_t classes) { return classes + (classes + kBlock - 1) / kBlock; }

template <typename T>
CURVKERN_INLINE void write_zeros(T* out, int64_t v) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] = T(0);
}

template <typename T>
CURVKERN_INLINE void write_nan(T* out, int64_t v) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] = T(std::numeric_limits<float>::quiet_NaN());
}

// What every kernel needs to find row r: base pointers, strides, sizes, the label rule. The row's classes
// may be one shard of a vocabulary-parallel row: columns class_offset .. class_offset + classes of
// total_classes (0 and classes for a whole row).
template <typename T>
struct Problem {
  const T* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  int64_t rows, classes, ignore_index, shift_period;
  at::opmath_type<T> label_smoothing;
  int64_t class_offset, total_classes;
  at::opmath_type<T> z_loss = 0;        // λ: λ·lse² per row (0: none)
  at::opmath_type<T> softcap = 0;       // c: logits capped to c·tanh(x/c) (0: none)
  const T* class_weight = nullptr;      // (classes,) class weights w (nullptr: none)
  at::opmath_type<T> weight_total = 0;  // Σ_j w_j (with class weights)
  // Probability targets: row r's t at probs + r·probs_row_stride (target is then unused; every row counts).
  bool soft_targets = false;
  const T* probs = nullptr;
  int64_t probs_row_stride = 0;

  // w_y, the row's class weight (1 without weights); y in range.
  CURVKERN_INLINE at::opmath_type<T> weight_of(int64_t y) const {
    return class_weight == nullptr ? at::opmath_type<T>(1) : at::opmath_type<T>(load(class_weight, y));
  }
  // Whether a variant leaves the plain loops: a z-loss, a cap, class weights or probability targets.
  CURVKERN_INLINE bool variants() const {
    return z_loss != 0 || softcap != 0 || class_weight != nullptr || soft_targets;
  }
  // Whether q̃ has a part on every class that is not a constant (DenseTarget): probability targets, or class
  // weights with label smoothing.
  CURVKERN_INLINE bool dense_target() const {
    return soft_targets || (class_weight != nullptr && label_smoothing != 0);
  }

  // The label of row r, or ignore_index: target[r], or target[r + 1] under the causal shift (the last
  // time step of each sequence has none).
  CURVKERN_INLINE int64_t label(int64_t r) const {
    if (shift_period == 0) return target[r];
    return (r + 1) % shift_period == 0 ? ignore_index : target[r + 1];
  }
  CURVKERN_INLINE const T* row(int64_t r) const { return logits + r * logits_row_stride; }
  CURVKERN_INLINE bool in_range(int64_t y) const { return y >= 0 && y < total_classes; }
  // Whether label y falls in this shard's columns.
  CURVKERN_INLINE bool in_shard(int64_t y) const { return y >= class_offset && y - class_offset < classes; }
};

// Calls body(dense) with row r's DenseTarget (Problem::dense_target()): its template flags chosen here, once
// per row, so that each combination is a loop of its own.
template <typename T, typename Body>
CURVKERN_INLINE void with_dense_target(const Problem<T>& p, int64_t r, Body&& body) {
  using A = at::opmath_type<T>;
  const A keep = A(1) - p.label_smoothing;
  const A uniform = p.classes > 0 ? p.label_smoothing / A(p.total_classes) : A(0);
  if (!p.soft_targets) {
    return body(DenseTarget<T, false, true>{nullptr, p.class_weight, keep, uniform, uniform * p.weight_total});
  }
  const T* t = p.probs + r * p.probs_row_stride;
  if (p.class_weight != nullptr) return body(DenseTarget<T, true, true>{t, p.class_weight, keep, uniform, A(0)});
  body(DenseTarget<T, true, false>{t, nullptr, keep, uniform, A(0)});
}

// Each kernel's arguments: the problem, and per row its outputs (in at::opmath_type<T>, or T for the
// gradient and the HVP) and inputs.
template <typename T>
struct ForwardArgs {
  Problem<T> problem;
  at::opmath_type<T>* loss;
  at::opmath_type<T>* lse;
};

template <typename T>
struct BackwardArgs {
  Problem<T> problem;
  const at::opmath_type<T>* lse;
  const at::opmath_type<T>* grad_scale;
  int64_t grad_scale_stride;  // 0: one scale for every row
  T* grad;
};

template <typename T>
struct StatsArgs {
  Problem<T> problem;
  const T* u;  // nullptr: the statistics of the logits alone
  int64_t u_row_stride;
  at::opmath_type<T>* stats;  // (rows, kStatsColumns)
};

template <typename T>
struct ShardHvpArgs {
  Problem<T> problem;
  const T* u;
  int64_t u_row_stride;
  const at::opmath_type<T>* lse;
  const at::opmath_type<T>* p_dot_u;
  const at::opmath_type<T>* scale;
  int64_t scale_stride;
  T* out;
  int64_t out_row_stride;
};

template <typename T>
struct HvpArgs {
  Problem<T> problem;
  int64_t tangents;  // K: tangent k's rows start at u + k·u_tangent_stride and out + k·out_tangent_stride
  const T* u;
  int64_t u_tangent_stride, u_row_stride;  // u_row_stride 0: one u for every row
  const at::opmath_type<T>* scale;
  int64_t scale_stride;  // 0: one scale for every row
  T* out;
  int64_t out_tangent_stride, out_row_stride;
  at::opmath_type<T>* dot;  // (K, rows)
  bool stream_output;       // streaming stores for `out` (streams_output)

  CURVKERN_INLINE const T* u_row(int64_t k, int64_t r) const { return u + k * u_tangent_stride + r * u_row_stride; }
  CURVKERN_INLINE T* out_row(int64_t k, int64_t r) const { return out + k * out_tangent_stride + r * out_row_stride; }
  CURVKERN_INLINE at::opmath_type<T>& dot_of(int64_t k, int64_t r) const { return dot[k * problem.rows + r]; }
};

// The per-row bodies below are force-inlined into the ISA versions' parallel loops (the parallel loop must
// sit in the ISA's function itself: GCC outlines an OpenMP region from the function that holds it, and
// the outlined body inherits that function's target; csrc/cpu_dispatch.h).
// A row with a dense target (DenseTarget; y, the label, unused with probability targets): one sweep for lse,
// Σ d⊙z (and Σ d), then ℓ = W·lse − ⟨q̃, z⟩ + λ·lse² with q̃ = d + (1 − α)·w_y·e_y and W = Σ q̃.
template <typename T, typename Dense>
CURVKERN_INLINE void forward_row_dense(const ForwardArgs<T>& args, int64_t r, int64_t y, const Dense& dense) {
  using A = at::opmath_type<T>;
  const Problem<T>& p = args.problem;
  const T* z = p.row(r);
  const RowStats<A> stats = p.softcap != A(0)
                                ? stats_sweep<false, false, true>(z, z, p.classes, nullptr, nullptr, p.softcap, dense)
                                : stats_sweep<false, false, false>(z, z, p.classes, nullptr, nullptr, A(0), dense);
  const A row_lse = stats.max + std::log(stats.sum_exp);
  args.lse[r] = row_lse;
  A weight_sum = Dense::kProbs ? stats.sum_d : dense.total;
  A row_loss = -stats.sum_z;
  if constexpr (!Dense::kProbs) {
    if (!p.in_range(y)) {  // the Python layer raises first on CPU; never read out of bounds regardless
      args.loss[r] = std::numeric_limits<A>::quiet_NaN();
      return;
    }
    const A spike = dense.keep * p.weight_of(y);
    const A z_y = p.softcap != A(0) ? p.softcap * vec::tanh(load(z, y) / p.softcap) : load(z, y);
    weight_sum += spike;
    row_loss -= spike * z_y;
  }
  row_loss += weight_sum * row_lse;
  if (p.z_loss != A(0)) row_loss += p.z_loss * row_lse * row_lse;
  args.loss[r] = row_loss;
}

template <typename T>
CURVKERN_INLINE void forward_row(const ForwardArgs<T>& args, int64_t r) {
  using A = at::opmath_type<T>;
  const Problem<T>& p = args.problem;
  const int64_t y = p.soft_targets ? 0 : p.label(r);  // every row counts with probability targets
  if (y == p.ignore_index && !p.soft_targets) {
    args.loss[r] = A(0);
    args.lse[r] = A(0);
    return;
  }
  if (p.dense_target()) {
    with_dense_target(p, r, [&](const auto& dense) CURVKERN_INLINE_LAMBDA { forward_row_dense(args, r, y, dense); });
    return;
  }
  const T* z = p.row(r);
  const bool smoothing = p.label_smoothing != A(0);
  RowStats<A> stats = stats_sweep_for<false>(smoothing, p.softcap, z, z, p.classes, nullptr, nullptr);
  const A row_lse = stats.max + std::log(stats.sum_exp);
  args.lse[r] = row_lse;
  if (!p.in_range(y)) {  // the Python layer raises first on CPU; never read out of bounds regardless
    args.loss[r] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  const A z_y = p.softcap != A(0) ? p.softcap * vec::tanh(load(z, y) / p.softcap) : load(z, y);
  A row_loss = row_lse - (A(1) - p.label_smoothing) * z_y;
  if (smoothing) row_loss -= p.label_smoothing / A(p.classes) * stats.sum_z;
  if (p.class_weight != nullptr) row_loss *= p.weight_of(y);  // w_y·(lse − z_y): smoothing is dense_target()
  if (p.z_loss != A(0)) row_loss += p.z_loss * row_lse * row_lse;
  args.loss[r] = row_loss;
}

// The backward with a z-loss, a soft cap or class weights: scale·J⊙(a·p − q̃) with a = w_y + 2λ·lse, q̃ the
// target times w_y, and p = e^{z − lse} of the capped logits z = c·tanh(x/c), J = 1 − tanh² (J = 1, z = x
// without a cap).
template <typename T, typename A>
CURVKERN_INLINE void backward_row_variants(const Problem<T>& p, const T* z, T* out, int64_t y, A scale, A row_lse,
                                           A uniform) {
  const A label_weight = p.in_range(y) ? p.weight_of(y) : A(1);
  const A a = label_weight + A(2) * p.z_loss * row_lse;
  const A cap = p.softcap;
  if (cap != A(0)) {
    const A inverse_cap = A(1) / cap;
#pragma omp simd
    for (int64_t j = 0; j < p.classes; ++j) {
      const A t = vec::tanh(load(z, j) * inverse_cap);
      store(out, j, scale * (A(1) - t * t) * (a * vec::exp(cap * t - row_lse) - uniform));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < p.classes; ++j) store(out, j, scale * (a * vec::exp(load(z, j) - row_lse) - uniform));
  }
  if (!p.in_shard(y)) return;
  const int64_t j = y - p.class_offset;
  const A t = cap != A(0) ? vec::tanh(load(z, j) / cap) : A(0);
  const A x = cap != A(0) ? cap * t : A(load(z, j));
  const A jacobian = cap != A(0) ? A(1) - t * t : A(1);
  store(out, j, scale * jacobian * (a * vec::exp(x - row_lse) - uniform - (A(1) - p.label_smoothing) * label_weight));
}

// The backward with a dense target (DenseTarget): scale·J⊙(a·p − q̃), q̃ = d + (1 − α)·w_y·e_y (no label with
// probability targets), a = W + 2λ·lse with W = Σ q̃ (with probabilities one sweep over d first).
template <typename T, typename A, typename Dense>
CURVKERN_INLINE void backward_row_dense(const Problem<T>& p, const T* z, T* out, int64_t y, A scale, A row_lse,
                                        const Dense& dense) {
  A weight_sum = dense.total;
  if constexpr (Dense::kProbs) {
    weight_sum = A(0);
#pragma omp simd reduction(+ : weight_sum)
    for (int64_t j = 0; j < p.classes; ++j) weight_sum += dense.at(j);
  }
  const A spike = Dense::kProbs ? A(0) : dense.keep * p.weight_of(y);
  const A a = weight_sum + spike + A(2) * p.z_loss * row_lse;
  const A cap = p.softcap;
  if (cap != A(0)) {
    const A inverse_cap = A(1) / cap;
#pragma omp simd
    for (int64_t j = 0; j < p.classes; ++j) {
      const A t = vec::tanh(load(z, j) * inverse_cap);
      store(out, j, scale * (A(1) - t * t) * (a * vec::exp(cap * t - row_lse) - dense.at(j)));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < p.classes; ++j) store(out, j, scale * (a * vec::exp(load(z, j) - row_lse) - dense.at(j)));
  }
  if constexpr (!Dense::kProbs) {
    const A t = cap != A(0) ? vec::tanh(load(z, y) / cap) : A(0);
    const A x = cap != A(0) ? cap * t : A(load(z, y));
    const A jacobian = cap != A(0) ? A(1) - t * t : A(1);
    store(out, y, scale * jacobian * (a * vec::exp(x - row_lse) - dense.at(y) - spike));
  }
}

template <typename T>
CURVKERN_INLINE void backward_row(const BackwardArgs<T>& args, int64_t r) {
  using A = at::opmath_type<T>;
  const Problem<T>& p = args.problem;
  T* out = args.grad + r * p.classes;
  const int64_t y = p.soft_targets ? 0 : p.label(r);  // every row counts with probability targets
  if (!p.soft_targets) {
    if (y == p.ignore_index) {
      write_zeros(out, p.classes);
      return;
    }
    if (!p.in_range(y)) {
      write_nan(out, p.classes);
      return;
    }
  }
  const T* z = p.row(r);
  const A scale = args.grad_scale[r * args.grad_scale_stride];
  const A row_lse = args.lse[r];
  if (p.dense_target()) {
    with_dense_target(p, r, [&](const auto& dense) CURVKERN_INLINE_LAMBDA {
      backward_row_dense(p, z, out, y, scale, row_lse, dense);
    });
    return;
  }
  const A uniform = p.label_smoothing / A(p.total_classes);
  if (p.variants()) {
    backward_row_variants(p, z, out, y, scale, row_lse, uniform);
    return;
  }
  for (int64_t start = 0; start < p.classes; start += kBlock) {
    const int64_t end = std::min(start + kBlock, p.classes);
    prefetch_next_block<false>(z, z, start + kBlock, p.classes);
#pragma omp simd
    for (int64_t j = start; j < end; ++j) store(out, j, scale * (vec::exp(load(z, j) - row_lse) - uniform));
  }
  if (!p.in_shard(y)) return;
  const int64_t j = y - p.class_offset;
  store(out, j, scale * (vec::exp(load(z, j) - row_lse) - uniform - (A(1) - p.label_smoothing)));
}

// Columns of a shard's row statistics (curvkern.families.LossKernels.partial_stats): max, sum of e^{z-max},
// <e^{z-max}, u>, w at the label (w = u, or z without u), sum of w (label smoothing only).
constexpr int64_t kStatsColumns = 5;

// One row's statistics over this shard; scratch (scratch_size(classes) elements) is used with u only.
template <typename T>
CURVKERN_INLINE void stats_row(const StatsArgs<T>& args, int64_t r, at::opmath_type<T>* scratch) {
  using A = at::opmath_type<T>;
  const Problem<T>& p = args.problem;
  A* out = args.stats + r * kStatsColumns;
  const int64_t y = p.label(r);
  if (y == p.ignore_index) {
    for (int64_t c = 0; c < kStatsColumns; ++c) out[c] = A(0);
    return;
  }
  const T* z = p.row(r);
  const T* u_row = args.u == nullptr ? nullptr : args.u + r * args.u_row_stride;
  const bool smoothing = p.label_smoothing != A(0);
  RowStats<A> stats;
  if (u_row != nullptr) {
    A* shifts = scratch + p.classes;
    stats = smoothing ? stats_sweep<true, true>(z, u_row, p.classes, scratch, shifts)
                      : stats_sweep<true, false>(z, u_row, p.classes, scratch, shifts);
  } else {
    stats = smoothing ? stats_sweep<false, true>(z, z, p.classes, nullptr, nullptr)
                      : stats_sweep<false, false>(z, z, p.classes, nullptr, nullptr);
  }
  const T* w = u_row != nullptr ? u_row : z;
  A at_label = A(0);
  if (!p.in_range(y)) {
    at_label = std::numeric_limits<A>::quiet_NaN();
  } else if (p.in_shard(y)) {
    at_label = load(w, y - p.class_offset);
  }
  out[0] = stats.max;
  out[1] = stats.sum_exp;
  out[2] = stats.sum_exp_u;
  out[3] = at_label;
  out[4] = u_row != nullptr ? stats.sum_u : stats.sum_z;
}

// One row of a shard's HVP given the whole row's lse and <p, u>: scale * e^{z - lse} * (u - <p, u>).
template <typename T>
CURVKERN_INLINE void shard_hvp_row(const ShardHvpArgs<T>& args, int64_t r) {
  using A = at::opmath_type<T>;
  const Problem<T>& p = args.problem;
  T* out_row = args.out + r * args.out_row_stride;
  const int64_t y = p.label(r);
  if (y == p.ignore_index) {
    write_zeros(out_row, p.classes);
    return;
  }
  if (!p.in_range(y)) {
    write_nan(out_row, p.classes);
    return;
  }
  const T* z = p.row(r);
  const T* u_row = args.u + r * args.u_row_stride;
  const A scale = args.scale[r * args.scale_stride], row_lse = args.lse[r], p_dot_u = args.p_dot_u[r];
  for (int64_t start = 0; start < p.classes; start += kBlock) {
    const int64_t end = std::min(start + kBlock, p.classes);
    prefetch_next_block<true>(z, u_row, start + kBlock, p.classes);
#pragma omp simd
    for (int64_t j = start; j < end; ++j)
      store(out_row, j, scale * vec::exp(load(z, j) - row_lse) * (load(u_row, j) - p_dot_u));
  }
}

// Sweep 2 of an HVP row: u is still in cache, p_j = e_j e^{shift - max} / sum from the kept e_j, and
// out_j = weight·e^{shift - max}·e_j·(u_j − <p, u>). A block shifted by 0 (stored as -inf) holds only zeros
// and NaN: its factor e^{-inf - max} is 0, so a NaN stays NaN.
template <typename T, typename A>
CURVKERN_INLINE void hvp_sweep(T* out_row, const T* u_row, const A* exps, const A* shifts, int64_t v, A max, A weight,
                               A u_coef, A p_dot_u, bool stream_output) {
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t length = std::min(kBlock, v - start);
    const A factor = weight * vec::exp(shifts[start / kBlock] - max);
    const A* eb = exps + start;
    const T* ub = u_row + start;
    T* ob = out_row + start;
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, float>) {
      if (stream_output) {
        stream_hvp_block(ob, eb, ub, factor, u_coef, p_dot_u, length);
        continue;
      }
    }
#endif
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) store(ob, j, factor * eb[j] * (u_coef * load(ub, j) - p_dot_u));
  }
}

// Sweep 2 of a soft-capped HVP row (docs/cross_entropy.md, "Loss variants"): with t = tanh(x/c), J = 1 − t²,
// z'' = −(2/c)·t·J, p_j from the kept e_j, g = a·p − α/V (the label's term added after):
// out = scale·(J·(a·p·(J·u − <p, J⊙u>) + 2λ·p·<p, J⊙u>) + g·z''·u). With a dense target, g = a·p − d.
template <typename T, typename A, typename Dense = NoDenseTarget>
CURVKERN_INLINE void hvp_sweep_capped(T* out_row, const T* u_row, const T* z, const A* exps, const A* shifts, int64_t v,
                                      A max, A inverse_sum, A scale, A a, A two_lambda, A p_dot_v, A uniform, A cap,
                                      const Dense& dense = Dense{}) {
  const A inverse_cap = A(1) / cap;
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t length = std::min(kBlock, v - start);
    const A factor = inverse_sum * vec::exp(shifts[start / kBlock] - max);
    const A* eb = exps + start;
    const T* ub = u_row + start;
    const T* zb = z + start;
    T* ob = out_row + start;
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) {
      const A t = vec::tanh(load(zb, j) * inverse_cap);
      const A jacobian = A(1) - t * t;
      const A second = A(-2) * inverse_cap * t * jacobian;
      const A pj = factor * eb[j];
      const A uj = load(ub, j);
      const A h = a * pj * (jacobian * uj - p_dot_v) + two_lambda * pj * p_dot_v;
      A target = uniform;
      if constexpr (Dense::kActive) target = dense.at(start + j);
      store(ob, j, scale * (jacobian * h + (a * pj - target) * second * uj));
    }
  }
}

// Sweep 1's sums for a further tangent u of a row whose e^{z - shift} it kept: Σ e^{z - max}·u (with a cap,
// J⊙u, J recomputed from z) and Σ u (kSums), block by block from the kept exps, so K tangents read and
// exponentiate the logits once. With a dense target, sum_u is Σ d⊙u (d⊙J⊙u with a cap).
template <bool kSums, bool kCap, typename T, typename A, typename Dense = NoDenseTarget>
CURVKERN_INLINE void tangent_sums(const T* z, const T* u, const A* exps, const A* shifts, int64_t v, A max, A cap,
                                  A& sum_exp_u, A& sum_u, const Dense& dense = Dense{}) {
  const A inverse_cap = kCap ? A(1) / cap : A(0);
  sum_exp_u = 0;
  sum_u = 0;
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t length = std::min(kBlock, v - start);
    prefetch_next_block<kCap>(u, z, start + kBlock, v);
    const T* ub = u + start;
    const T* zb = z + start;
    const A* eb = exps + start;
    A block_exp_u = 0, block_u = 0;
#pragma omp simd reduction(+ : block_exp_u, block_u)
    for (int64_t j = 0; j < length; ++j) {
      A uj = load(ub, j);
      if constexpr (kCap) {
        const A t = vec::tanh(load(zb, j) * inverse_cap);
        uj *= A(1) - t * t;
      }
      block_exp_u += eb[j] * uj;
      if constexpr (Dense::kActive) {
        block_u += dense.at(start + j) * uj;
      } else if constexpr (kSums) {
        block_u += uj;
      }
    }
    sum_exp_u += vec::exp(shifts[start / kBlock] - max) * block_exp_u;
    sum_u += block_u;
  }
}

// What every tangent of a valid row shares: its label, statistics and the constants of its Hessian.
template <typename A>
struct HvpRow {
  int64_t y;
  A max, inverse_sum, scale, two_lambda, label_weight, a;
};

// Tangent k of a valid row, from <e^{z - max}, u> (J⊙u with a cap) and Σ u: writes its row of out and
// its dot.
template <typename T, typename A>
CURVKERN_INLINE void hvp_tangent(const HvpArgs<T>& args, int64_t r, int64_t k, const HvpRow<A>& row, const A* exps,
                                 const A* shifts, A sum_exp_u, A sum_u) {
  const Problem<T>& p = args.problem;
  const T* z = p.row(r);
  const T* u_row = args.u_row(k, r);
  T* out_row = args.out_row(k, r);
  const int64_t y = row.y;
  // <p, u>, or <p, J⊙u> with a cap.
  const A p_dot_u = sum_exp_u * row.inverse_sum;
  A u_y = load(u_row, y);
  if (p.softcap != A(0)) {
    const A uniform = p.label_smoothing / A(p.classes);
    hvp_sweep_capped(out_row, u_row, z, exps, shifts, p.classes, row.max, row.inverse_sum, row.scale, row.a,
                     row.two_lambda, p_dot_u, uniform, p.softcap);
    // The label's element: g_y has the extra −(1 − α).
    const A t = vec::tanh(load(z, y) / p.softcap);
    const A jacobian = A(1) - t * t;
    const A second = A(-2) / p.softcap * t * jacobian;
    const A p_y = row.inverse_sum * vec::exp(shifts[y / kBlock] - row.max) * exps[y];
    const A h = row.a * p_y * (jacobian * u_y - p_dot_u) + row.two_lambda * p_y * p_dot_u;
    const A g_y = row.a * p_y - uniform - (A(1) - p.label_smoothing) * row.label_weight;
    store(out_row, y, row.scale * (jacobian * h + g_y * second * u_y));
    u_y *= jacobian;
  } else {
    const A shift = p.variants() ? (row.a - row.two_lambda) * p_dot_u : p_dot_u;
    hvp_sweep(out_row, u_row, exps, shifts, p.classes, row.max, row.scale * row.inverse_sum, row.a, shift,
              args.stream_output);
  }
  A row_dot = row.a * p_dot_u - (A(1) - p.label_smoothing) * row.label_weight * u_y;
  if (p.label_smoothing != A(0)) row_dot -= p.label_smoothing / A(p.classes) * sum_u;
  args.dot_of(k, r) = row_dot;
}

// Tangent k of a valid row with a dense target (DenseTarget; row.y unused with probability targets), from
// <e^{z - max}, v> and <d, v>, v = J⊙u: writes its row of out and its dot <v, g> with g = a·p − d − spike·e_y,
// spike = (1 − α)·w_y (0 with probabilities).
template <typename T, typename A, typename Dense>
CURVKERN_INLINE void hvp_tangent_dense(const HvpArgs<T>& args, int64_t r, int64_t k, const HvpRow<A>& row,
                                       const A* exps, const A* shifts, A sum_exp_u, A sum_d_u, const Dense& dense) {
  const Problem<T>& p = args.problem;
  const T* z = p.row(r);
  const T* u_row = args.u_row(k, r);
  T* out_row = args.out_row(k, r);
  const A p_dot_v = sum_exp_u * row.inverse_sum;
  const A spike = Dense::kProbs ? A(0) : dense.keep * row.label_weight;
  A row_dot = row.a * p_dot_v - sum_d_u;
  if (p.softcap != A(0)) {
    hvp_sweep_capped(out_row, u_row, z, exps, shifts, p.classes, row.max, row.inverse_sum, row.scale, row.a,
                     row.two_lambda, p_dot_v, A(0), p.softcap, dense);
    if constexpr (!Dense::kProbs) {  // the label's element: g_y has the extra −spike
      const int64_t y = row.y;
      const A u_y = load(u_row, y);
      const A t = vec::tanh(load(z, y) / p.softcap);
      const A jacobian = A(1) - t * t;
      const A second = A(-2) / p.softcap * t * jacobian;
      const A p_y = row.inverse_sum * vec::exp(shifts[y / kBlock] - row.max) * exps[y];
      const A h = row.a * p_y * (jacobian * u_y - p_dot_v) + row.two_lambda * p_y * p_dot_v;
      const A g_y = row.a * p_y - dense.at(y) - spike;
      store(out_row, y, row.scale * (jacobian * h + g_y * second * u_y));
      row_dot -= spike * jacobian * u_y;
    }
  } else {
    hvp_sweep(out_row, u_row, exps, shifts, p.classes, row.max, row.scale * row.inverse_sum, row.a,
              (row.a - row.two_lambda) * p_dot_v, args.stream_output);
    if constexpr (!Dense::kProbs) row_dot -= spike * load(u_row, row.y);
  }
  args.dot_of(k, r) = row_dot;
}

// One HVP row with a dense target, every tangent (hvp_row's sweeps, the sums over d⊙J⊙u instead of J⊙u); y is
// a valid label, or unused with probability targets.
template <typename T, typename Dense>
CURVKERN_INLINE void hvp_row_dense(const HvpArgs<T>& args, int64_t r, int64_t y, at::opmath_type<T>* scratch,
                                   const Dense& dense) {
  using A = at::opmath_type<T>;
  const Problem<T>& p = args.problem;
  const T* z = p.row(r);
  A* exps = scratch;
  A* shifts = scratch + p.classes;
  const T* u0 = args.u_row(0, r);
  const RowStats<A> stats = p.softcap != A(0)
                                ? stats_sweep<true, false, true>(z, u0, p.classes, exps, shifts, p.softcap, dense)
                                : stats_sweep<true, false, false>(z, u0, p.classes, exps, shifts, A(0), dense);
  const A two_lambda = A(2) * p.z_loss;
  const A label_weight = Dense::kProbs ? A(0) : p.weight_of(y);
  // W = Σ q̃ = Σ d + (1 − α)·w_y; a = W + 2λ·lse.
  const A weight_sum = Dense::kProbs ? stats.sum_d : dense.total + dense.keep * label_weight;
  const A a = p.z_loss != A(0) ? weight_sum + two_lambda * (stats.max + std::log(stats.sum_exp)) : weight_sum;
  const HvpRow<A> row{y, stats.max, A(1) / stats.sum_exp, args.scale[r * args.scale_stride], two_lambda, label_weight,
                      a};
  hvp_tangent_dense(args, r, 0, row, exps, shifts, stats.sum_exp_u, stats.sum_u, dense);
  for (int64_t k = 1; k < args.tangents; ++k) {
    A sum_exp_u, sum_d_u;
    const T* u_row = args.u_row(k, r);
    if (p.softcap != A(0)) {
      tangent_sums<false, true>(z, u_row, exps, shifts, p.classes, stats.max, p.softcap, sum_exp_u, sum_d_u, dense);
    } else {
      tangent_sums<false, false>(z, u_row, exps, shifts, p.classes, stats.max, A(0), sum_exp_u, sum_d_u, dense);
    }
    hvp_tangent_dense(args, r, k, row, exps, shifts, sum_exp_u, sum_d_u, dense);
  }
}

// One HVP row, every tangent; scratch holds scratch_size(classes) elements. Sweep 1 over the logits takes
// tangent 0's sums with it; a further tangent re-reads only itself (tangent_sums).
template <typename T>
CURVKERN_INLINE void hvp_row(const HvpArgs<T>& args, int64_t r, at::opmath_type<T>* scratch) {
  using A = at::opmath_type<T>;
  const Problem<T>& p = args.problem;
  const int64_t y = p.soft_targets ? 0 : p.label(r);  // every row counts with probability targets
  if (!p.soft_targets && (y == p.ignore_index || !p.in_range(y))) {
    for (int64_t k = 0; k < args.tangents; ++k) {
      if (y == p.ignore_index) {
        write_zeros(args.out_row(k, r), p.classes);
        args.dot_of(k, r) = A(0);
      } else {
        write_nan(args.out_row(k, r), p.classes);
        args.dot_of(k, r) = std::numeric_limits<A>::quiet_NaN();
      }
    }
    return;
  }
  if (p.dense_target()) {
    with_dense_target(p, r,
                      [&](const auto& dense) CURVKERN_INLINE_LAMBDA { hvp_row_dense(args, r, y, scratch, dense); });
    return;
  }
  const T* z = p.row(r);
  const bool smoothing = p.label_smoothing != A(0);
  A* exps = scratch;
  A* shifts = scratch + p.classes;
  const RowStats<A> stats = stats_sweep_for<true>(smoothing, p.softcap, z, args.u_row(0, r), p.classes, exps, shifts);
  // The z-loss: the row's gradient is a·p − q with a = 1 + 2λ·lse, its Hessian a·(diag p − p pᵀ) + 2λ·p pᵀ.
  // Class weights: the row's loss is w_y times the plain one (smoothing with weights is dense_target()), so
  // a = w_y + 2λ·lse.
  const A two_lambda = A(2) * p.z_loss;
  const A label_weight = p.weight_of(y);
  const A a = p.z_loss != A(0) ? label_weight + two_lambda * (stats.max + std::log(stats.sum_exp)) : label_weight;
  const HvpRow<A> row{y, stats.max, A(1) / stats.sum_exp, args.scale[r * args.scale_stride], two_lambda, label_weight,
                      a};
  hvp_tangent(args, r, 0, row, exps, shifts, stats.sum_exp_u, stats.sum_u);
  for (int64_t k = 1; k < args.tangents; ++k) {
    A sum_exp_u, sum_u;
    const T* u_row = args.u_row(k, r);
    if (p.softcap != A(0)) {
      smoothing ? tangent_sums<true, true>(z, u_row, exps, shifts, p.classes, stats.max, p.softcap, sum_exp_u, sum_u)
                : tangent_sums<false, true>(z, u_row, exps, shifts, p.classes, stats.max, p.softcap, sum_exp_u, sum_u);
    } else {
      smoothing ? tangent_sums<true, false>(z, u_row, exps, shifts, p.classes, stats.max, A(0), sum_exp_u, sum_u)
                : tangent_sums<false, false>(z, u_row, exps, shifts, p.classes, stats.max, A(0), sum_exp_u, sum_u);
    }
    hvp_tangent(args, r, k, row, exps, shifts, sum_exp_u, sum_u);
  }
}

// The kernels' OpenMP regions, stamped by macro (why: csrc/cpu_dispatch.h). CURVKERN_FOR_EACH_DTYPE below
// defines ce_forward_<dtype>_<isa>, ce_backward_<dtype>_<isa> and ce_hvp_<dtype>_<isa> for every dtype and
// ISA, each one region over the rows, and per dtype run_forward, run_backward and run_hvp, which run the
// active ISA's. The HVP's region gives each thread its scratch row.
#define CURVKERN_CE_REGIONS(isa, target, T, dtype)                                              \
  target void ce_forward_##dtype##_##isa(const ForwardArgs<T>& args) {                          \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")             \
    for (int64_t r = 0; r < args.problem.rows; ++r) forward_row(args, r);                       \
  }                                                                                             \
  target void ce_backward_##dtype##_##isa(const BackwardArgs<T>& args) {                        \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")             \
    for (int64_t r = 0; r < args.problem.rows; ++r) backward_row(args, r);                      \
  }                                                                                             \
  target void ce_hvp_##dtype##_##isa(const HvpArgs<T>& args) {                                  \
    _Pragma("omp parallel num_threads(at::get_num_threads())")                                  \
    {                                                                                           \
      std::vector<at::opmath_type<T>> scratch(scratch_size(args.problem.classes));              \
      _Pragma("omp for schedule(static)")                                                       \
      for (int64_t r = 0; r < args.problem.rows; ++r) hvp_row(args, r, scratch.data());         \
      if (args.stream_output) drain_streaming_stores();                                         \
    }                                                                                           \
  }                                                                                             \
  target void ce_stats_##dtype##_##isa(const StatsArgs<T>& args) {                              \
    _Pragma("omp parallel num_threads(at::get_num_threads())")                                  \
    {                                                                                           \
      std::vector<at::opmath_type<T>> scratch(args.u ? scratch_size(args.problem.classes) : 0); \
      _Pragma("omp for schedule(static)")                                                       \
      for (int64_t r = 0; r < args.problem.rows; ++r) stats_row(args, r, scratch.data());       \
    }                                                                                           \
  }                                                                                             \
  target void ce_shard_hvp_##dtype##_##isa(const ShardHvpArgs<T>& args) {                       \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")             \
    for (int64_t r = 0; r < args.problem.rows; ++r) shard_hvp_row(args, r);                     \
  }
#define CURVKERN_CE_KERNELS(T, dtype)                                                                     \
  CURVKERN_FOR_EACH_ISA(CURVKERN_CE_REGIONS, T, dtype)                                                    \
  void run_forward(const ForwardArgs<T>& args) { CURVKERN_CALL_ACTIVE_ISA(ce_forward_##dtype, args); }    \
  void run_backward(const BackwardArgs<T>& args) { CURVKERN_CALL_ACTIVE_ISA(ce_backward_##dtype, args); } \
  void run_hvp(const HvpArgs<T>& args) { CURVKERN_CALL_ACTIVE_ISA(ce_hvp_##dtype, args); }                \
  void run_stats(const StatsArgs<T>& args) { CURVKERN_CALL_ACTIVE_ISA(ce_stats_##dtype, args); }          \
  void run_shard_hvp(const ShardHvpArgs<T>& args) { CURVKERN_CALL_ACTIVE_ISA(ce_shard_hvp_##dtype, args); }

CURVKERN_FOR_EACH_DTYPE(CURVKERN_CE_KERNELS)
#undef CURVKERN_CE_KERNELS
#undef CURVKERN_CE_REGIONS

void check_rows(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& logits) {
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", tensor.device());
  TORCH_CHECK(tensor.dim() == 2 && tensor.sizes() == logits.sizes(), op, ": ", name, " must have shape ",
              logits.sizes(), ", got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == logits.scalar_type(), op, ": ", name, " must have the logits' dtype ",
              logits.scalar_type(), ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.size(1) <= 1 || tensor.stride(1) == 1, op, ": ", name,
              " must have a dense last dimension (stride 1), got strides ", tensor.strides());
}

// check_rows for (N, V) or K tangents (K, N, V): each tangent's rows as check_rows wants them.
void check_tangent_rows(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& logits) {
  if (tensor.dim() != 3) return check_rows(op, name, tensor, logits);
  TORCH_CHECK(tensor.size(1) == logits.size(0) && tensor.size(2) == logits.size(1), op, ": ", name,
              " must be (N, V) or (K, N, V) for logits of shape ", logits.sizes(), ", got ", tensor.sizes());
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == logits.scalar_type(), op, ": ", name,
              " must be a CPU tensor of the logits' dtype ", logits.scalar_type(), ", got ", tensor.scalar_type(),
              " on ", tensor.device());
  if (tensor.size(0) > 0) check_rows(op, name, tensor.select(0, 0), logits);
}

// Validates the logits and labels; returns the problem description for element type T. The target holds
// (N,) int64 class indices or, where `probabilities` allows them, (N, V) class probabilities: any floating
// dtype is taken for those and must then be the logits' dtype, with the logits' shape and a dense last
// dimension (any row stride), on the CPU, without the causal shift.
template <typename T>
Problem<T> make_problem(const char* op, const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                        double label_smoothing, int64_t shift_period, bool probabilities = false) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, V), got shape ", logits.sizes());
  check_rows(op, "logits", logits, logits);
  const bool soft = probabilities && at::isFloatingType(target.scalar_type());
  if (soft) {
    check_rows(op, "target (probabilities)", target, logits);
    TORCH_CHECK(shift_period == 0, op, ": the causal shift (shift_period ", shift_period,
                ") takes class indices, not probability targets");
  } else {
    TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                    target.size(0) == logits.size(0) && target.is_contiguous(),
                op, ": target must be a contiguous int64 CPU tensor of shape (", logits.size(0), ")",
                probabilities ? " or probabilities of the logits' shape and dtype" : "", ", got ", target.scalar_type(),
                " of shape ", target.sizes());
  }
  TORCH_CHECK(shift_period >= 0 && (shift_period == 0 || logits.size(0) % shift_period == 0), op,
              ": shift_period must be 0 or divide the number of rows ", logits.size(0), ", got ", shift_period);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  Problem<T> problem{logits.const_data_ptr<T>(),
                     logits.size(0) > 1 ? logits.stride(0) : logits.size(1),
                     soft ? nullptr : target.const_data_ptr<int64_t>(),
                     logits.size(0),
                     logits.size(1),
                     ignore_index,
                     shift_period,
                     static_cast<at::opmath_type<T>>(label_smoothing),
                     0,
                     logits.size(1)};
  if (soft) {
    problem.soft_targets = true;
    problem.probs = target.const_data_ptr<T>();
    problem.probs_row_stride = target.size(0) > 1 ? target.stride(0) : target.size(1);
  }
  return problem;
}

// make_problem for a shard: columns class_offset .. class_offset + V of num_classes.
template <typename T>
Problem<T> make_shard_problem(const char* op, const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                              double label_smoothing, int64_t class_offset, int64_t num_classes) {
  Problem<T> problem = make_problem<T>(op, logits, target, ignore_index, label_smoothing, 0);
  TORCH_CHECK(class_offset >= 0 && class_offset + logits.size(1) <= num_classes, op, ": a shard of ", logits.size(1),
              " classes at offset ", class_offset, " does not fit in num_classes=", num_classes);
  problem.class_offset = class_offset;
  problem.total_classes = num_classes;
  return problem;
}

// A contiguous (N,) tensor in the accumulation dtype (a row statistic).
void check_row_statistic(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& logits) {
  TORCH_CHECK(tensor.scalar_type() == opmath_dtype(logits.scalar_type()) && tensor.dim() == 1 &&
                  tensor.size(0) == logits.size(0) && tensor.is_contiguous() && tensor.device().is_cpu(),
              op, ": ", name, " must be a contiguous ", opmath_dtype(logits.scalar_type()), " CPU tensor of shape (",
              logits.size(0), "), got ", tensor.scalar_type(), " of shape ", tensor.sizes());
}

// A 0-dim or (N,) scale in the accumulation dtype; returns its element stride (0 when shared by all rows).
int64_t check_scale(const char* op, const char* name, const at::Tensor& scale, const at::Tensor& logits) {
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == opmath_dtype(logits.scalar_type()), op, ": ", name,
              " must be a ", opmath_dtype(logits.scalar_type()), " CPU tensor, got ", scale.scalar_type(), " on ",
              scale.device());
  if (scale.dim() == 0) return 0;
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == logits.size(0), op, ": ", name, " must be 0-dim or have shape (",
              logits.size(0), "), got ", scale.sizes());
  return scale.stride(0);
}

}  // namespace

// The variants' scalars: z_loss >= 0 and softcap >= 0 (0: no cap), and the class weights, set on the problem.
template <typename T>
void set_variants(const char* op, Problem<T>& problem, double z_loss, double softcap,
                  const std::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (weight.has_value()) {
    TORCH_CHECK(weight->device().is_cpu() && weight->scalar_type() == logits.scalar_type() && weight->dim() == 1 &&
                    weight->size(0) == logits.size(1) && weight->is_contiguous(),
                op, ": weight must be a contiguous (", logits.size(1), ",) ", logits.scalar_type(), " CPU tensor, got ",
                weight->scalar_type(), " of shape ", weight->sizes());
    problem.class_weight = weight->const_data_ptr<T>();
    double total = 0.0;  // Σ w_j, serially: the same bits on every run
    for (int64_t j = 0; j < weight->size(0); ++j) total += static_cast<double>(load(problem.class_weight, j));
    problem.weight_total = static_cast<at::opmath_type<T>>(total);
  }
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, op, ": z_loss must be finite and >= 0, got ", z_loss);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be finite and > 0 (0: no cap), got ",
              softcap);
  problem.z_loss = static_cast<at::opmath_type<T>>(z_loss);
  problem.softcap = static_cast<at::opmath_type<T>>(softcap);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         int64_t ignore_index, double label_smoothing, double z_loss,
                                                         double softcap, const std::optional<at::Tensor>& weight) {
  const char* op = "curvkern::cross_entropy_forward";
  auto options = logits.options().dtype(opmath_dtype(logits.scalar_type()));
  at::Tensor loss = at::empty({logits.size(0)}, options), lse = at::empty({logits.size(0)}, options);
  with_dtype(logits.scalar_type(), op, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = at::opmath_type<T>;
    Problem<T> problem = make_problem<T>(op, logits, target, ignore_index, label_smoothing, 0, true);
    set_variants(op, problem, z_loss, softcap, weight, logits);
    run_forward(ForwardArgs<T>{problem, loss.data_ptr<A>(), lse.data_ptr<A>()});
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                  const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing,
                                  double z_loss, double softcap, const std::optional<at::Tensor>& weight) {
  const char* op = "curvkern::cross_entropy_backward";
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  prefer_huge_pages(grad);
  with_dtype(logits.scalar_type(), op, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = at::opmath_type<T>;
    Problem<T> problem = make_problem<T>(op, logits, target, ignore_index, label_smoothing, 0, true);
    set_variants(op, problem, z_loss, softcap, weight, logits);
    check_row_statistic(op, "lse", lse, logits);
    const int64_t scale_stride = check_scale(op, "grad_scale", grad_scale, logits);
    run_backward(BackwardArgs<T>{problem, lse.const_data_ptr<A>(), grad_scale.const_data_ptr<A>(), scale_stride,
                                 grad.data_ptr<T>()});
  });
  return grad;
}

at::Tensor cross_entropy_hvp_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& u,
                              const at::Tensor& scale, int64_t ignore_index, double label_smoothing,
                              int64_t shift_period, bool stream_out, at::Tensor& out, double z_loss, double softcap,
                              const std::optional<at::Tensor>& weight) {
  const char* op = "curvkern::cross_entropy_hvp_";
  const bool several = u.dim() == 3;  // K tangents (K, N, V); else one (N, V)
  const int64_t tangents = several ? u.size(0) : 1;
  check_tangent_rows(op, "u", u, logits);
  check_tangent_rows(op, "out", out, logits);
  TORCH_CHECK(out.sizes() == u.sizes(), op, ": out must have u's shape ", u.sizes(), ", got ", out.sizes());
  auto dot_shape = several ? std::vector<int64_t>{tangents, logits.size(0)} : std::vector<int64_t>{logits.size(0)};
  at::Tensor dot = at::empty(dot_shape, logits.options().dtype(opmath_dtype(logits.scalar_type())));
  with_dtype(logits.scalar_type(), op, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = at::opmath_type<T>;
    Problem<T> problem = make_problem<T>(op, logits, target, ignore_index, label_smoothing, shift_period, true);
    set_variants(op, problem, z_loss, softcap, weight, logits);
    const int64_t scale_stride = check_scale(op, "scale", scale, logits);
    if (tangents == 0) return;
    prefer_huge_pages(out);
    run_hvp(HvpArgs<T>{.problem = problem,
                       .tangents = tangents,
                       .u = u.const_data_ptr<T>(),
                       .u_tangent_stride = several ? u.stride(0) : 0,
                       .u_row_stride = u.stride(-2),
                       .scale = scale.const_data_ptr<A>(),
                       .scale_stride = scale_stride,
                       .out = out.data_ptr<T>(),
                       .out_tangent_stride = several ? out.stride(0) : 0,
                       .out_row_stride = out.size(-2) > 1 ? out.stride(-2) : out.size(-1),
                       .dot = dot.data_ptr<A>(),
                       .stream_output = stream_out && streams_output<T>(tangents * problem.rows, problem.classes)});
  });
  return dot;
}

at::Tensor cross_entropy_partial_stats(const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& u, int64_t ignore_index, double label_smoothing,
                                       int64_t class_offset, int64_t num_classes) {
  const char* op = "curvkern::cross_entropy_partial_stats";
  at::Tensor stats =
      at::empty({logits.size(0), kStatsColumns}, logits.options().dtype(opmath_dtype(logits.scalar_type())));
  with_dtype(logits.scalar_type(), op, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = at::opmath_type<T>;
    const Problem<T> problem =
        make_shard_problem<T>(op, logits, target, ignore_index, label_smoothing, class_offset, num_classes);
    if (u.has_value()) check_rows(op, "u", *u, logits);
    run_stats(StatsArgs<T>{problem, u.has_value() ? u->const_data_ptr<T>() : nullptr, u.has_value() ? u->stride(0) : 0,
                           stats.data_ptr<A>()});
  });
  return stats;
}

at::Tensor cross_entropy_shard_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                        const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing,
                                        int64_t class_offset, int64_t num_classes) {
  const char* op = "curvkern::cross_entropy_shard_backward";
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  with_dtype(logits.scalar_type(), op, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = at::opmath_type<T>;
    const Problem<T> problem =
        make_shard_problem<T>(op, logits, target, ignore_index, label_smoothing, class_offset, num_classes);
    check_row_statistic(op, "lse", lse, logits);
    const int64_t scale_stride = check_scale(op, "grad_scale", grad_scale, logits);
    run_backward(BackwardArgs<T>{problem, lse.const_data_ptr<A>(), grad_scale.const_data_ptr<A>(), scale_stride,
                                 grad.data_ptr<T>()});
  });
  return grad;
}

void cross_entropy_shard_hvp_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& u,
                              const at::Tensor& lse, const at::Tensor& p_dot_u, const at::Tensor& scale,
                              int64_t ignore_index, int64_t num_classes, at::Tensor& out) {
  const char* op = "curvkern::cross_entropy_shard_hvp_";
  with_dtype(logits.scalar_type(), op, "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = at::opmath_type<T>;
    const Problem<T> problem = make_shard_problem<T>(op, logits, target, ignore_index, 0.0, 0, num_classes);
    check_rows(op, "u", u, logits);
    check_rows(op, "out", out, logits);
    check_row_statistic(op, "lse", lse, logits);
    check_row_statistic(op, "p_dot_u", p_dot_u, logits);
    const int64_t scale_stride = check_scale(op, "scale", scale, logits);
    run_shard_hvp(ShardHvpArgs<T>{.problem = problem,
                                  .u = u.const_data_ptr<T>(),
                                  .u_row_stride = u.stride(0),
                                  .lse = lse.const_data_ptr<A>(),
                                  .p_dot_u = p_dot_u.const_data_ptr<A>(),
                                  .scale = scale.const_data_ptr<A>(),
                                  .scale_stride = scale_stride,
                                  .out = out.data_ptr<T>(),
                                  .out_row_stride = out.size(0) > 1 ? out.stride(0) : out.size(1)});
  });
}

}  // namespace curvkern
