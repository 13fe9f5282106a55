// BiostatisV6's fused multi-tensor step on the CPU (shared/specs/biostatis.md §8), in two ops so that
// a group mixing parameter dtypes, or sharded across ranks, can sum its gradients' statistics first.
#pragma once
#include <ATen/ATen.h>

namespace curvkern {

// Pass over the gradients: a float64 [n, 3] of (numel, Σg², Σ|tanh g|) per tensor. The column sums
// over all of a group's tensors are its group statistics.
at::Tensor biostatis_grad_sums(at::TensorList grads);

// The rest of one step over tensors of one dtype: increments each tensor's step count, and writes m,
// v, the memory EMAs (tensor-major: memory_emas[i·J + j]) and p. `grad_sums` is biostatis_grad_sums
// of these gradients, `group_sums` the column sums over the whole group. Returns the scalar stage as
// a float64 [n, 9] tensor, columns (h_G, e_G, h, e, τ, I, ascent, √bc2, coef).
at::Tensor biostatis_update_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList memory_emas, at::TensorList steps,
                             const at::Tensor& grad_sums, const at::Tensor& group_sums, double lr, double beta1,
                             double beta2, double eps, double weight_decay, double homeo_rate,
                             double coherence_target, double energy_target, double lambda_energy,
                             at::ArrayRef<double> memory_decays, at::ArrayRef<double> memory_weights,
                             double flip_threshold, double ascent_strength);

}  // namespace curvkern
