// Runtime ISA dispatch for the CPU kernels: on x86-64 each kernel entry is compiled three times and
// one dispatcher picks the version to run, so the library runs on any x86-64 (no -march=native):
// - avx512 (arch=x86-64-v4): AVX-512 F, BW, DQ and VL with FMA (a bare "avx512f" version lacks the
//   BW/VL conversions that narrow fp32 results to bf16/fp16, and keeps those loops scalar);
// - avx2 (arch=x86-64-v3): AVX2 *with* FMA (a bare "avx2" version has no FMA, and every std::fma in
//   the kernels would become a libm call that blocks vectorization);
// - default: baseline x86-64 (SSE2), where std::fma is a correctly rounded libm call, so every
//   version computes the same bits.
// The choice is the best the CPU supports, or the one the environment variable CURVKERN_CPU_CAPABILITY
// names (ATen's names, as ATEN_CPU_CAPABILITY), read once. Other architectures (aarch64, where NEON is
// baseline) compile one portable "default" version.
//
// The OpenMP region must sit in the target-attributed function itself: GCC outlines the region
// (`<name>._omp_fn.N`) from the function that holds it, and the outlined body inherits that function's
// target, so each version's loops are vectorized for its own ISA.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace curvkern {

enum class CpuIsa { kDefault, kAvx2, kAvx512 };

// The ISA the kernels run, chosen on the first call. Raises (RuntimeError in Python) if
// CURVKERN_CPU_CAPABILITY names an unknown ISA or one this CPU cannot run.
CpuIsa active_isa();

// ATen's name of active_isa(): "default", "avx2" or "avx512".
std::string cpu_capability();

// Every value of CURVKERN_CPU_CAPABILITY this CPU can run, ascending ("default" first).
std::vector<std::string> cpu_capabilities();

// Bytes in one vector register of each stamped ISA (CURVKERN_FOR_EACH_ISA's first argument), for
// loops that size their work to the registers: kVectorBytes_##isa. NEON's are 16 bytes, as SSE2's.
constexpr std::size_t kVectorBytes_avx512 = 64;
constexpr std::size_t kVectorBytes_avx2 = 32;
constexpr std::size_t kVectorBytes_default = 16;

}  // namespace curvkern

// The stamping. A kernel's OpenMP region is written once, in a macro STAMP(isa, target, ...) defining the
// region's function for one ISA (named <kernel>_<dtype>_<isa>, the `target` attribute before it), and
// CURVKERN_FOR_EACH_ISA(STAMP, ...) expands that macro once per ISA of this architecture: on x86-64 to
//   STAMP(avx512, __attribute__((target("arch=x86-64-v4"))), ...)
//   STAMP(avx2, __attribute__((target("arch=x86-64-v3"))), ...)
//   STAMP(default, , ...)
// elsewhere to STAMP(default, , ...) alone. Macros, because the region must be written inside each
// target-attributed function (above): a shared helper holding it, template or lambda, is where GCC would
// outline it from, with the helper's (baseline) target, and a target cannot be a template parameter.
// target_clones, which clones one function per ISA, chooses through an ifunc that CURVKERN_CPU_CAPABILITY
// could not override. Each kernel file stamps its regions once per dtype too (CURVKERN_FOR_EACH_DTYPE,
// csrc/common.h), not as templates, so that every outlined body's symbol names its kernel, dtype and ISA
// (hysterograd_pass_a_bf16_avx2._omp_fn.0): what profiles show and tests/ look up with objdump.
#if defined(__x86_64__)
#define CURVKERN_FOR_EACH_ISA(STAMP, ...)                               \
  STAMP(avx512, __attribute__((target("arch=x86-64-v4"))), __VA_ARGS__) \
  STAMP(avx2, __attribute__((target("arch=x86-64-v3"))), __VA_ARGS__)   \
  STAMP(default, , __VA_ARGS__)

// Calls name##_<isa>(args...) for the active ISA (a `return` statement: use it as a function's body).
#define CURVKERN_CALL_ACTIVE_ISA(name, ...)                              \
  switch (::curvkern::active_isa()) {                                    \
    case ::curvkern::CpuIsa::kAvx512: return name##_avx512(__VA_ARGS__); \
    case ::curvkern::CpuIsa::kAvx2: return name##_avx2(__VA_ARGS__);     \
    case ::curvkern::CpuIsa::kDefault: break;                            \
  }                                                                      \
  return name##_default(__VA_ARGS__)
#else
#define CURVKERN_FOR_EACH_ISA(STAMP, ...) STAMP(default, , __VA_ARGS__)
#define CURVKERN_CALL_ACTIVE_ISA(name, ...) \
  (void)::curvkern::active_isa();           \
  return name##_default(__VA_ARGS__)
#endif
