#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace curvkern {

// Fused linear + cross-entropy over tiles of the logits z = hidden·weightᵀ + bias (docs/linear_cross_entropy.md):
// hidden (N, d), weight (V, d), bias (V) or none, of one dtype (fp32, fp64, bf16), any strides; target (N)
// int64. Each logits tile is at most (n_tile, v_tile); no tensor of N·V elements exists. Row results and
// scales are in the accumulation dtype (fp64 for fp64, fp32 otherwise), a scale 0-dim or (N).
//
// Every op takes the loss variants (docs/linear_cross_entropy.md, "Loss variants"): z_loss λ ≥ 0, softcap c ≥ 0
// (0: no cap) and class_weight, none or a contiguous (V) CPU tensor in the accumulation dtype. p, q and lse are
// then those of the capped logits z' = c·tanh(z/c), q̃ the weighted smoothed target, W = Σ q̃ and a = W + 2λ·lse,
// J = dz'/dz; the formulas below are the plain ones (a = W = J = 1, q̃ = q, λ = 0).

// (loss_rows, lse), both (N): the row loss (0 on ignored rows, NaN for a label outside [0, V)) and log Σ exp z.
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const at::Tensor& target, int64_t ignore_index,
                                                                double label_smoothing, int64_t n_tile, int64_t v_tile,
                                                                double z_loss, double softcap,
                                                                const std::optional<at::Tensor>& class_weight);

// With g_z = grad_scale_r·J ⊙ (a·p_r − q̃_r): (g_z·W, g_zᵀ·h, Σ_r g_z) in the inputs' dtype; the last is (V), or
// (0) without bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing, int64_t n_tile,
    int64_t v_tile, double z_loss, double softcap, const std::optional<at::Tensor>& class_weight);

// The double backward along (v_hidden, v_weight, v_bias) (absent: 0): with u = v_h·Wᵀ + h·v_Wᵀ + v_b and
// (H u)_r = s_r·p_r ⊙ (u_r − ⟨p_r, u_r⟩) (with variants s_r·(J ⊙ H_z' (J ⊙ u_r) + g' ⊙ z'' ⊙ u_r)), returns
// ((H u)·W + g_z·v_W, (H u)ᵀ·h + g_zᵀ·v_h, Σ_r (H u)_r, dot) with dot_r = ⟨p_r − q_r, u_r⟩ (with variants
// ⟨J ⊙ (a·p_r − q̃_r), u_r⟩; 0 on ignored rows) in the accumulation dtype; the third is (0) without bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_hvp(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& grad_scale, const std::optional<at::Tensor>& v_hidden,
    const std::optional<at::Tensor>& v_weight, const std::optional<at::Tensor>& v_bias, int64_t ignore_index,
    double label_smoothing, int64_t n_tile, int64_t v_tile, double z_loss, double softcap,
    const std::optional<at::Tensor>& class_weight);

// The Gauss-Newton product Jᵀ H_z J for K tangents d_hidden (K, N, d), d_weight (K, V, d), d_bias (K, V) (absent:
// 0): ((H u)·W (K, N, d), (H u)ᵀ·h (K, V, d), Σ_r (H u)_r (K, V), or (K, 0) without bias) in the inputs' dtype.
// The label smoothing enters only with variants (through W, and q̃ in the cap's term).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_ggn_vp(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& scale, const at::Tensor& d_hidden, const std::optional<at::Tensor>& d_weight,
    const std::optional<at::Tensor>& d_bias, int64_t ignore_index, int64_t n_tile, int64_t v_tile,
    double label_smoothing, double z_loss, double softcap, const std::optional<at::Tensor>& class_weight);

}  // namespace curvkern
