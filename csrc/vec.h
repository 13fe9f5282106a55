// exp and |tanh| for float and double, written so that GCC vectorizes them inside `#pragma omp simd`
// loops: straight-line arithmetic, fused multiply-adds, selects and integer bit tricks only, no
// branches and no libm calls. Inlined into the AVX-512 / AVX2 / baseline versions of each kernel
// (csrc/cpu_dispatch.h), each version gets vector code of its own width, and every version computes the
// same bits, because every product-sum that is fused is an explicit std::fma.
//
// Accuracy (tests/test_optim_fused.py checks |tanh| against mpmath): within 2.5 ulp in fp32 and 2 ulp
// in fp64. exp underflows to 0 below the smallest normal (no subnormal results) and overflows to inf
// above the largest finite value; NaN propagates.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace curvkern::vec {

namespace detail {

template <typename To, typename From>
CURVKERN_INLINE To bit_cast(From from) {
  return __builtin_bit_cast(To, from);
}

template <typename T>
CURVKERN_INLINE T horner(T x, const T* coefficients, int count) {
  T result = coefficients[count - 1];
  for (int i = count - 2; i >= 0; --i) result = std::fma(result, x, coefficients[i]);
  return result;
}

}  // namespace detail

// e^x = 2^k · e^r with k = round(x / ln 2), r = x − k·ln 2 in [−ln2/2, ln2/2] (Cody–Waite split).
CURVKERN_INLINE float exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  constexpr float kMax = 88.7228394f;    // ln(FLT_MAX)
  constexpr float kMin = -87.3365479f;   // ln(FLT_MIN)
  // Taylor coefficients 1/n!, n = 0..7: the remainder at |r| = ln2/2 is below 2^-27.
  static constexpr float kPoly[8] = {1.0f,           1.0f,           0.5f,           1.66666667e-1f,
                                     4.16666667e-2f, 8.33333333e-3f, 1.38888889e-3f, 1.98412698e-4f};
  const float clamped = x < kMin ? kMin : (x > kMax ? kMax : x);  // selects: fmin/fmax do not vectorize
  const float k = (clamped * kLog2e + kRound) - kRound;
  const float r = std::fma(-k, kLn2Lo, std::fma(-k, kLn2Hi, clamped));
  const float poly = detail::horner(r, kPoly, 8);
  // 2^k in two halves, so k = 128 (x just below ln FLT_MAX) does not overflow the exponent field.
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1;
  const float scale1 = detail::bit_cast<float>(static_cast<int32_t>((k1 + 127) << 23));
  const float scale2 = detail::bit_cast<float>(static_cast<int32_t>((ki - k1 + 127) << 23));
  float result = poly * scale1 * scale2;
  result = x > kMax ? INFINITY : result;
  result = x < kMin ? 0.0f : result;
  return x != x ? x : result;
}

CURVKERN_INLINE double exp(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kRound = 6755399441055744.0;  // 1.5·2^52
  constexpr double kMax = 709.782712893383973;   // ln(DBL_MAX)
  constexpr double kMin = -708.396418532264079;  // ln(DBL_MIN)
  // 1/n!, n = 0..13: the remainder at |r| = ln2/2 is below 2^-56.
  // clang-format off: it would give each coefficient a line of its own
  static constexpr double kPoly[14] = {
      1.0, 1.0, 0.5, 1.6666666666666666e-1, 4.1666666666666664e-2, 8.3333333333333332e-3,
      1.3888888888888889e-3, 1.9841269841269841e-4, 2.4801587301587302e-5, 2.7557319223985893e-6,
      2.7557319223985888e-7, 2.5052108385441720e-8, 2.0876756987868100e-9, 1.6059043836821613e-10};
  // clang-format on
  const double clamped = x < kMin ? kMin : (x > kMax ? kMax : x);
  const double shifted = clamped * kLog2e + kRound;
  const double k = shifted - kRound;
  const double r = std::fma(-k, kLn2Lo, std::fma(-k, kLn2Hi, clamped));
  const double poly = detail::horner(r, kPoly, 14);
  // k as an integer read from the rounded sum's low bits, and halved with a logical shift of k + 2048:
  // AVX2 has neither a double→int64 conversion nor an arithmetic 64-bit shift, and would stay scalar.
  const int64_t ki = detail::bit_cast<int64_t>(shifted) - detail::bit_cast<int64_t>(kRound);
  const int64_t k1 = static_cast<int64_t>(static_cast<uint64_t>(ki + 2048) >> 1) - 1024;
  const double scale1 = detail::bit_cast<double>(static_cast<int64_t>((k1 + 1023) << 52));
  const double scale2 = detail::bit_cast<double>(static_cast<int64_t>((ki - k1 + 1023) << 52));
  double result = poly * scale1 * scale2;
  result = x > kMax ? INFINITY : result;
  result = x < kMin ? 0.0 : result;
  return x != x ? x : result;
}

// |tanh x| (what Σ|tanh g| needs: the sign would only be dropped again) = m/(m + 2) with m = e^{2|x|} − 1,
// one path for every x: m comes from the same range reduction as exp, 2^k·(e^r − 1) + (2^k − 1), with
// e^r − 1 = r + r²·Q(r), so it keeps full relative accuracy as |x| → 0 where e^{2|x|} − 1 would cancel.
// 2|x| saturates at 18.5, past which tanh rounds to 1 in fp32; a NaN passes the saturation and every
// later step, so it comes out NaN without a select. Q is of degree 4, split as (q0 + q1·r) + r²·(q2 + q3·r
// + q4·r²), and 2^k is built from the rounding sum's bits (no float→int conversion): few multiply-adds,
// and a chain from x to the division short enough that out-of-order cores overlap several 16-element
// blocks of pass A.
CURVKERN_INLINE float abs_tanh(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: the sum's low mantissa bits hold round(y / ln 2)
  constexpr float kSaturate = 18.5f;
  // e^r − 1 = r + r²·Q(r): a fit of Q weighted to e^r − 1's relative error over |r| ≤ ln2/2 (least squares
  // on Chebyshev nodes, reweighted towards minimax; mpmath), within 0.15·2^-23 with these fp32 coefficients,
  // as the Taylor polynomial of degree 5 it replaces.
  static constexpr float kQ[5] = {4.999999702e-1f, 1.666654348e-1f, 4.166720062e-2f, 8.366547525e-3f, 1.388251665e-3f};
  const float a = std::fabs(x);
  float y = a + a;
  y = y > kSaturate ? kSaturate : y;
  const float shifted = std::fma(y, kLog2e, kRound);
  const float k = shifted - kRound;
  const float r = std::fma(-k, kLn2Lo, std::fma(-k, kLn2Hi, y));
  const float r2 = r * r;
  const float q = std::fma(r2, std::fma(std::fma(kQ[4], r, kQ[3]), r, kQ[2]), std::fma(kQ[1], r, kQ[0]));
  const float expm1_r = std::fma(r2, q, r);
  // 2^k: the exponent field (k + 127) << 23, where bits(shifted) = bits(kRound) + k and bits(kRound) << 23
  // wraps to 0.
  const float scale = detail::bit_cast<float>((detail::bit_cast<uint32_t>(shifted) + 127u) << 23);
  const float expm1_y = std::fma(scale, expm1_r, scale - 1.0f);
  return expm1_y / (expm1_y + 2.0f);
}

// |tanh x| for |x| < kAbsTanhSmallBound<T>: a + a·z·P(z), a = |x|, z = a², P a fit to (tanh a − a)/a³ weighted to
// tanh's relative error (least squares on Chebyshev nodes, reweighted towards minimax; mpmath). In fp32 P has
// degree 4, within 0.01·2^-24 below 0.5, and the evaluated result within 0.7 ulp: eight operations where
// abs_tanh takes about twenty and a division, for the stages of BiostatisV6's pass A whose gradients are all
// small (nearly all of them in training). In fp64 P has degree 10 below 0.55 (abs_tanh's small branch).
template <typename T>
inline constexpr T kAbsTanhSmallBound = T(0.55);
template <>
inline constexpr float kAbsTanhSmallBound<float> = 0.5f;

CURVKERN_INLINE float abs_tanh_small(float x) {
  static constexpr float kPoly[5] = {-3.33333284e-1f, 1.33329645e-1f, -5.38991950e-2f, 2.12980155e-2f, -6.64752536e-3f};
  const float a = std::fabs(x);
  const float z = a * a;
  return std::fma(a * z, detail::horner(z, kPoly, 5), a);
}

CURVKERN_INLINE double abs_tanh_small(double x) {
  static constexpr double kPoly[11] = {-3.3333333333333333e-1, 1.3333333333332728e-1,  -5.3968253967449510e-2,
                                       2.1869488494320200e-2,  -8.8632344118062880e-3, 3.5921105508989835e-3,
                                       -1.4556631208771447e-3, 5.8894204157954450e-4,  -2.3465154066026225e-4,
                                       8.5139229126171600e-5,  -2.0619991569368580e-5};
  const double a = std::fabs(x);
  const double z = a * a;
  return std::fma(a * z, detail::horner(z, kPoly, 11), a);
}

// |tanh x| in fp64: abs_tanh_small below 0.55, where 1 − 2/(e^{2a} + 1) would cancel, and that above, NaN
// included (exp passes it on).
CURVKERN_INLINE double abs_tanh(double x) {
  const double a = std::fabs(x);
  const double large = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
  return a < kAbsTanhSmallBound<double> ? abs_tanh_small(x) : large;
}

// tanh x with its sign, from abs_tanh (the same accuracy, full relative accuracy near 0): the soft cap c·tanh(x/c)
// of the cross-entropy kernels' loss variants. A NaN stays NaN.
template <typename T>
CURVKERN_INLINE T tanh(T x) {
  const T t = abs_tanh(x);
  return x < T(0) ? -t : t;
}

}  // namespace curvkern::vec
