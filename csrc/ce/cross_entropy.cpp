// Fused cross-entropy kernels on CPU: forward (loss, lse), backward (gradient) and the loss-Hessian-vector
// product, following docs/cross_entropy.md.
//
// One OpenMP parallel region splits the rows across threads. The HVP reads a row in two sweeps: the first
// keeps an online max, sum of e^{z-max} and <e^{z-max}, u> block by block (a block is re-read from L1 right
// after its max is taken) and keeps each e^{z - shift} in a per-thread row buffer; the second rescales them
// into p and writes, reading u while it is still in L2 (a 50k-vocabulary row is 200 KB of fp32), so each
// element costs one exp (csrc/vec.h). Ignored rows are written as zeros without reading the logits. bf16/fp16 accumulate in fp32, fp64 in fp64. Indexing is 64-bit and a
// row may start anywhere (row stride >= V, or 0 for a broadcast u); the last dimension must be dense.
#include "ce/cross_entropy.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_dispatch.h"
#include "huge_pages.h"
#include "vec.h"

namespace curvkern {

namespace {

#define CURVKERN_INLINE inline __attribute__((always_inline))


template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
CURVKERN_INLINE acc_t<scalar_t> load(const scalar_t& x) {
  return static_cast<acc_t<scalar_t>>(x);
}

template <typename T>
CURVKERN_INLINE uint32_t float_bits(T x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// Rounds to the logits' dtype, to nearest even. c10's own bf16/fp16 conversions branch on NaN and on
// the exponent range, which keeps GCC from vectorizing the loops that store; these select instead.
template <typename scalar_t>
CURVKERN_INLINE scalar_t store(acc_t<scalar_t> x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = float_bits(x);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    const uint32_t bits = float_bits(x);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t magnitude = bits & 0x7FFFFFFFu;
    // |x| below 2^-14: a subnormal half, rounded by the FPU when adding 0.5 (its ulp becomes 2^-24).
    float subnormal_sum;
    const float magic = 0.5f;
    float absolute;
    std::memcpy(&absolute, &magnitude, sizeof(absolute));
    subnormal_sum = absolute + magic;
    const uint32_t subnormal = float_bits(subnormal_sum) - float_bits(magic);
    // Normal range: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
    const uint32_t normal = (magnitude + 0xC8000FFFu + ((magnitude >> 13) & 1u)) >> 13;
    const uint32_t overflow = magnitude > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN or inf
    const uint32_t half_bits = magnitude >= 0x47800000u ? overflow : (magnitude < 0x38800000u ? subnormal : normal);
    return c10::Half(static_cast<uint16_t>(half_bits | sign), c10::Half::from_bits());
  } else {
    return x;
  }
}

// Elements per block of the online sweep: small enough that its second read hits L1.
constexpr int64_t kBlock = 1024;

template <typename A>
struct RowStats {
  A max;      // running max (the shift of every e^{z - max} below)
  A sum_exp;  // sum of e^{z - max}
  A sum_exp_u;  // <e^{z - max}, u>
  A sum_z;    // sum of z (label smoothing)
  A sum_u;    // sum of u (label smoothing)
};

// The hardware prefetcher of the benchmark VM falls behind loops with work per element (see
// csrc/multi_tensor.h): request the next block of the row's streams while this one is computed.
template <bool kWithU, typename scalar_t>
CURVKERN_INLINE void prefetch_next_block(const scalar_t* z, const scalar_t* u, int64_t next, int64_t v) {
  constexpr int64_t kLineElements = 64 / sizeof(scalar_t);
  const int64_t end = std::min(next + kBlock, v);
  for (int64_t k = next; k < end; k += kLineElements) {
    __builtin_prefetch(z + k, 0);
    if constexpr (kWithU) __builtin_prefetch(u + k, 0);
  }
}

// Sweep 1 over one row: online max and sums, block by block. With u (the HVP), each e^{z - shift} is also
// kept in ``exps`` and each block's shift in ``shifts`` (-inf where the block was shifted by 0, everything
// before it being -inf), so sweep 2 rescales them instead of computing exp again.
template <bool kWithU, bool kSums, typename scalar_t>
CURVKERN_INLINE RowStats<acc_t<scalar_t>> row_stats(const scalar_t* z, const scalar_t* u, int64_t v,
                                                    acc_t<scalar_t>* exps, acc_t<scalar_t>* shifts) {
  using A = acc_t<scalar_t>;
  constexpr A minus_inf = -std::numeric_limits<A>::infinity();
  RowStats<A> stats{minus_inf, A(0), A(0), A(0), A(0)};
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t length = std::min(kBlock, v - start);
    const scalar_t* zb = z + start;
    prefetch_next_block<kWithU>(z, u, start + kBlock, v);
    A block_max = minus_inf;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < length; ++j) {
      A x = load(zb[j]);
      block_max = x > block_max ? x : block_max;
    }
    if (block_max > stats.max) {
      A rescale = vec::exp(stats.max - block_max);
      stats.sum_exp *= rescale;
      stats.sum_exp_u *= rescale;
      stats.max = block_max;
    }
    // While everything seen is -inf, shift by 0: -inf entries add e^{-inf} = 0 and NaN still propagates.
    const A shift = stats.max == minus_inf ? A(0) : stats.max;
    A sum_exp = 0, sum_exp_u = 0, sum_z = 0, sum_u = 0;
    if constexpr (kWithU) {
      const scalar_t* ub = u + start;
      A* eb = exps + start;
      shifts[start / kBlock] = stats.max;
#pragma omp simd reduction(+ : sum_exp, sum_exp_u, sum_u)
      for (int64_t j = 0; j < length; ++j) {
        A e = vec::exp(load(zb[j]) - shift);
        A uj = load(ub[j]);
        eb[j] = e;
        sum_exp += e;
        sum_exp_u += e * uj;
        if constexpr (kSums) sum_u += uj;
      }
    } else {
#pragma omp simd reduction(+ : sum_exp, sum_z)
      for (int64_t j = 0; j < length; ++j) {
        A x = load(zb[j]);
        sum_exp += vec::exp(x - shift);
        if constexpr (kSums) sum_z += x;
      }
    }
    stats.sum_exp += sum_exp;
    stats.sum_exp_u += sum_exp_u;
    stats.sum_z += sum_z;
    stats.sum_u += sum_u;
  }
  return stats;
}

// fp32 HVP results larger than the caches, written into a caller's buffer, go out with streaming stores
// (AVX-512, when avx512 is the active ISA): an ordinary store first reads the line it writes
// (read-for-ownership), a third more traffic on the output of a memory-bound kernel. Not into a fresh
// allocation: there the kernel's zeroing of each newly touched page has just put it in cache, and
// ordinary stores measured faster. Same values, same rounding: only the store instruction differs.
constexpr int64_t kStreamingBytes = 64 << 20;

#if defined(__x86_64__)
__attribute__((target("avx512f"))) void stream_hvp_block(float* out, const float* exps, const float* u,
                                                         float factor, float p_dot_u, int64_t length) {
  int64_t j = 0;
  for (; j < length && reinterpret_cast<uintptr_t>(out + j) % 64 != 0; ++j) out[j] = factor * exps[j] * (u[j] - p_dot_u);
  const __m512 factors = _mm512_set1_ps(factor), shift = _mm512_set1_ps(p_dot_u);
  for (; j + 16 <= length; j += 16) {
    const __m512 scaled = _mm512_mul_ps(factors, _mm512_loadu_ps(exps + j));
    _mm512_stream_ps(out + j, _mm512_mul_ps(scaled, _mm512_sub_ps(_mm512_loadu_ps(u + j), shift)));
  }
  for (; j < length; ++j) out[j] = factor * exps[j] * (u[j] - p_dot_u);
}
#endif

template <typename scalar_t>
bool streams_output(int64_t rows, int64_t classes) {
#if defined(__x86_64__)
  return std::is_same_v<scalar_t, float> && rows * classes * int64_t(sizeof(float)) >= kStreamingBytes &&
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
template <typename A>
int64_t scratch_size(int64_t classes) {
  return classes + (classes + kBlock - 1) / kBlock;
}

template <typename scalar_t>
CURVKERN_INLINE void write_zeros(scalar_t* out, int64_t v) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] = scalar_t(0);
}

template <typename scalar_t>
CURVKERN_INLINE void write_nan(scalar_t* out, int64_t v) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] = scalar_t(std::numeric_limits<float>::quiet_NaN());
}

// What every kernel needs to find row r: base pointers, strides, sizes, the label rule.
template <typename scalar_t>
struct Problem {
  const scalar_t* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  int64_t rows, classes, ignore_index, shift_period;
  acc_t<scalar_t> label_smoothing;

  // The label of row r, or ignore_index: target[r], or target[r + 1] under the causal shift (the last
  // time step of each sequence has none).
  CURVKERN_INLINE int64_t label(int64_t r) const {
    if (shift_period == 0) return target[r];
    return (r + 1) % shift_period == 0 ? ignore_index : target[r + 1];
  }
  CURVKERN_INLINE const scalar_t* row(int64_t r) const { return logits + r * logits_row_stride; }
  CURVKERN_INLINE bool in_range(int64_t y) const { return y >= 0 && y < classes; }
};

// The per-row bodies below are force-inlined into the ISA versions' parallel loops (the parallel loop must
// sit in the ISA's function itself: GCC outlines an OpenMP region from the function that holds it, and
// the outlined body inherits that function's target; csrc/cpu_dispatch.h).
template <typename scalar_t>
CURVKERN_INLINE void forward_row(const Problem<scalar_t>& p, int64_t r, acc_t<scalar_t>* loss, acc_t<scalar_t>* lse) {
  using A = acc_t<scalar_t>;
  const int64_t y = p.label(r);
  if (y == p.ignore_index) {
    loss[r] = A(0);
    lse[r] = A(0);
    return;
  }
  const scalar_t* z = p.row(r);
  const bool smoothing = p.label_smoothing != A(0);
  RowStats<A> stats = smoothing ? row_stats<false, true>(z, z, p.classes, nullptr, nullptr)
                                 : row_stats<false, false>(z, z, p.classes, nullptr, nullptr);
  const A row_lse = stats.max + std::log(stats.sum_exp);
  lse[r] = row_lse;
  if (!p.in_range(y)) {  // the Python layer raises first on CPU; never read out of bounds regardless
    loss[r] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  A row_loss = row_lse - (A(1) - p.label_smoothing) * load(z[y]);
  if (smoothing) row_loss -= p.label_smoothing / A(p.classes) * stats.sum_z;
  loss[r] = row_loss;
}

template <typename scalar_t>
CURVKERN_INLINE void backward_row(const Problem<scalar_t>& p, int64_t r, const acc_t<scalar_t>* lse,
                                  const acc_t<scalar_t>* grad_scale, int64_t grad_scale_stride, scalar_t* grad) {
  using A = acc_t<scalar_t>;
  scalar_t* out = grad + r * p.classes;
  const int64_t y = p.label(r);
  if (y == p.ignore_index) {
    write_zeros(out, p.classes);
    return;
  }
  if (!p.in_range(y)) {
    write_nan(out, p.classes);
    return;
  }
  const scalar_t* z = p.row(r);
  const A scale = grad_scale[r * grad_scale_stride];
  const A row_lse = lse[r];
  const A uniform = p.label_smoothing / A(p.classes);
  for (int64_t start = 0; start < p.classes; start += kBlock) {
    const int64_t end = std::min(start + kBlock, p.classes);
    prefetch_next_block<false>(z, z, start + kBlock, p.classes);
#pragma omp simd
    for (int64_t j = start; j < end; ++j) {
      out[j] = store<scalar_t>(scale * (vec::exp(load(z[j]) - row_lse) - uniform));
    }
  }
  out[y] = store<scalar_t>(scale * (vec::exp(load(z[y]) - row_lse) - uniform - (A(1) - p.label_smoothing)));
}

template <typename scalar_t>
CURVKERN_INLINE void hvp_row(const Problem<scalar_t>& p, int64_t r, const scalar_t* u, int64_t u_row_stride,
                             const acc_t<scalar_t>* scale, int64_t scale_stride, scalar_t* out,
                             int64_t out_row_stride, acc_t<scalar_t>* dot, acc_t<scalar_t>* scratch,
                             bool stream_output) {
  using A = acc_t<scalar_t>;
  scalar_t* out_row = out + r * out_row_stride;
  const int64_t y = p.label(r);
  if (y == p.ignore_index) {
    write_zeros(out_row, p.classes);
    dot[r] = A(0);
    return;
  }
  if (!p.in_range(y)) {
    write_nan(out_row, p.classes);
    dot[r] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  const scalar_t* z = p.row(r);
  const scalar_t* u_row = u + r * u_row_stride;
  const bool smoothing = p.label_smoothing != A(0);
  A* exps = scratch;
  A* shifts = scratch + p.classes;
  RowStats<A> stats = smoothing ? row_stats<true, true>(z, u_row, p.classes, exps, shifts)
                                 : row_stats<true, false>(z, u_row, p.classes, exps, shifts);
  const A inverse_sum = A(1) / stats.sum_exp;
  const A p_dot_u = stats.sum_exp_u * inverse_sum;
  const A weight = scale[r * scale_stride] * inverse_sum;
  // Sweep 2: u is still in cache, p_j = e_j e^{shift - max} / sum from the kept e_j. A block shifted by 0
  // (stored as -inf) holds only zeros and NaN: its factor e^{-inf - max} is 0, so a NaN stays NaN.
  for (int64_t start = 0; start < p.classes; start += kBlock) {
    const int64_t length = std::min(kBlock, p.classes - start);
    const A factor = weight * vec::exp(shifts[start / kBlock] - stats.max);
    const A* eb = exps + start;
    const scalar_t* ub = u_row + start;
    scalar_t* ob = out_row + start;
#if defined(__x86_64__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stream_output) {
        stream_hvp_block(ob, eb, ub, factor, p_dot_u, length);
        continue;
      }
    }
#endif
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) {
      ob[j] = store<scalar_t>(factor * eb[j] * (load(ub[j]) - p_dot_u));
    }
  }
  A row_dot = p_dot_u - (A(1) - p.label_smoothing) * load(u_row[y]);
  if (smoothing) row_dot -= p.label_smoothing / A(p.classes) * stats.sum_u;
  dot[r] = row_dot;
}

// One entry point per dtype and kernel, each stamped once per ISA and called through a dispatcher (on
// x86-64 the inlined row loops are compiled three times: AVX-512, AVX2 and baseline; csrc/cpu_dispatch.h).
#define CURVKERN_CE_VERSIONS(isa, target, scalar_t, suffix)                                                     \
  target void ce_forward_##suffix##_##isa(                                                                      \
      const Problem<scalar_t>& p, acc_t<scalar_t>* loss, acc_t<scalar_t>* lse) {                               \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                           \
    for (int64_t r = 0; r < p.rows; ++r) forward_row(p, r, loss, lse);                                         \
  }                                                                                                             \
  target void ce_backward_##suffix##_##isa(                                                                     \
      const Problem<scalar_t>& p, const acc_t<scalar_t>* lse, const acc_t<scalar_t>* grad_scale,               \
      int64_t grad_scale_stride, scalar_t* grad) {                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")                           \
    for (int64_t r = 0; r < p.rows; ++r) backward_row(p, r, lse, grad_scale, grad_scale_stride, grad);         \
  }                                                                                                             \
  target void ce_hvp_##suffix##_##isa(                                                                          \
      const Problem<scalar_t>& p, const scalar_t* u, int64_t u_row_stride, const acc_t<scalar_t>* scale,       \
      int64_t scale_stride, scalar_t* out, int64_t out_row_stride, acc_t<scalar_t>* dot, bool stream_out) {    \
    const bool stream_output = stream_out && streams_output<scalar_t>(p.rows, p.classes);                   \
    _Pragma("omp parallel num_threads(at::get_num_threads())") {                                              \
      std::vector<acc_t<scalar_t>> scratch(scratch_size<acc_t<scalar_t>>(p.classes));                         \
      _Pragma("omp for schedule(static)")                                                                       \
      for (int64_t r = 0; r < p.rows; ++r) {                                                                    \
        hvp_row(p, r, u, u_row_stride, scale, scale_stride, out, out_row_stride, dot, scratch.data(),           \
                stream_output);                                                                                 \
      }                                                                                                         \
      if (stream_output) drain_streaming_stores();                                                              \
    }                                                                                                           \
  }
#define CURVKERN_CE_KERNELS(scalar_t, suffix)                                                                   \
  CURVKERN_FOR_EACH_ISA(CURVKERN_CE_VERSIONS, scalar_t, suffix)                                                 \
  void ce_forward_##suffix(const Problem<scalar_t>& p, acc_t<scalar_t>* loss, acc_t<scalar_t>* lse) {           \
    CURVKERN_CALL_ACTIVE_ISA(ce_forward_##suffix, p, loss, lse);                                                \
  }                                                                                                             \
  void ce_backward_##suffix(const Problem<scalar_t>& p, const acc_t<scalar_t>* lse,                             \
                            const acc_t<scalar_t>* grad_scale, int64_t grad_scale_stride, scalar_t* grad) {     \
    CURVKERN_CALL_ACTIVE_ISA(ce_backward_##suffix, p, lse, grad_scale, grad_scale_stride, grad);                \
  }                                                                                                             \
  void ce_hvp_##suffix(const Problem<scalar_t>& p, const scalar_t* u, int64_t u_row_stride,                     \
                       const acc_t<scalar_t>* scale, int64_t scale_stride, scalar_t* out, int64_t out_row_stride, \
                       acc_t<scalar_t>* dot, bool stream_out) {                                                 \
    CURVKERN_CALL_ACTIVE_ISA(ce_hvp_##suffix, p, u, u_row_stride, scale, scale_stride, out, out_row_stride, dot,  \
                             stream_out);                                                                       \
  }

CURVKERN_CE_KERNELS(float, float)
CURVKERN_CE_KERNELS(double, double)
CURVKERN_CE_KERNELS(c10::BFloat16, bfloat16)
CURVKERN_CE_KERNELS(c10::Half, half)
#undef CURVKERN_CE_KERNELS
#undef CURVKERN_CE_VERSIONS

// Calls fn with a typed null pointer naming the logits' element type.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(static_cast<float*>(nullptr));
    case at::kDouble: return fn(static_cast<double*>(nullptr));
    case at::kBFloat16: return fn(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf: return fn(static_cast<c10::Half*>(nullptr));
    default: TORCH_CHECK(false, op, ": logits must be float32, float64, bfloat16 or float16, got ", dtype);
  }
}

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rows(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& logits) {
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", tensor.device());
  TORCH_CHECK(tensor.dim() == 2 && tensor.sizes() == logits.sizes(), op, ": ", name, " must have shape ",
              logits.sizes(), ", got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == logits.scalar_type(), op, ": ", name, " must have the logits' dtype ",
              logits.scalar_type(), ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.size(1) <= 1 || tensor.stride(1) == 1, op, ": ", name,
              " must have a dense last dimension (stride 1), got strides ", tensor.strides());
}

// Validates the logits and labels; returns the problem description for element type scalar_t.
template <typename scalar_t>
Problem<scalar_t> make_problem(const char* op, const at::Tensor& logits, const at::Tensor& target,
                               int64_t ignore_index, double label_smoothing, int64_t shift_period) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, V), got shape ", logits.sizes());
  check_rows(op, "logits", logits, logits);
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == logits.size(0) && target.is_contiguous(),
              op, ": target must be a contiguous int64 CPU tensor of shape (", logits.size(0), "), got ",
              target.scalar_type(), " of shape ", target.sizes());
  TORCH_CHECK(shift_period >= 0 && (shift_period == 0 || logits.size(0) % shift_period == 0), op,
              ": shift_period must be 0 or divide the number of rows ", logits.size(0), ", got ", shift_period);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  return Problem<scalar_t>{logits.const_data_ptr<scalar_t>(),
                           logits.size(0) > 1 ? logits.stride(0) : logits.size(1),
                           target.const_data_ptr<int64_t>(),
                           logits.size(0),
                           logits.size(1),
                           ignore_index,
                           shift_period,
                           static_cast<acc_t<scalar_t>>(label_smoothing)};
}

// A 0-dim or (N,) scale in the accumulation dtype; returns its element stride (0 when shared by all rows).
int64_t check_scale(const char* op, const char* name, const at::Tensor& scale, const at::Tensor& logits) {
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == accumulation_type(logits.scalar_type()), op, ": ",
              name, " must be a ", accumulation_type(logits.scalar_type()), " CPU tensor, got ",
              scale.scalar_type(), " on ", scale.device());
  if (scale.dim() == 0) return 0;
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == logits.size(0), op, ": ", name,
              " must be 0-dim or have shape (", logits.size(0), "), got ", scale.sizes());
  return scale.stride(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         int64_t ignore_index, double label_smoothing) {
  const char* op = "curvkern::cross_entropy_forward";
  auto options = logits.options().dtype(accumulation_type(logits.scalar_type()));
  at::Tensor loss = at::empty({logits.size(0)}, options), lse = at::empty({logits.size(0)}, options);
  dispatch_dtype(logits.scalar_type(), op, [&](auto* typed) {
    using scalar_t = std::remove_pointer_t<decltype(typed)>;
    auto problem = make_problem<scalar_t>(op, logits, target, ignore_index, label_smoothing, 0);
    using A = acc_t<scalar_t>;
    if constexpr (std::is_same_v<scalar_t, float>) ce_forward_float(problem, loss.data_ptr<A>(), lse.data_ptr<A>());
    if constexpr (std::is_same_v<scalar_t, double>) ce_forward_double(problem, loss.data_ptr<A>(), lse.data_ptr<A>());
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) ce_forward_bfloat16(problem, loss.data_ptr<A>(), lse.data_ptr<A>());
    if constexpr (std::is_same_v<scalar_t, c10::Half>) ce_forward_half(problem, loss.data_ptr<A>(), lse.data_ptr<A>());
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                  const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing) {
  const char* op = "curvkern::cross_entropy_backward";
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  prefer_huge_pages(grad);
  dispatch_dtype(logits.scalar_type(), op, [&](auto* typed) {
    using scalar_t = std::remove_pointer_t<decltype(typed)>;
    using A = acc_t<scalar_t>;
    auto problem = make_problem<scalar_t>(op, logits, target, ignore_index, label_smoothing, 0);
    TORCH_CHECK(lse.scalar_type() == accumulation_type(logits.scalar_type()) && lse.dim() == 1 &&
                    lse.size(0) == logits.size(0) && lse.is_contiguous() && lse.device().is_cpu(),
                op, ": lse must be a contiguous ", accumulation_type(logits.scalar_type()), " CPU tensor of shape (",
                logits.size(0), ")");
    const int64_t stride = check_scale(op, "grad_scale", grad_scale, logits);
    const A* lse_data = lse.const_data_ptr<A>();
    const A* scale_data = grad_scale.const_data_ptr<A>();
    scalar_t* grad_data = grad.data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, float>) ce_backward_float(problem, lse_data, scale_data, stride, grad_data);
    if constexpr (std::is_same_v<scalar_t, double>) ce_backward_double(problem, lse_data, scale_data, stride, grad_data);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) ce_backward_bfloat16(problem, lse_data, scale_data, stride, grad_data);
    if constexpr (std::is_same_v<scalar_t, c10::Half>) ce_backward_half(problem, lse_data, scale_data, stride, grad_data);
  });
  return grad;
}

at::Tensor cross_entropy_hvp_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& u,
                              const at::Tensor& scale, int64_t ignore_index, double label_smoothing,
                              int64_t shift_period, bool stream_out, at::Tensor& out) {
  const char* op = "curvkern::cross_entropy_hvp_";
  at::Tensor dot = at::empty({logits.size(0)}, logits.options().dtype(accumulation_type(logits.scalar_type())));
  dispatch_dtype(logits.scalar_type(), op, [&](auto* typed) {
    using scalar_t = std::remove_pointer_t<decltype(typed)>;
    using A = acc_t<scalar_t>;
    auto problem = make_problem<scalar_t>(op, logits, target, ignore_index, label_smoothing, shift_period);
    check_rows(op, "u", u, logits);
    check_rows(op, "out", out, logits);
    prefer_huge_pages(out);
    const int64_t scale_stride = check_scale(op, "scale", scale, logits);
    const scalar_t* u_data = u.const_data_ptr<scalar_t>();
    const A* scale_data = scale.const_data_ptr<A>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    const int64_t u_stride = u.stride(0), out_stride = out.size(0) > 1 ? out.stride(0) : out.size(1);
    A* dot_data = dot.data_ptr<A>();
    if constexpr (std::is_same_v<scalar_t, float>) ce_hvp_float(problem, u_data, u_stride, scale_data, scale_stride, out_data, out_stride, dot_data, stream_out);
    if constexpr (std::is_same_v<scalar_t, double>) ce_hvp_double(problem, u_data, u_stride, scale_data, scale_stride, out_data, out_stride, dot_data, stream_out);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) ce_hvp_bfloat16(problem, u_data, u_stride, scale_data, scale_stride, out_data, out_stride, dot_data, stream_out);
    if constexpr (std::is_same_v<scalar_t, c10::Half>) ce_hvp_half(problem, u_data, u_stride, scale_data, scale_stride, out_data, out_stride, dot_data, stream_out);
  });
  return dot;
}

}  // namespace curvkern
