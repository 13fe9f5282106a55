// Runtime ISA dispatch for the CPU kernels: each kernel is compiled three times and the loader picks
// the best clone the CPU supports, so the library runs on any x86-64 (no -march=native).
// - arch=x86-64-v4: AVX-512 F, BW, DQ and VL with FMA (a bare "avx512f" clone lacks the BW/VL
//   conversions that narrow fp32 results to bf16/fp16, and keeps those loops scalar);
// - arch=x86-64-v3: AVX2 *with* FMA (a bare "avx2" clone has no FMA, and every std::fma in the
//   kernels would become a libm call that blocks vectorization);
// - default: baseline x86-64 (SSE2), where std::fma is a correctly rounded libm call, so every clone
//   computes the same bits.
#pragma once

#define CURVKERN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
