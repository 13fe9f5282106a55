// HysteroGrad's fused multi-tensor step on the CPU, in the three stages of docs/hysterograd.md ("The fused kernels").
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace curvkern {

// Pass A: G ← G·β + ((1−β)·s)·g² for every tensor, and Σu² (u = g / (√G + ε)) of the group added,
// tensor by tensor, into `accumulator`.
void hysterograd_pass_a_(at::TensorList grads, at::TensorList metrics, at::Tensor& accumulator, double beta,
                         double epsilon, double metric_scale);

// The scalar stage: advances τ, T, E in place; returns ([N̂, h, gate] in the scalars' dtype, −η·k in float64).
std::tuple<at::Tensor, at::Tensor> hysterograd_scalars_(const at::Tensor& accumulator, at::Tensor& tau,
                                                        at::Tensor& temp, at::Tensor& energy, const at::Tensor& lr,
                                                        double stiffening_factor, double beta, double cooling_rate,
                                                        bool adaptive_threshold, std::optional<double> grad_clip,
                                                        double hysteresis_scale);

// Pass B: p ← p + u·(−η·k) for every tensor when the gate is open; nothing is read or written when not.
void hysterograd_pass_b_(at::TensorList params, at::TensorList grads, at::TensorList metrics, const at::Tensor& stats,
                         const at::Tensor& neg_step_size, double epsilon);

}  // namespace curvkern
