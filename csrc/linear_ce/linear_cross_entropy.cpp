// Fused linear + cross-entropy on CPU: forward, backward, double backward (HVP) and Gauss-Newton product over
// tiles of the logits, following docs/linear_cross_entropy.md and the eager reference
// (curvkern/linear_ce/eager.py) operation by operation.
//
// The matrix products are ATen's (at::mm / at::addmm per tile, so MKL, oneDNN or OpenBLAS); this file owns the
// rest: per tile one OpenMP region over its rows (stamped per ISA, csrc/cpu_dispatch.h) that does the softmax,
// the row reductions (online max, Σ exp, the target logit, ⟨p, u⟩) and the elementwise epilogue in place in the
// tile buffer, vectorized with csrc/vec.h. Tiles are computed in the accumulation dtype A (fp64 for fp64 inputs,
// fp32 for fp32 and bf16), into buffers of n_tile·v_tile elements (K times that for K tangents) allocated once
// per call; per-row statistics are (N) vectors. Offsets are 64-bit; inputs may have any strides. The loss
// variants (z-loss, soft cap, class weights) enter the row loops elementwise and through the per-row factor
// a = W + 2λ·lse and weight w_y, (N) vectors formed with ATen before the sweeps that read them.
#include "linear_ce/linear_cross_entropy.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu_dispatch.h"
#include "vec.h"

namespace curvkern {

namespace {

// What every element of one row's gradient and Hessian shares (docs/linear_cross_entropy.md, "Loss variants").
template <typename A>
struct RowTerms {
  A lse, scale;
  A factor;   // a = W + 2λ·lse, the factor of p in the gradient to the capped logits (1: plain)
  A uniform;  // α/V, the smoothing part of q̃ (times w_j with class weights)
  A cap, inverse_cap, curvature_scale;  // c, 1/c and −2/c² (with a cap only)
  A p_dot_v_shift;                      // (a − 2λ)·⟨p, J⊙u⟩ (the HVP's and Gauss-Newton product's second sweeps only)
};

// One tile: rows [row0, row0 + rows) and classes [col0, col0 + cols) of the logits, stored densely (row
// stride cols) in z and, for tangents, in u (tangent k at u + k·rows·cols).
template <typename A>
struct Tile {
  A* z;
  A* u;
  int64_t row0, rows, col0, cols, tangents;
  // What the rows need: their labels, whether they count, their scale and the label smoothing α/V.
  const int64_t* target;
  int64_t target_stride, ignore_index, classes;
  const A* scale;  // may be null (forward, and the statistics sweeps)
  int64_t scale_stride;
  A label_smoothing;
  const A* lse;  // forward's (backward, hvp) or null
  // The loss variants: λ, the cap c (0: none), the (V) class weights w, and per row (N) w_y and a (null: 1).
  A z_loss, softcap;
  const A* class_weight;
  const A* label_weight;
  const A* factor;

  CURVKERN_INLINE int64_t label(int64_t i) const { return target[(row0 + i) * target_stride]; }
  CURVKERN_INLINE bool valid(int64_t i) const { return label(i) != ignore_index; }
  // The label's column within the tile, or -1 when the row is ignored or its label lies outside the tile.
  CURVKERN_INLINE int64_t local_label(int64_t i) const {
    const int64_t y = label(i);
    return y != ignore_index && y >= col0 && y < col0 + cols ? y - col0 : -1;
  }
  // The row's scale, exactly 0 on an ignored row (a select: an infinite mean scale gives 0 there, not NaN).
  CURVKERN_INLINE A row_scale(int64_t i) const { return valid(i) ? scale[(row0 + i) * scale_stride] : A(0); }
  CURVKERN_INLINE A label_weight_of(int64_t i) const { return label_weight != nullptr ? label_weight[row0 + i] : A(1); }
  // q̃'s extra part at the label, −(1 − α)·w_y, added as the eager reference adds it.
  CURVKERN_INLINE A label_term(int64_t i) const { return (label_smoothing - A(1)) * label_weight_of(i); }
  // The tile's class weights, read only where the smoothing spreads them (kWeightedSpread).
  CURVKERN_INLINE const A* spread_weights() const { return class_weight + col0; }
  CURVKERN_INLINE RowTerms<A> row_terms(int64_t i) const {
    const int64_t r = row0 + i;
    const bool capped = softcap != A(0);
    return RowTerms<A>{lse[r],
                       row_scale(i),
                       factor != nullptr ? factor[r] : A(1),
                       label_smoothing / A(classes),
                       softcap,
                       capped ? A(1) / softcap : A(0),
                       capped ? A(-2) / (softcap * softcap) : A(0),
                       A(0)};
  }
};

// Calls body(cap, weighted_spread), two std::bool_constant: whether the tile's logits are capped, and whether the
// label smoothing is spread over class weights (α/V·w_j, not α/V). Each combination is its own loop, so the
// plain loops do the plain operations only.
template <typename A, typename Body>
CURVKERN_INLINE void with_variants(const Tile<A>& t, Body&& body) {
  const bool weighted_spread = t.class_weight != nullptr && t.label_smoothing != A(0);
  if (t.softcap != A(0)) {
    if (weighted_spread) return body(std::true_type{}, std::true_type{});
    return body(std::true_type{}, std::false_type{});
  }
  if (weighted_spread) return body(std::false_type{}, std::true_type{});
  return body(std::false_type{}, std::false_type{});
}

// α/V·w_j, the smoothing part of q̃ at column j of the tile (α/V without class weights).
template <bool kWeightedSpread, typename A>
CURVKERN_INLINE A spread_at(A uniform, const A* weights, int64_t j) {
  if constexpr (kWeightedSpread) return uniform * weights[j];
  return uniform;
}

// The logit the loss sees, z' = c·tanh(z/c), and the cap's slope J = dz'/dz = 1 − tanh²; (z, 1) without a cap.
template <typename A>
struct Capped {
  A logit, slope;
};
template <bool kCap, typename A>
CURVKERN_INLINE Capped<A> cap_logit(A z, const RowTerms<A>& row) {
  if constexpr (kCap) {
    const A t = vec::tanh(z * row.inverse_cap);
    return {row.cap * t, A(1) - t * t};
  }
  return {z, A(1)};
}

// g_z = s·J·(a·p − q̃) at one element, q̃ = α/V·w_j (spread) plus, at the label, −label_term.
template <bool kCap, typename A>
CURVKERN_INLINE A gradient_element(A z, A spread, A label_term, const RowTerms<A>& row) {
  const auto [logit, slope] = cap_logit<kCap>(z, row);
  A grad = row.factor * vec::exp(logit - row.lse) - spread + label_term;
  if constexpr (kCap) grad *= slope;
  return grad * row.scale;
}

// (H u) at one element and, in grad_z, g_z (the cross terms'): with v = J·u and g' = a·p − q̃,
// H u = s·(J·p·(a·v − (a − 2λ)·⟨p, v⟩) + g'·z''·u), z'' = −(2/c²)·z'·J; without a cap s·p·(a·u − (a − 2λ)·⟨p, u⟩).
template <bool kCap, typename A>
CURVKERN_INLINE A hessian_element(A z, A u, A spread, A label_term, const RowTerms<A>& row, A& grad_z) {
  const auto [logit, slope] = cap_logit<kCap>(z, row);
  const A p = vec::exp(logit - row.lse);
  const A grad_capped = row.factor * p - spread + label_term;
  if constexpr (kCap) {
    grad_z = grad_capped * slope * row.scale;
    const A curvature = row.curvature_scale * logit * slope;
    return (slope * p * (row.factor * (slope * u) - row.p_dot_v_shift) + grad_capped * curvature * u) * row.scale;
  }
  grad_z = grad_capped * row.scale;
  return p * (row.factor * u - row.p_dot_v_shift) * row.scale;
}

// z' = c·tanh(z/c) in place of a row's logits.
template <typename A>
CURVKERN_INLINE void cap_row(A* z, int64_t cols, A cap) {
  const A inverse_cap = A(1) / cap;
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) z[j] = cap * vec::tanh(z[j] * inverse_cap);
}

// The forward's running statistics of each row, (N) each.
template <typename A>
struct OnlineStats {
  A* max;
  A* sum_exp;
  A* target_logit;
  A* sum_z;      // Σ z', or Σ w_j·z'_j when the smoothing is spread over class weights
  A* sum_exp_u;  // (K, N), the Gauss-Newton product's Σ e·u_k; null in the forward
};

// Online log-sum-exp of one row over one more tile: the running max and Σ e^{z − max}, rescaled. While
// everything seen is −inf the shift is 0, so −inf entries add e^{−inf} = 0 and NaN still propagates. With
// keep_exps the e^{z − shift} replace z (the Gauss-Newton product's ⟨e, u_k⟩ reads them); returns the shift's
// rescale factor of the row's previous sums.
template <bool kKeepExps, typename A>
CURVKERN_INLINE A online_row(A* z, int64_t cols, A& running_max, A& sum_exp) {
  constexpr A minus_inf = -std::numeric_limits<A>::infinity();
  A tile_max = minus_inf;
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 0; j < cols; ++j) tile_max = z[j] > tile_max ? z[j] : tile_max;
  const A new_max = std::max(running_max, tile_max);
  const A shift = new_max == minus_inf ? A(0) : new_max;
  const A rescale = running_max == minus_inf ? A(0) : std::exp(running_max - shift);
  A tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
  for (int64_t j = 0; j < cols; ++j) {
    const A e = vec::exp(z[j] - shift);
    if constexpr (kKeepExps) z[j] = e;
    tile_sum += e;
  }
  sum_exp = sum_exp * rescale + tile_sum;
  running_max = new_max;
  return rescale;
}

// Forward: the capped logits z' in place, then z'_y, Σ z' (or Σ w·z') and the online log-sum-exp.
template <typename A>
CURVKERN_INLINE void forward_row(const Tile<A>& t, const OnlineStats<A>& s, int64_t i) {
  with_variants(t, [&](auto cap, auto weighted_spread) CURVKERN_INLINE_LAMBDA {
    constexpr bool kWeightedSpread = decltype(weighted_spread)::value;
    const int64_t r = t.row0 + i;
    A* z = t.z + i * t.cols;
    if constexpr (decltype(cap)::value) cap_row(z, t.cols, t.softcap);
    const int64_t local = t.local_label(i);
    if (local >= 0) s.target_logit[r] += z[local];
    if (t.label_smoothing != A(0)) {
      const A* weights = kWeightedSpread ? t.spread_weights() : nullptr;
      A sum_z = 0;
#pragma omp simd reduction(+ : sum_z)
      for (int64_t j = 0; j < t.cols; ++j) sum_z += spread_at<kWeightedSpread>(A(1), weights, j) * z[j];
      s.sum_z[r] += sum_z;
    }
    online_row<false>(z, t.cols, s.max[r], s.sum_exp[r]);
  });
}

// Backward: g_z = s·J ⊙ (a·p − q̃) in place of z, the eager reference's order.
template <typename A>
CURVKERN_INLINE void backward_row(const Tile<A>& t, int64_t i) {
  with_variants(t, [&](auto cap, auto weighted_spread) CURVKERN_INLINE_LAMBDA {
    constexpr bool kCap = decltype(cap)::value, kWeightedSpread = decltype(weighted_spread)::value;
    A* z = t.z + i * t.cols;
    const RowTerms<A> row = t.row_terms(i);
    const A* weights = kWeightedSpread ? t.spread_weights() : nullptr;
    const int64_t local = t.local_label(i);
    const A at_label = local >= 0
                           ? gradient_element<kCap>(z[local], spread_at<kWeightedSpread>(row.uniform, weights, local),
                                                    t.label_term(i), row)
                           : A(0);
#pragma omp simd
    for (int64_t j = 0; j < t.cols; ++j)
      z[j] = gradient_element<kCap>(z[j], spread_at<kWeightedSpread>(row.uniform, weights, j), A(0), row);
    if (local >= 0) z[local] = at_label;
  });
}

// HVP sweep 1: ⟨p, v⟩ and ⟨q̃, v⟩ = (1 − α)·w_y·v_y + α/V·Σ w·v of each row, v = J ⊙ u, accumulated over the tiles.
template <typename A>
CURVKERN_INLINE void hvp_stats_row(const Tile<A>& t, A* p_dot_u, A* q_dot_u, int64_t i) {
  with_variants(t, [&](auto cap, auto weighted_spread) CURVKERN_INLINE_LAMBDA {
    constexpr bool kCap = decltype(cap)::value, kWeightedSpread = decltype(weighted_spread)::value;
    const int64_t r = t.row0 + i;
    const A* z = t.z + i * t.cols;
    const A* u = t.u + i * t.cols;
    const RowTerms<A> row = t.row_terms(i);
    const A* weights = kWeightedSpread ? t.spread_weights() : nullptr;
    A pv = 0, sum_v = 0;
#pragma omp simd reduction(+ : pv, sum_v)
    for (int64_t j = 0; j < t.cols; ++j) {
      const auto [logit, slope] = cap_logit<kCap>(z[j], row);
      const A v = kCap ? slope * u[j] : u[j];
      pv += vec::exp(logit - row.lse) * v;
      sum_v += spread_at<kWeightedSpread>(A(1), weights, j) * v;
    }
    p_dot_u[r] += pv;
    const int64_t local = t.local_label(i);
    if (local >= 0) {
      const A v_y = kCap ? cap_logit<kCap>(z[local], row).slope * u[local] : u[local];
      q_dot_u[r] += (A(1) - t.label_smoothing) * (t.label_weight_of(i) * v_y);
    }
    if (t.label_smoothing != A(0)) q_dot_u[r] += row.uniform * sum_v;
  });
}

// HVP sweep 2: (H u)_r in place of u and g_z in place of z (for the cross terms).
template <typename A>
CURVKERN_INLINE void hvp_products_row(const Tile<A>& t, const A* p_dot_u, int64_t i) {
  with_variants(t, [&](auto cap, auto weighted_spread) CURVKERN_INLINE_LAMBDA {
    constexpr bool kCap = decltype(cap)::value, kWeightedSpread = decltype(weighted_spread)::value;
    const int64_t r = t.row0 + i;
    A* z = t.z + i * t.cols;
    A* u = t.u + i * t.cols;
    RowTerms<A> row = t.row_terms(i);
    row.p_dot_v_shift = (row.factor - A(2) * t.z_loss) * p_dot_u[r];
    const A* weights = kWeightedSpread ? t.spread_weights() : nullptr;
    const int64_t local = t.local_label(i);
    A label_grad = 0, label_hessian = 0;
    if (local >= 0)
      label_hessian = hessian_element<kCap>(z[local], u[local], spread_at<kWeightedSpread>(row.uniform, weights, local),
                                            t.label_term(i), row, label_grad);
#pragma omp simd
    for (int64_t j = 0; j < t.cols; ++j)
      u[j] = hessian_element<kCap>(z[j], u[j], spread_at<kWeightedSpread>(row.uniform, weights, j), A(0), row, z[j]);
    if (local >= 0) {
      u[local] = label_hessian;
      z[local] = label_grad;
    }
  });
}

// Gauss-Newton sweep 1: the online max and Σ e, and Σ e·v_k for each tangent, e = e^{z' − max}, v_k = J ⊙ u_k.
template <typename A>
CURVKERN_INLINE void ggn_stats_row(const Tile<A>& t, const OnlineStats<A>& s, int64_t rows_total, int64_t i) {
  const int64_t r = t.row0 + i;
  A* e = t.z + i * t.cols;
  if (t.softcap != A(0)) {
    // tanh(z/c) in place first: J = 1 − tanh² for every tangent from one tanh, then z' = c·tanh(z/c).
    const A inverse_cap = A(1) / t.softcap;
#pragma omp simd
    for (int64_t j = 0; j < t.cols; ++j) e[j] = vec::tanh(e[j] * inverse_cap);
    for (int64_t k = 0; k < t.tangents; ++k) {
      A* u = t.u + (k * t.rows + i) * t.cols;
#pragma omp simd
      for (int64_t j = 0; j < t.cols; ++j) u[j] *= A(1) - e[j] * e[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < t.cols; ++j) e[j] = t.softcap * e[j];
  }
  const A rescale = online_row<true>(e, t.cols, s.max[r], s.sum_exp[r]);
  for (int64_t k = 0; k < t.tangents; ++k) {
    const A* u = t.u + (k * t.rows + i) * t.cols;
    A eu = 0;
#pragma omp simd reduction(+ : eu)
    for (int64_t j = 0; j < t.cols; ++j) eu += e[j] * u[j];
    A& sum = s.sum_exp_u[k * rows_total + r];
    sum = sum * rescale + eu;
  }
}

// Gauss-Newton sweep 2: (H u_k)_r in place of each u_k. Without a cap p is computed once, in place of z, for all
// K tangents; with one each tangent's loop recomputes it from z (the cap's term needs z' and J too).
template <typename A>
CURVKERN_INLINE void ggn_products_row(const Tile<A>& t, const A* p_dot_u, int64_t rows_total, int64_t i) {
  with_variants(t, [&](auto cap, auto weighted_spread) CURVKERN_INLINE_LAMBDA {
    constexpr bool kCap = decltype(cap)::value, kWeightedSpread = decltype(weighted_spread)::value;
    const int64_t r = t.row0 + i;
    A* z = t.z + i * t.cols;
    RowTerms<A> row = t.row_terms(i);
    const A shift_factor = row.factor - A(2) * t.z_loss;
    if constexpr (kCap) {
      const A* weights = kWeightedSpread ? t.spread_weights() : nullptr;
      const int64_t local = t.local_label(i);
      for (int64_t k = 0; k < t.tangents; ++k) {
        A* u = t.u + (k * t.rows + i) * t.cols;
        row.p_dot_v_shift = shift_factor * p_dot_u[k * rows_total + r];
        A label_grad, label_hessian = 0;
        if (local >= 0)
          label_hessian =
              hessian_element<kCap>(z[local], u[local], spread_at<kWeightedSpread>(row.uniform, weights, local),
                                    t.label_term(i), row, label_grad);
#pragma omp simd
        for (int64_t j = 0; j < t.cols; ++j) {
          A grad_z;  // the cross terms' g_z: the Gauss-Newton product has none
          u[j] =
              hessian_element<kCap>(z[j], u[j], spread_at<kWeightedSpread>(row.uniform, weights, j), A(0), row, grad_z);
        }
        if (local >= 0) u[local] = label_hessian;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < t.cols; ++j) z[j] = vec::exp(z[j] - row.lse);
      for (int64_t k = 0; k < t.tangents; ++k) {
        A* u = t.u + (k * t.rows + i) * t.cols;
        const A shift = shift_factor * p_dot_u[k * rows_total + r];
#pragma omp simd
        for (int64_t j = 0; j < t.cols; ++j) u[j] = z[j] * (row.factor * u[j] - shift) * row.scale;
      }
    }
  });
}

// The tile regions, one OpenMP region over a tile's rows each, stamped per accumulation dtype and ISA
// (lce_<sweep>_<dtype>_<isa>, why macros: csrc/cpu_dispatch.h), and per dtype the run_<sweep> that calls the
// active ISA's.
#define CURVKERN_LCE_REGIONS(isa, target, A, dtype)                                                          \
  target void lce_forward_##dtype##_##isa(const Tile<A>& t, const OnlineStats<A>& s) {                       \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                          \
    for (int64_t i = 0; i < t.rows; ++i) forward_row(t, s, i);                                               \
  }                                                                                                          \
  target void lce_backward_##dtype##_##isa(const Tile<A>& t) {                                               \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                          \
    for (int64_t i = 0; i < t.rows; ++i) backward_row(t, i);                                                 \
  }                                                                                                          \
  target void lce_hvp_stats_##dtype##_##isa(const Tile<A>& t, A* p_dot_u, A* q_dot_u) {                      \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                          \
    for (int64_t i = 0; i < t.rows; ++i) hvp_stats_row(t, p_dot_u, q_dot_u, i);                              \
  }                                                                                                          \
  target void lce_hvp_products_##dtype##_##isa(const Tile<A>& t, const A* p_dot_u) {                         \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                          \
    for (int64_t i = 0; i < t.rows; ++i) hvp_products_row(t, p_dot_u, i);                                    \
  }                                                                                                          \
  target void lce_ggn_stats_##dtype##_##isa(const Tile<A>& t, const OnlineStats<A>& s, int64_t rows_total) { \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                          \
    for (int64_t i = 0; i < t.rows; ++i) ggn_stats_row(t, s, rows_total, i);                                 \
  }                                                                                                          \
  target void lce_ggn_products_##dtype##_##isa(const Tile<A>& t, const A* p_dot_u, int64_t rows_total) {     \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                          \
    for (int64_t i = 0; i < t.rows; ++i) ggn_products_row(t, p_dot_u, rows_total, i);                        \
  }
#define CURVKERN_LCE_KERNELS(A, dtype)                                                                                 \
  CURVKERN_FOR_EACH_ISA(CURVKERN_LCE_REGIONS, A, dtype)                                                                \
  void run_forward(const Tile<A>& t, const OnlineStats<A>& s) { CURVKERN_CALL_ACTIVE_ISA(lce_forward_##dtype, t, s); } \
  void run_backward(const Tile<A>& t) { CURVKERN_CALL_ACTIVE_ISA(lce_backward_##dtype, t); }                           \
  void run_hvp_stats(const Tile<A>& t, A* p_dot_u, A* q_dot_u) {                                                       \
    CURVKERN_CALL_ACTIVE_ISA(lce_hvp_stats_##dtype, t, p_dot_u, q_dot_u);                                              \
  }                                                                                                                    \
  void run_hvp_products(const Tile<A>& t, const A* p_dot_u) {                                                          \
    CURVKERN_CALL_ACTIVE_ISA(lce_hvp_products_##dtype, t, p_dot_u);                                                    \
  }                                                                                                                    \
  void run_ggn_stats(const Tile<A>& t, const OnlineStats<A>& s, int64_t rows_total) {                                  \
    CURVKERN_CALL_ACTIVE_ISA(lce_ggn_stats_##dtype, t, s, rows_total);                                                 \
  }                                                                                                                    \
  void run_ggn_products(const Tile<A>& t, const A* p_dot_u, int64_t rows_total) {                                      \
    CURVKERN_CALL_ACTIVE_ISA(lce_ggn_products_##dtype, t, p_dot_u, rows_total);                                        \
  }

CURVKERN_LCE_KERNELS(float, f32)
CURVKERN_LCE_KERNELS(double, f64)
#undef CURVKERN_LCE_KERNELS
#undef CURVKERN_LCE_REGIONS

// --- validation ---------------------------------------------------------------------------------------------

bool is_input_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16;
}

// `tensor` is a CPU tensor of `like`'s dtype and of the shape `sizes`.
void check_like(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& like,
                at::IntArrayRef sizes) {
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == like.scalar_type(), op, ": ", name, " must have hidden's dtype ",
              like.scalar_type(), ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", tensor.sizes());
}

// The problem every op shares: hidden (N, d), weight (V, d), bias (V) or none, target (N) int64, the tiles.
struct Problem {
  at::Tensor hidden, weight, bias, target;
  int64_t rows, features, classes, n_tile, v_tile;
  c10::ScalarType acc;
};

Problem make_problem(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t n_tile, int64_t v_tile) {
  TORCH_CHECK(hidden.device().is_cpu(), op, ": hidden must be a CPU tensor, got one on ", hidden.device());
  TORCH_CHECK(is_input_dtype(hidden.scalar_type()), op, ": hidden must be float32, float64 or bfloat16, got ",
              hidden.scalar_type());
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be 2-D (N, d), got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (V, d), got shape ", weight.sizes());
  const int64_t rows = hidden.size(0), features = hidden.size(1), classes = weight.size(0);
  check_like(op, "weight", weight, hidden, {classes, features});
  at::Tensor bias_tensor;
  if (bias.has_value() && bias->defined()) {
    bias_tensor = *bias;
    check_like(op, "bias", bias_tensor, hidden, {classes});
  }
  TORCH_CHECK(
      target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == rows, op,
      ": target must be an int64 CPU tensor of shape (", rows, "), got ", target.scalar_type(), " of shape ",
      target.sizes(), " on ", target.device());
  TORCH_CHECK(n_tile > 0 && v_tile > 0, op, ": n_tile and v_tile must be positive, got ", n_tile, " and ", v_tile);
  return Problem{hidden,   weight,  bias_tensor, target, rows,
                 features, classes, n_tile,      v_tile, opmath_dtype(hidden.scalar_type())};
}

// A 0-dim or (N) scale (or lse with per_row) in the accumulation dtype; returns its element stride (0: shared).
int64_t check_row_vector(const char* op, const char* name, const at::Tensor& tensor, const Problem& p, bool per_row) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == p.acc, op, ": ", name, " must be a ", p.acc,
              " CPU tensor, got ", tensor.scalar_type(), " on ", tensor.device());
  if (!per_row && tensor.dim() == 0) return 0;
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == p.rows, op, ": ", name, " must ",
              per_row ? "have shape (" : "be 0-dim or have shape (", p.rows, "), got ", tensor.sizes());
  return tensor.stride(0);
}

at::Tensor optional_tangent(const char* op, const char* name, const std::optional<at::Tensor>& tangent,
                            const at::Tensor& like, at::IntArrayRef sizes) {
  if (!tangent.has_value() || !tangent->defined()) return at::Tensor();
  TORCH_CHECK(like.defined(), op, ": ", name, " was given but bias is None");
  check_like(op, name, *tangent, like, sizes);
  return *tangent;
}

// The loss variants of one call, checked: λ, the cap c (0: none) and, with class weights, the (V) weights w and
// each row's w_y (0 on ignored rows) and W_r = (1 − α)·w_y + α/V·Σ_j w_j, (N) each, in the accumulation dtype.
struct Variants {
  double z_loss, softcap;
  at::Tensor class_weight, label_weight, total_weight;
};

Variants make_variants(const char* op, const Problem& p, int64_t ignore_index, double label_smoothing, double z_loss,
                       double softcap, const std::optional<at::Tensor>& class_weight) {
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, op, ": z_loss must be finite and >= 0, got ", z_loss);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be finite and > 0 (0: no cap), got ",
              softcap);
  Variants variants{z_loss, softcap, at::Tensor(), at::Tensor(), at::Tensor()};
  if (!class_weight.has_value() || !class_weight->defined()) return variants;
  const at::Tensor& weight = *class_weight;
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == p.acc && weight.dim() == 1 &&
                  weight.size(0) == p.classes && weight.is_contiguous(),
              op, ": class_weight must be a contiguous (", p.classes, ") ", p.acc, " CPU tensor, got a ",
              weight.is_contiguous() ? "" : "non-contiguous ", weight.scalar_type(), " tensor of shape ",
              weight.sizes(), " on ", weight.device());
  // The label clamped into [0, V), as the eager reference does: a label out of range (its row's loss NaN)
  // never reads out of bounds.
  const at::Tensor valid = p.target != ignore_index;
  const at::Tensor label = at::where(valid, p.target, 0).clamp(0, std::max<int64_t>(p.classes - 1, 0));
  variants.class_weight = weight;
  variants.label_weight = at::where(valid, weight.index_select(0, label), 0);
  variants.total_weight = variants.label_weight * (1.0 - label_smoothing) +
                          weight.sum() * (label_smoothing / static_cast<double>(p.classes));
  return variants;
}

// a_r = W_r + 2λ·lse_r (W_r = 1 without class weights), the factor of p in each row's gradient; undefined where
// it is 1 (neither a z-loss nor class weights). `total_weight` and `lse` are the rows' parts.
at::Tensor gradient_factor(const Variants& variants, const at::Tensor& total_weight, const at::Tensor& lse) {
  if (variants.z_loss == 0.0) return total_weight;
  const at::Tensor z_term = lse * (2.0 * variants.z_loss);
  return total_weight.defined() ? total_weight + z_term : z_term + 1.0;
}

bool has_gradient_factor(const Variants& variants) { return variants.z_loss != 0.0 || variants.class_weight.defined(); }

template <typename A>
const A* data_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.const_data_ptr<A>() : nullptr;
}

// --- the tile loops -----------------------------------------------------------------------------------------

// (n, v) logits of the tile into `out` (dense), by one ATen addmm (mm without bias) in A.
void logits_tile(at::Tensor& out, const at::Tensor& hidden_tile, const at::Tensor& weight_tile,
                 const at::Tensor& bias_tile) {
  if (bias_tile.defined()) {
    at::addmm_out(out, bias_tile, hidden_tile, weight_tile.t());
  } else {
    at::mm_out(out, hidden_tile, weight_tile.t());
  }
}

// The tangent of the logits tile, u = d_h·Wᵀ + h·d_Wᵀ + d_b (absent parts 0), into `out` (dense).
void tangent_tile(at::Tensor& out, const at::Tensor& hidden_tile, const at::Tensor& weight_tile,
                  const at::Tensor& d_hidden_tile, const at::Tensor& d_weight_tile, const at::Tensor& d_bias_tile) {
  bool written = false;
  if (d_hidden_tile.defined()) {
    at::mm_out(out, d_hidden_tile, weight_tile.t());
    written = true;
  }
  if (d_weight_tile.defined()) {
    if (written) {
      out.addmm_(hidden_tile, d_weight_tile.t());
    } else {
      at::mm_out(out, hidden_tile, d_weight_tile.t());
    }
    written = true;
  }
  if (!written) out.zero_();
  if (d_bias_tile.defined()) out.add_(d_bias_tile);
}

// A (rows, cols) dense view of the first rows·cols elements of a flat buffer.
at::Tensor dense(const at::Tensor& buffer, int64_t offset, int64_t rows, int64_t cols) {
  return buffer.narrow(0, offset, rows * cols).view({rows, cols});
}

at::Tensor part(const at::Tensor& tensor, int64_t dim, int64_t start, int64_t length, c10::ScalarType acc) {
  return tensor.defined() ? tensor.narrow(dim, start, length).to(acc) : at::Tensor();
}

template <typename A>
Tile<A> make_tile(const Problem& p, const Variants& variants, const at::Tensor& z, const at::Tensor& u, int64_t row0,
                  int64_t rows, int64_t col0, int64_t cols, int64_t tangents, int64_t ignore_index,
                  double label_smoothing) {
  return Tile<A>{z.data_ptr<A>(),
                 u.defined() ? u.data_ptr<A>() : nullptr,
                 row0,
                 rows,
                 col0,
                 cols,
                 tangents,
                 p.target.const_data_ptr<int64_t>(),
                 p.target.stride(0),
                 ignore_index,
                 p.classes,
                 nullptr,
                 0,
                 static_cast<A>(label_smoothing),
                 nullptr,
                 static_cast<A>(variants.z_loss),
                 static_cast<A>(variants.softcap),
                 data_or_null<A>(variants.class_weight),
                 data_or_null<A>(variants.label_weight),
                 nullptr};
}

template <typename Body>
void with_acc(const Problem& p, const char* op, Body&& body) {
  if (p.acc == at::kDouble) return body(TypeTag<double>{});
  TORCH_CHECK(p.acc == at::kFloat, op, ": unexpected accumulation dtype ", p.acc);
  return body(TypeTag<float>{});
}

// Calls body(row0, rows, hidden_tile) per row tile and, inside, tile(col0, cols, weight_tile, bias_tile) per
// class tile, the tiles of hidden, weight and bias converted to the accumulation dtype (a view when they are).
template <typename RowBody>
void for_each_row_tile(const Problem& p, RowBody&& body) {
  for (int64_t row0 = 0; row0 < p.rows; row0 += p.n_tile) {
    const int64_t rows = std::min(p.n_tile, p.rows - row0);
    body(row0, rows, p.hidden.narrow(0, row0, rows).to(p.acc));
  }
}

template <typename ColumnBody>
void for_each_class_tile(const Problem& p, ColumnBody&& body) {
  for (int64_t col0 = 0; col0 < p.classes; col0 += p.v_tile) {
    const int64_t cols = std::min(p.v_tile, p.classes - col0);
    body(col0, cols, p.weight.narrow(0, col0, cols).to(p.acc), part(p.bias, 0, col0, cols, p.acc));
  }
}

at::Tensor tile_buffer(const Problem& p, int64_t tangents) {
  const int64_t rows = std::min(p.n_tile, p.rows), cols = std::min(p.v_tile, p.classes);
  return at::empty({std::max<int64_t>(tangents * rows * cols, 1)}, p.hidden.options().dtype(p.acc));
}

at::Tensor to_input_dtype(const at::Tensor& acc_result, const Problem& p) {
  return acc_result.to(p.hidden.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const at::Tensor& target, int64_t ignore_index,
                                                                double label_smoothing, int64_t n_tile, int64_t v_tile,
                                                                double z_loss, double softcap,
                                                                const std::optional<at::Tensor>& class_weight) {
  const char* op = "curvkern::linear_cross_entropy_forward";
  const Problem p = make_problem(op, hidden, weight, bias, target, n_tile, v_tile);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  const Variants variants = make_variants(op, p, ignore_index, label_smoothing, z_loss, softcap, class_weight);
  const auto options = hidden.options().dtype(p.acc);
  at::Tensor loss = at::empty({p.rows}, options), lse = at::empty({p.rows}, options);
  at::Tensor running_max = at::full({p.rows}, -std::numeric_limits<double>::infinity(), options);
  at::Tensor sum_exp = at::zeros({p.rows}, options), target_logit = at::zeros({p.rows}, options),
             sum_z = at::zeros({p.rows}, options);
  const at::Tensor buffer = tile_buffer(p, 1);
  with_acc(p, op, [&](auto tag) {
    using A = typename decltype(tag)::type;
    const OnlineStats<A> stats{running_max.data_ptr<A>(), sum_exp.data_ptr<A>(), target_logit.data_ptr<A>(),
                               sum_z.data_ptr<A>(), nullptr};
    for_each_row_tile(p, [&](int64_t row0, int64_t rows, const at::Tensor& hidden_tile) {
      for_each_class_tile(
          p, [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
            at::Tensor z = dense(buffer, 0, rows, cols);
            logits_tile(z, hidden_tile, weight_tile, bias_tile);
            run_forward(
                make_tile<A>(p, variants, z, at::Tensor(), row0, rows, col0, cols, 0, ignore_index, label_smoothing),
                stats);
          });
    });
    // ℓ_r = W·lse − (1 − α)·w_y·z'_y − α/V·Σ w·z' + λ·lse² (W = w = 1 without class weights), 0 on ignored rows
    // and NaN for a label outside [0, V).
    const A alpha = static_cast<A>(label_smoothing), lambda = static_cast<A>(z_loss);
    const int64_t* labels = p.target.const_data_ptr<int64_t>();
    const int64_t label_stride = p.target.stride(0);
    const A* label_weight = data_or_null<A>(variants.label_weight);
    const A* total_weight = data_or_null<A>(variants.total_weight);
    A* loss_data = loss.data_ptr<A>();
    A* lse_data = lse.data_ptr<A>();
    at::parallel_for(0, p.rows, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const A row_lse = stats.max[r] + std::log(stats.sum_exp[r]);
        const A target_logit =
            label_weight != nullptr ? label_weight[r] * stats.target_logit[r] : stats.target_logit[r];
        A row_loss = (total_weight != nullptr ? total_weight[r] * row_lse : row_lse) - (A(1) - alpha) * target_logit;
        if (alpha != A(0)) row_loss -= alpha / A(p.classes) * stats.sum_z[r];
        if (lambda != A(0)) row_loss += lambda * row_lse * row_lse;
        const int64_t y = labels[r * label_stride];
        lse_data[r] = row_lse;
        loss_data[r] = y == ignore_index           ? A(0)
                       : (y >= 0 && y < p.classes) ? row_loss
                                                   : std::numeric_limits<A>::quiet_NaN();
      }
    });
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing, int64_t n_tile,
    int64_t v_tile, double z_loss, double softcap, const std::optional<at::Tensor>& class_weight) {
  const char* op = "curvkern::linear_cross_entropy_backward";
  const Problem p = make_problem(op, hidden, weight, bias, target, n_tile, v_tile);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  check_row_vector(op, "lse", lse, p, /*per_row=*/true);
  const int64_t scale_stride = check_row_vector(op, "grad_scale", grad_scale, p, /*per_row=*/false);
  const Variants variants = make_variants(op, p, ignore_index, label_smoothing, z_loss, softcap, class_weight);
  const at::Tensor lse_dense = lse.contiguous();
  const at::Tensor factor = gradient_factor(variants, variants.total_weight, lse_dense);
  const auto options = hidden.options().dtype(p.acc);
  at::Tensor grad_hidden = at::zeros({p.rows, p.features}, options);
  at::Tensor grad_weight = at::zeros({p.classes, p.features}, options);
  at::Tensor grad_bias = at::zeros({p.bias.defined() ? p.classes : 0}, options);
  const at::Tensor buffer = tile_buffer(p, 1);
  with_acc(p, op, [&](auto tag) {
    using A = typename decltype(tag)::type;
    for_each_row_tile(p, [&](int64_t row0, int64_t rows, const at::Tensor& hidden_tile) {
      for_each_class_tile(
          p, [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
            at::Tensor z = dense(buffer, 0, rows, cols);
            logits_tile(z, hidden_tile, weight_tile, bias_tile);
            Tile<A> t =
                make_tile<A>(p, variants, z, at::Tensor(), row0, rows, col0, cols, 0, ignore_index, label_smoothing);
            t.scale = grad_scale.const_data_ptr<A>();
            t.scale_stride = scale_stride;
            t.lse = lse_dense.const_data_ptr<A>();
            t.factor = data_or_null<A>(factor);
            run_backward(t);
            grad_hidden.narrow(0, row0, rows).addmm_(z, weight_tile);
            grad_weight.narrow(0, col0, cols).addmm_(z.t(), hidden_tile);
            if (p.bias.defined()) grad_bias.narrow(0, col0, cols).add_(z.sum(0));
          });
    });
  });
  return {to_input_dtype(grad_hidden, p), to_input_dtype(grad_weight, p), to_input_dtype(grad_bias, p)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_hvp(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& grad_scale, const std::optional<at::Tensor>& v_hidden,
    const std::optional<at::Tensor>& v_weight, const std::optional<at::Tensor>& v_bias, int64_t ignore_index,
    double label_smoothing, int64_t n_tile, int64_t v_tile, double z_loss, double softcap,
    const std::optional<at::Tensor>& class_weight) {
  const char* op = "curvkern::linear_cross_entropy_hvp";
  const Problem p = make_problem(op, hidden, weight, bias, target, n_tile, v_tile);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  check_row_vector(op, "lse", lse, p, /*per_row=*/true);
  const int64_t scale_stride = check_row_vector(op, "grad_scale", grad_scale, p, /*per_row=*/false);
  const at::Tensor tangent_hidden = optional_tangent(op, "v_hidden", v_hidden, hidden, {p.rows, p.features});
  const at::Tensor tangent_weight = optional_tangent(op, "v_weight", v_weight, hidden, {p.classes, p.features});
  const at::Tensor tangent_bias = optional_tangent(op, "v_bias", v_bias, p.bias, {p.classes});
  const Variants variants = make_variants(op, p, ignore_index, label_smoothing, z_loss, softcap, class_weight);
  const at::Tensor lse_dense = lse.contiguous();
  const at::Tensor factor = gradient_factor(variants, variants.total_weight, lse_dense);
  const auto options = hidden.options().dtype(p.acc);
  at::Tensor grad_hidden = at::zeros({p.rows, p.features}, options);
  at::Tensor grad_weight = at::zeros({p.classes, p.features}, options);
  at::Tensor grad_bias = at::zeros({p.bias.defined() ? p.classes : 0}, options);
  at::Tensor p_dot_u = at::zeros({p.rows}, options), q_dot_u = at::zeros({p.rows}, options);
  const at::Tensor z_buffer = tile_buffer(p, 1), u_buffer = tile_buffer(p, 1);
  with_acc(p, op, [&](auto tag) {
    using A = typename decltype(tag)::type;
    for_each_row_tile(p, [&](int64_t row0, int64_t rows, const at::Tensor& hidden_tile) {
      const at::Tensor v_hidden_tile = part(tangent_hidden, 0, row0, rows, p.acc);
      // Both sweeps compute the tile's logits and tangent again; each writes them in place.
      auto tile_at = [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
        at::Tensor z = dense(z_buffer, 0, rows, cols), u = dense(u_buffer, 0, rows, cols);
        logits_tile(z, hidden_tile, weight_tile, bias_tile);
        tangent_tile(u, hidden_tile, weight_tile, v_hidden_tile, part(tangent_weight, 0, col0, cols, p.acc),
                     part(tangent_bias, 0, col0, cols, p.acc));
        Tile<A> t = make_tile<A>(p, variants, z, u, row0, rows, col0, cols, 1, ignore_index, label_smoothing);
        t.scale = grad_scale.const_data_ptr<A>();
        t.scale_stride = scale_stride;
        t.lse = lse_dense.const_data_ptr<A>();
        t.factor = data_or_null<A>(factor);
        return std::make_tuple(t, z, u);
      };
      for_each_class_tile(p,
                          [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
                            const auto [t, z, u] = tile_at(col0, cols, weight_tile, bias_tile);
                            run_hvp_stats(t, p_dot_u.data_ptr<A>(), q_dot_u.data_ptr<A>());
                          });
      for_each_class_tile(p,
                          [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
                            const auto [t, z, u] = tile_at(col0, cols, weight_tile, bias_tile);
                            run_hvp_products(t, p_dot_u.data_ptr<A>());
                            // u now holds H u and z g_z.
                            grad_hidden.narrow(0, row0, rows).addmm_(u, weight_tile);
                            grad_weight.narrow(0, col0, cols).addmm_(u.t(), hidden_tile);
                            if (p.bias.defined()) grad_bias.narrow(0, col0, cols).add_(u.sum(0));
                            // The cross terms: Φ holds h and W outside g_z too (g_z·W, g_zᵀ·h).
                            if (tangent_weight.defined())
                              grad_hidden.narrow(0, row0, rows).addmm_(z, part(tangent_weight, 0, col0, cols, p.acc));
                            if (v_hidden_tile.defined()) grad_weight.narrow(0, col0, cols).addmm_(z.t(), v_hidden_tile);
                          });
    });
  });
  at::Tensor valid = target != ignore_index;
  // ⟨J ⊙ (a·p − q̃), u⟩ = a·⟨p, J⊙u⟩ − ⟨q̃, J⊙u⟩.
  const at::Tensor p_dot_u_term = factor.defined() ? factor * p_dot_u : p_dot_u;
  at::Tensor dot = at::where(valid, p_dot_u_term - q_dot_u, at::zeros({}, p_dot_u.options()));
  return {to_input_dtype(grad_hidden, p), to_input_dtype(grad_weight, p), to_input_dtype(grad_bias, p), dot};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_ggn_vp(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& scale, const at::Tensor& d_hidden, const std::optional<at::Tensor>& d_weight,
    const std::optional<at::Tensor>& d_bias, int64_t ignore_index, int64_t n_tile, int64_t v_tile,
    double label_smoothing, double z_loss, double softcap, const std::optional<at::Tensor>& class_weight) {
  const char* op = "curvkern::linear_ce_ggn_vp";
  const Problem p = make_problem(op, hidden, weight, bias, target, n_tile, v_tile);
  const int64_t scale_stride = check_row_vector(op, "scale", scale, p, /*per_row=*/false);
  TORCH_CHECK(d_hidden.dim() == 3, op, ": d_hidden must be 3-D (K, N, d), got shape ", d_hidden.sizes());
  const int64_t tangents = d_hidden.size(0);
  check_like(op, "d_hidden", d_hidden, hidden, {tangents, p.rows, p.features});
  const at::Tensor tangent_weight =
      optional_tangent(op, "d_weight", d_weight, hidden, {tangents, p.classes, p.features});
  const at::Tensor tangent_bias = optional_tangent(op, "d_bias", d_bias, p.bias, {tangents, p.classes});
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  const Variants variants = make_variants(op, p, ignore_index, label_smoothing, z_loss, softcap, class_weight);
  const auto options = hidden.options().dtype(p.acc);
  at::Tensor prod_hidden = at::zeros({tangents, p.rows, p.features}, options);
  at::Tensor prod_weight = at::zeros({tangents, p.classes, p.features}, options);
  at::Tensor prod_bias = at::zeros({tangents, p.bias.defined() ? p.classes : 0}, options);
  at::Tensor running_max = at::full({p.rows}, -std::numeric_limits<double>::infinity(), options);
  at::Tensor sum_exp = at::zeros({p.rows}, options), sum_exp_u = at::zeros({tangents, p.rows}, options);
  const at::Tensor z_buffer = tile_buffer(p, 1), u_buffer = tile_buffer(p, tangents);
  with_acc(p, op, [&](auto tag) {
    using A = typename decltype(tag)::type;
    const OnlineStats<A> stats{running_max.data_ptr<A>(), sum_exp.data_ptr<A>(), nullptr, nullptr,
                               sum_exp_u.data_ptr<A>()};
    at::Tensor lse = at::empty({p.rows}, options), p_dot_u = at::empty({tangents, p.rows}, options);
    const at::Tensor factor = has_gradient_factor(variants) ? at::empty({p.rows}, options) : at::Tensor();
    for_each_row_tile(p, [&](int64_t row0, int64_t rows, const at::Tensor& hidden_tile) {
      const at::Tensor d_hidden_tile = d_hidden.narrow(1, row0, rows).to(p.acc);
      // The logits tile once for all K tangents, then each tangent's.
      auto tile_at = [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
        at::Tensor z = dense(z_buffer, 0, rows, cols), u_all = dense(u_buffer, 0, tangents * rows, cols);
        logits_tile(z, hidden_tile, weight_tile, bias_tile);
        for (int64_t k = 0; k < tangents; ++k) {
          at::Tensor u = dense(u_buffer, k * rows * cols, rows, cols);
          tangent_tile(u, hidden_tile, weight_tile, d_hidden_tile[k],
                       tangent_weight.defined() ? part(tangent_weight[k], 0, col0, cols, p.acc) : at::Tensor(),
                       tangent_bias.defined() ? part(tangent_bias[k], 0, col0, cols, p.acc) : at::Tensor());
        }
        Tile<A> t =
            make_tile<A>(p, variants, z, u_all, row0, rows, col0, cols, tangents, ignore_index, label_smoothing);
        t.scale = scale.const_data_ptr<A>();
        t.scale_stride = scale_stride;
        t.lse = lse.const_data_ptr<A>();
        t.factor = data_or_null<A>(factor);
        return t;
      };
      for_each_class_tile(p,
                          [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
                            run_ggn_stats(tile_at(col0, cols, weight_tile, bias_tile), stats, p.rows);
                          });
      // lse = max + log Σ e, ⟨p, v_k⟩ = Σ e·v_k / Σ e and a = W + 2λ·lse of the tile's rows.
      const at::Tensor row_sum_exp = sum_exp.narrow(0, row0, rows);
      const at::Tensor row_lse = lse.narrow(0, row0, rows);
      row_lse.copy_(running_max.narrow(0, row0, rows) + row_sum_exp.log());
      p_dot_u.narrow(1, row0, rows).copy_(sum_exp_u.narrow(1, row0, rows) / row_sum_exp);
      if (factor.defined())
        factor.narrow(0, row0, rows)
            .copy_(gradient_factor(variants, part(variants.total_weight, 0, row0, rows, p.acc), row_lse));
      for_each_class_tile(p,
                          [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
                            const Tile<A> t = tile_at(col0, cols, weight_tile, bias_tile);
                            run_ggn_products(t, p_dot_u.data_ptr<A>(), p.rows);
                            for (int64_t k = 0; k < tangents; ++k) {
                              const at::Tensor hessian_u = dense(u_buffer, k * rows * cols, rows, cols);
                              prod_hidden[k].narrow(0, row0, rows).addmm_(hessian_u, weight_tile);
                              prod_weight[k].narrow(0, col0, cols).addmm_(hessian_u.t(), hidden_tile);
                              if (p.bias.defined()) prod_bias[k].narrow(0, col0, cols).add_(hessian_u.sum(0));
                            }
                          });
    });
  });
  return {to_input_dtype(prod_hidden, p), to_input_dtype(prod_weight, p), to_input_dtype(prod_bias, p)};
}

}  // namespace curvkern
