// BiostatisV6's fused multi-tensor step on the CPU, in the passes of docs/biostatis.md ("The fused kernels"),
// separately callable so that a group mixing parameter dtypes, or sharded across ranks, can sum its
// statistics over the whole group in between.
#pragma once
#include <ATen/ATen.h>

namespace curvkern {

// Pass A, read only: a float64 [n, 7] of (numel, Σg², Σ|tanh g|, Σm'g, Σm'², Σ|m'|, Σ√v') per tensor,
// m' and v' the moments this step will write. The column sums over a group's tensors give its group
// statistics.
at::Tensor biostatis_sums(at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, double beta1,
                          double beta2);

// The scalar stage and pass B over tensors of one dtype: increments each tensor's step count, and writes
// m, v, the memory EMAs (tensor-major: memory_emas[i·J + j]) and p. `sums` is biostatis_sums of these
// tensors, `group_sums` the column sums over the whole group. Returns the scalar stage as a float64
// [n, 9] tensor, columns (h_G, e_G, h, e, τ, I, ascent, √bc2, coef).
at::Tensor biostatis_update_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList memory_emas, at::TensorList steps,
                             const at::Tensor& sums, const at::Tensor& group_sums, const at::Tensor& lr_tensor,
                             double beta1, double beta2, double eps, double weight_decay, double homeo_rate,
                             double coherence_target, double energy_target, double lambda_energy,
                             at::ArrayRef<double> memory_decays, at::ArrayRef<double> memory_weights,
                             double flip_threshold, double ascent_strength);

}  // namespace curvkern
