#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace curvkern {

// Per-row loss (0 on ignored rows) and log-sum-exp, in the accumulation dtype (fp64 for fp64 logits,
// fp32 otherwise).
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         int64_t ignore_index, double label_smoothing);

// grad_scale_r * (softmax(z_r) - q_r) in the logits' dtype; ignored rows are written as zeros.
at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                  const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing);

// Writes scale_r * (p_r * u_r - p_r <p_r, u_r>) into out; returns <u_r, p_r - q_r> per row.
// stream_out: out is a caller's buffer (its pages mapped), so a large fp32 result may bypass the cache.
at::Tensor cross_entropy_hvp_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& u,
                              const at::Tensor& scale, int64_t ignore_index, double label_smoothing,
                              int64_t shift_period, bool stream_out, at::Tensor& out);

}  // namespace curvkern
