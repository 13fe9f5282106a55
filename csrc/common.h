// What every kernel file shares: forced inlining, the element dtypes the kernels are built for and the one
// dispatcher over them, the bf16/fp16 loads and round-to-nearest-even stores, and the prefetch hints.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

// The hot loops' helpers and bodies are inlined always: a call left in a large outlined OpenMP body keeps
// its loop scalar. CURVKERN_INLINE_LAMBDA goes between a lambda's parameter list and its body.
#define CURVKERN_INLINE inline __attribute__((always_inline))
#define CURVKERN_INLINE_LAMBDA __attribute__((always_inline))

// STAMP(element type, name) for the four element dtypes every kernel is built for; the name is the
// dtype's part of a kernel's symbol, e.g. hysterograd_pass_a_bf16_avx2.
#define CURVKERN_FOR_EACH_DTYPE(STAMP) \
  STAMP(float, f32)                    \
  STAMP(double, f64)                   \
  STAMP(c10::BFloat16, bf16)           \
  STAMP(c10::Half, f16)

namespace curvkern {

template <typename T>
struct TypeTag {
  using type = T;
};

// Whether the kernels are built for elements of `dtype` (CURVKERN_FOR_EACH_DTYPE's four).
inline bool is_kernel_dtype(c10::ScalarType dtype) {
  switch (dtype) {
#define CURVKERN_DTYPE_CASE(T, name) case c10::CppTypeToScalarType<T>::value:
    CURVKERN_FOR_EACH_DTYPE(CURVKERN_DTYPE_CASE)
#undef CURVKERN_DTYPE_CASE
    return true;
    default: return false;
  }
}

// Calls body(TypeTag<T>{}) with T the element type of `dtype`; raises `op: <what> must be float32,
// float64, bfloat16 or float16` (RuntimeError) for any other dtype. Elements of type T are computed in
// at::opmath_type<T>, fp32 for bf16 and fp16, which is also the dtype of a low-precision parameter's
// optimizer state and of the cross-entropy's accumulations.
template <typename Body>
void with_dtype(c10::ScalarType dtype, const char* op, const char* what, Body&& body) {
  switch (dtype) {
#define CURVKERN_DTYPE_CASE(T, name) \
  case c10::CppTypeToScalarType<T>::value: return body(TypeTag<T>{});
    CURVKERN_FOR_EACH_DTYPE(CURVKERN_DTYPE_CASE)
#undef CURVKERN_DTYPE_CASE
    default: TORCH_CHECK(false, op, ": ", what, " must be float32, float64, bfloat16 or float16, got ", dtype);
  }
}

// The dtype of at::opmath_type for a kernel dtype (with_dtype's); fp32 for any other, which the kernels reject.
inline c10::ScalarType opmath_dtype(c10::ScalarType dtype) {
  return dtype == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// Low-precision elements are written back rounded to nearest even with bit arithmetic and selects: c10's
// conversions to bf16 and fp16 branch on NaN and on the exponent range, and keep the loops scalar.
namespace detail {

CURVKERN_INLINE uint16_t float_to_bf16(float value) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, value);
  const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  return static_cast<uint16_t>(value != value ? UINT32_C(0x7FC0) : rounded);
}

// fp32 → fp16, rounding to nearest even: fp32 arithmetic does the rounding. Scaling |x| up by 2^112
// and back down by 2^-110 saturates what is too large to inf and leaves the rest; adding a power of two
// aligned to x's fp16 exponent (at least that of the smallest normal) rounds away exactly the bits
// fp16 cannot hold, and the sum's bits then hold the fp16 exponent and mantissa.
CURVKERN_INLINE uint16_t float_to_fp16(float value) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, value);
  const uint32_t doubled = bits + bits;  // the sign shifted out
  const uint32_t sign = bits & UINT32_C(0x80000000);
  float base = (std::fabs(value) * 0x1p+112f) * 0x1p-110f;
  uint32_t bias = doubled & UINT32_C(0xFF000000);
  bias = bias < UINT32_C(0x71000000) ? UINT32_C(0x71000000) : bias;
  base = __builtin_bit_cast(float, (bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t base_bits = __builtin_bit_cast(uint32_t, base);
  const uint32_t finite = ((base_bits >> 13) & UINT32_C(0x7C00)) + (base_bits & UINT32_C(0x0FFF));
  return static_cast<uint16_t>((sign >> 16) | (doubled > UINT32_C(0xFF000000) ? UINT32_C(0x7E00) : finite));
}

}  // namespace detail

// data[i] in at::opmath_type<T>. c10's conversions from bf16 and fp16 are exact and branch-free: bit
// arithmetic, or on aarch64 the fp16 conversion instruction.
template <typename T>
CURVKERN_INLINE at::opmath_type<T> load(const T* data, int64_t i) {
  return static_cast<at::opmath_type<T>>(data[i]);
}

// data[i] = value, rounded to nearest even into a low-precision T.
template <typename T>
CURVKERN_INLINE void store(T* data, int64_t i, at::opmath_type<T> value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    data[i].x = detail::float_to_bf16(value);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    data[i].x = detail::float_to_fp16(value);
  } else {
    data[i] = value;
  }
}

template <typename T>
CURVKERN_INLINE void prefetch_read(const T* p) {
  __builtin_prefetch(p, 0);
}

template <typename T>
CURVKERN_INLINE void prefetch_write(const T* p) {
  __builtin_prefetch(p, 1);
}

}  // namespace curvkern
