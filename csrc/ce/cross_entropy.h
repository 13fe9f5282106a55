#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace curvkern {

// z_loss (λ ≥ 0) adds λ·lse² to each row's loss and softcap (c > 0; 0: none) caps the logits to c·tanh(x/c),
// in every kernel below, and weight (None or (V,) class weights in the logits' dtype) weighs the target q̃ of
// each row (docs/cross_entropy.md, "Loss variants"). The target of these three ops is (N,) int64 class indices
// or (N, V) class probabilities in the logits' dtype (a dense last dimension; every row counts, no causal
// shift).
// Per-row loss (0 on ignored rows) and log-sum-exp, in the accumulation dtype (fp64 for fp64 logits,
// fp32 otherwise).
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         int64_t ignore_index, double label_smoothing, double z_loss,
                                                         double softcap, const std::optional<at::Tensor>& weight);

// grad_scale_r * (softmax(z_r) - q_r) in the logits' dtype; ignored rows are written as zeros.
at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                  const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing,
                                  double z_loss, double softcap, const std::optional<at::Tensor>& weight);

// Writes scale_r * (p_r * u_r - p_r <p_r, u_r>) into out; returns <u_r, p_r - q_r> per row.
// stream_out: out is a caller's buffer (its pages mapped), so a large fp32 result may bypass the cache.
at::Tensor cross_entropy_hvp_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& u,
                              const at::Tensor& scale, int64_t ignore_index, double label_smoothing,
                              int64_t shift_period, bool stream_out, at::Tensor& out, double z_loss, double softcap,
                              const std::optional<at::Tensor>& weight);

// A shard of vocabulary-parallel rows (columns class_offset .. class_offset + V of num_classes), as
// curvkern.families.LossKernels states: this shard's part of each row's statistics, (N, 5) in the
// accumulation dtype; the gradient given the whole rows' lse; the HVP given their lse and <p, u>.
at::Tensor cross_entropy_partial_stats(const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& u, int64_t ignore_index, double label_smoothing,
                                       int64_t class_offset, int64_t num_classes);
at::Tensor cross_entropy_shard_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                        const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing,
                                        int64_t class_offset, int64_t num_classes);
void cross_entropy_shard_hvp_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& u,
                              const at::Tensor& lse, const at::Tensor& p_dot_u, const at::Tensor& scale,
                              int64_t ignore_index, int64_t num_classes, at::Tensor& out);

}  // namespace curvkern
