// Fused linear + cross-entropy on CPU: forward, backward, double backward (HVP) and Gauss-Newton product over
// tiles of the logits, following docs/linear_cross_entropy.md and the eager reference
// (curvkern/linear_ce/eager.py) operation by operation.
//
// The matrix products are ATen's (at::mm / at::addmm per tile, so MKL, oneDNN or OpenBLAS); this file owns the
// rest: per tile one OpenMP region over its rows (stamped per ISA, csrc/cpu_dispatch.h) that does the softmax,
// the row reductions (online max, Σ exp, the target logit, ⟨p, u⟩) and the elementwise epilogue in place in the
// tile buffer, vectorized with csrc/vec.h. Tiles are computed in the accumulation dtype A (fp64 for fp64 inputs,
// fp32 for fp32 and bf16), into buffers of n_tile·v_tile elements (K times that for K tangents) allocated once
// per call; per-row statistics are (N) vectors. Offsets are 64-bit; inputs may have any strides.
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

  CURVKERN_INLINE int64_t label(int64_t i) const { return target[(row0 + i) * target_stride]; }
  CURVKERN_INLINE bool valid(int64_t i) const { return label(i) != ignore_index; }
  // The label's column within the tile, or -1 when the row is ignored or its label lies outside the tile.
  CURVKERN_INLINE int64_t local_label(int64_t i) const {
    const int64_t y = label(i);
    return y != ignore_index && y >= col0 && y < col0 + cols ? y - col0 : -1;
  }
  // The row's scale, exactly 0 on an ignored row (a select: an infinite mean scale gives 0 there, not NaN).
  CURVKERN_INLINE A row_scale(int64_t i) const { return valid(i) ? scale[(row0 + i) * scale_stride] : A(0); }
};

// The forward's running statistics of each row, (N) each.
template <typename A>
struct OnlineStats {
  A* max;
  A* sum_exp;
  A* target_logit;
  A* sum_z;
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

template <typename A>
CURVKERN_INLINE void forward_row(const Tile<A>& t, const OnlineStats<A>& s, int64_t i) {
  const int64_t r = t.row0 + i;
  A* z = t.z + i * t.cols;
  const int64_t local = t.local_label(i);
  if (local >= 0) s.target_logit[r] += z[local];
  if (t.label_smoothing != A(0)) {
    A sum_z = 0;
#pragma omp simd reduction(+ : sum_z)
    for (int64_t j = 0; j < t.cols; ++j) sum_z += z[j];
    s.sum_z[r] += sum_z;
  }
  online_row<false>(z, t.cols, s.max[r], s.sum_exp[r]);
}

// g_z = s_r·(p − q) in place of z: (e^{z − lse} − α/V − (1 − α)·[j = y])·s_r, the eager reference's order.
template <typename A>
CURVKERN_INLINE void gradient_row(const Tile<A>& t, A* z, int64_t i) {
  const A row_lse = t.lse[t.row0 + i];
  const A scale = t.row_scale(i);
  const A uniform = t.label_smoothing / A(t.classes);
  const int64_t local = t.local_label(i);
  const A at_label = local >= 0 ? vec::exp(z[local] - row_lse) - uniform + (t.label_smoothing - A(1)) : A(0);
#pragma omp simd
  for (int64_t j = 0; j < t.cols; ++j) z[j] = (vec::exp(z[j] - row_lse) - uniform) * scale;
  if (local >= 0) z[local] = at_label * scale;
}

template <typename A>
CURVKERN_INLINE void backward_row(const Tile<A>& t, int64_t i) {
  gradient_row(t, t.z + i * t.cols, i);
}

// HVP sweep 1: ⟨p, u⟩ and ⟨q, u⟩ = (1 − α)·u_y + α/V·Σ u of each row, accumulated over the tiles.
template <typename A>
CURVKERN_INLINE void hvp_stats_row(const Tile<A>& t, A* p_dot_u, A* q_dot_u, int64_t i) {
  const int64_t r = t.row0 + i;
  const A* z = t.z + i * t.cols;
  const A* u = t.u + i * t.cols;
  const A row_lse = t.lse[r];
  A pu = 0, sum_u = 0;
#pragma omp simd reduction(+ : pu, sum_u)
  for (int64_t j = 0; j < t.cols; ++j) {
    pu += vec::exp(z[j] - row_lse) * u[j];
    sum_u += u[j];
  }
  p_dot_u[r] += pu;
  const int64_t local = t.local_label(i);
  if (local >= 0) q_dot_u[r] += (A(1) - t.label_smoothing) * u[local];
  if (t.label_smoothing != A(0)) q_dot_u[r] += t.label_smoothing / A(t.classes) * sum_u;
}

// HVP sweep 2: (H u)_r = p ⊙ (u − ⟨p, u⟩)·s_r in place of u and, with cross terms, g_z in place of z.
template <typename A>
CURVKERN_INLINE void hvp_products_row(const Tile<A>& t, const A* p_dot_u, bool cross_terms, int64_t i) {
  const int64_t r = t.row0 + i;
  A* z = t.z + i * t.cols;
  A* u = t.u + i * t.cols;
  const A row_lse = t.lse[r], pu = p_dot_u[r], scale = t.row_scale(i);
#pragma omp simd
  for (int64_t j = 0; j < t.cols; ++j) u[j] = vec::exp(z[j] - row_lse) * (u[j] - pu) * scale;
  if (cross_terms) gradient_row(t, z, i);
}

// Gauss-Newton sweep 1: the online max and Σ e, and Σ e·u_k for each tangent, e = e^{z − max}.
template <typename A>
CURVKERN_INLINE void ggn_stats_row(const Tile<A>& t, const OnlineStats<A>& s, int64_t rows_total, int64_t i) {
  const int64_t r = t.row0 + i;
  A* e = t.z + i * t.cols;
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

// Gauss-Newton sweep 2: (H u_k)_r = p ⊙ (u_k − ⟨p, u_k⟩)·s_r in place of each u_k, p in place of z.
template <typename A>
CURVKERN_INLINE void ggn_products_row(const Tile<A>& t, const A* p_dot_u, int64_t rows_total, int64_t i) {
  const int64_t r = t.row0 + i;
  A* p = t.z + i * t.cols;
  const A row_lse = t.lse[r], scale = t.row_scale(i);
#pragma omp simd
  for (int64_t j = 0; j < t.cols; ++j) p[j] = vec::exp(p[j] - row_lse);
  for (int64_t k = 0; k < t.tangents; ++k) {
    A* u = t.u + (k * t.rows + i) * t.cols;
    const A pu = p_dot_u[k * rows_total + r];
#pragma omp simd
    for (int64_t j = 0; j < t.cols; ++j) u[j] = p[j] * (u[j] - pu) * scale;
  }
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
  target void lce_hvp_products_##dtype##_##isa(const Tile<A>& t, const A* p_dot_u, bool cross_terms) {       \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                          \
    for (int64_t i = 0; i < t.rows; ++i) hvp_products_row(t, p_dot_u, cross_terms, i);                       \
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
  void run_hvp_products(const Tile<A>& t, const A* p_dot_u, bool cross_terms) {                                        \
    CURVKERN_CALL_ACTIVE_ISA(lce_hvp_products_##dtype, t, p_dot_u, cross_terms);                                       \
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
Tile<A> make_tile(const Problem& p, const at::Tensor& z, const at::Tensor& u, int64_t row0, int64_t rows, int64_t col0,
                  int64_t cols, int64_t tangents, int64_t ignore_index, double label_smoothing) {
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
                                                                double label_smoothing, int64_t n_tile,
                                                                int64_t v_tile) {
  const char* op = "curvkern::linear_cross_entropy_forward";
  const Problem p = make_problem(op, hidden, weight, bias, target, n_tile, v_tile);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
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
      for_each_class_tile(p, [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile,
                                 const at::Tensor& bias_tile) {
        at::Tensor z = dense(buffer, 0, rows, cols);
        logits_tile(z, hidden_tile, weight_tile, bias_tile);
        run_forward(make_tile<A>(p, z, at::Tensor(), row0, rows, col0, cols, 0, ignore_index, label_smoothing), stats);
      });
    });
    // ℓ_r = lse − (1 − α)·z_y − α/V·Σ z, 0 on ignored rows and NaN for a label outside [0, V).
    const A alpha = static_cast<A>(label_smoothing);
    const int64_t* labels = p.target.const_data_ptr<int64_t>();
    const int64_t label_stride = p.target.stride(0);
    A* loss_data = loss.data_ptr<A>();
    A* lse_data = lse.data_ptr<A>();
    at::parallel_for(0, p.rows, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const A row_lse = stats.max[r] + std::log(stats.sum_exp[r]);
        A row_loss = row_lse - (A(1) - alpha) * stats.target_logit[r];
        if (alpha != A(0)) row_loss -= alpha / A(p.classes) * stats.sum_z[r];
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
    int64_t v_tile) {
  const char* op = "curvkern::linear_cross_entropy_backward";
  const Problem p = make_problem(op, hidden, weight, bias, target, n_tile, v_tile);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  check_row_vector(op, "lse", lse, p, /*per_row=*/true);
  const int64_t scale_stride = check_row_vector(op, "grad_scale", grad_scale, p, /*per_row=*/false);
  const at::Tensor lse_dense = lse.contiguous();
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
            Tile<A> t = make_tile<A>(p, z, at::Tensor(), row0, rows, col0, cols, 0, ignore_index, label_smoothing);
            t.scale = grad_scale.const_data_ptr<A>();
            t.scale_stride = scale_stride;
            t.lse = lse_dense.const_data_ptr<A>();
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
    double label_smoothing, int64_t n_tile, int64_t v_tile) {
  const char* op = "curvkern::linear_cross_entropy_hvp";
  const Problem p = make_problem(op, hidden, weight, bias, target, n_tile, v_tile);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  check_row_vector(op, "lse", lse, p, /*per_row=*/true);
  const int64_t scale_stride = check_row_vector(op, "grad_scale", grad_scale, p, /*per_row=*/false);
  const at::Tensor tangent_hidden = optional_tangent(op, "v_hidden", v_hidden, hidden, {p.rows, p.features});
  const at::Tensor tangent_weight = optional_tangent(op, "v_weight", v_weight, hidden, {p.classes, p.features});
  const at::Tensor tangent_bias = optional_tangent(op, "v_bias", v_bias, p.bias, {p.classes});
  const bool cross_terms = tangent_hidden.defined() || tangent_weight.defined();
  const at::Tensor lse_dense = lse.contiguous();
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
        Tile<A> t = make_tile<A>(p, z, u, row0, rows, col0, cols, 1, ignore_index, label_smoothing);
        t.scale = grad_scale.const_data_ptr<A>();
        t.scale_stride = scale_stride;
        t.lse = lse_dense.const_data_ptr<A>();
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
                            run_hvp_products(t, p_dot_u.data_ptr<A>(), cross_terms);
                            // u now holds H u and z, with cross terms, g_z.
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
  at::Tensor dot = at::where(valid, p_dot_u - q_dot_u, at::zeros({}, p_dot_u.options()));
  return {to_input_dtype(grad_hidden, p), to_input_dtype(grad_weight, p), to_input_dtype(grad_bias, p), dot};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_ggn_vp(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& scale, const at::Tensor& d_hidden, const std::optional<at::Tensor>& d_weight,
    const std::optional<at::Tensor>& d_bias, int64_t ignore_index, int64_t n_tile, int64_t v_tile) {
  const char* op = "curvkern::linear_ce_ggn_vp";
  const Problem p = make_problem(op, hidden, weight, bias, target, n_tile, v_tile);
  const int64_t scale_stride = check_row_vector(op, "scale", scale, p, /*per_row=*/false);
  TORCH_CHECK(d_hidden.dim() == 3, op, ": d_hidden must be 3-D (K, N, d), got shape ", d_hidden.sizes());
  const int64_t tangents = d_hidden.size(0);
  check_like(op, "d_hidden", d_hidden, hidden, {tangents, p.rows, p.features});
  const at::Tensor tangent_weight =
      optional_tangent(op, "d_weight", d_weight, hidden, {tangents, p.classes, p.features});
  const at::Tensor tangent_bias = optional_tangent(op, "d_bias", d_bias, p.bias, {tangents, p.classes});
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
        Tile<A> t = make_tile<A>(p, z, u_all, row0, rows, col0, cols, tangents, ignore_index, 0.0);
        t.scale = scale.const_data_ptr<A>();
        t.scale_stride = scale_stride;
        t.lse = lse.const_data_ptr<A>();
        return t;
      };
      for_each_class_tile(p,
                          [&](int64_t col0, int64_t cols, const at::Tensor& weight_tile, const at::Tensor& bias_tile) {
                            run_ggn_stats(tile_at(col0, cols, weight_tile, bias_tile), stats, p.rows);
                          });
      // lse = max + log Σ e and ⟨p, u_k⟩ = Σ e·u_k / Σ e of the tile's rows.
      const at::Tensor row_sum_exp = sum_exp.narrow(0, row0, rows);
      lse.narrow(0, row0, rows).copy_(running_max.narrow(0, row0, rows) + row_sum_exp.log());
      p_dot_u.narrow(1, row0, rows).copy_(sum_exp_u.narrow(1, row0, rows) / row_sum_exp);
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
