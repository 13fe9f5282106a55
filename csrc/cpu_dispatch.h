// Runtime ISA dispatch for the CPU kernels: each kernel is compiled three times and the loader picks
// the best clone the CPU supports, so the library runs on any x86-64 (no -march=native).
// - avx512f: 512-bit vectors (AVX-512F implies FMA);
// - arch=x86-64-v3: AVX2 *with* FMA (a bare "avx2" clone has no FMA, and every std::fma in the
//   kernels would become a libm call that blocks vectorization);
// - default: baseline x86-64 (SSE2), where std::fma is a correctly rounded libm call, so every clone
//   computes the same bits.
#pragma once

#define CURVKERN_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
