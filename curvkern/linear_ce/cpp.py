"""The C++/OpenMP linear cross-entropy kernels of ``curvkern._C`` (``csrc/linear_ce/linear_cross_entropy.cpp``):
thin wrappers with the eager reference's signatures (:class:`curvkern.families.LinearLossKernels`), and the ops'
fake implementations so ``torch.compile`` can trace them.

The ops take the tile sizes as arguments: :data:`N_TILE` rows by :data:`V_TILE` classes, module constants
read at every call, so tests can make them small. Without a bias the ops return an empty bias result, which
the wrappers turn into None. The loss variants go to the ops as ``z_loss``, ``softcap`` (0.0 for no cap) and
``class_weight`` converted to a contiguous tensor in the accumulation dtype.
"""

from __future__ import annotations

import torch

from curvkern._dispatch import cpp_unavailable_reason, register
from curvkern.hyperparameters import CrossEntropyHyperparameters
from curvkern.linear_ce.eager import accumulation_dtype
from curvkern.linear_ce.variants import refuse_missing_variants

# Rows and classes per logits tile: a 1024 × 2048 fp32 tile is 8 MiB, large enough for ATen's GEMMs to run
# near peak and small enough for the epilogue to find it in the last-level cache; the HVP's two tile buffers
# (16 MiB) stay within 5% of one (N, V) fp32 copy from N·V ≥ 84 M (GPT-2's vocabulary at 2048 tokens).
# 1024 rows, not fewer: each row tile adds a read and write of the (V, d) weight gradient.
N_TILE = 1024
V_TILE = 2048

if cpp_unavailable_reason() is None:

    def _bias_result(weight, bias, leading=()):
        return weight.new_empty((*leading, 0 if bias is None else weight.shape[0]))

    @torch.library.register_fake("curvkern::linear_cross_entropy_forward")
    def _forward_fake(
        hidden,
        weight,
        bias,
        target,
        ignore_index,
        label_smoothing,
        n_tile,
        v_tile,
        z_loss=0.0,
        softcap=0.0,
        class_weight=None,
    ):
        row = hidden.new_empty(hidden.shape[0], dtype=accumulation_dtype(hidden.dtype))
        return row, torch.empty_like(row)

    @torch.library.register_fake("curvkern::linear_cross_entropy_backward")
    def _backward_fake(
        hidden,
        weight,
        bias,
        target,
        lse,
        grad_scale,
        ignore_index,
        label_smoothing,
        n_tile,
        v_tile,
        z_loss=0.0,
        softcap=0.0,
        class_weight=None,
    ):
        return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), _bias_result(weight, bias)

    @torch.library.register_fake("curvkern::linear_cross_entropy_hvp")
    def _hvp_fake(
        hidden,
        weight,
        bias,
        target,
        lse,
        grad_scale,
        v_hidden,
        v_weight,
        v_bias,
        ignore_index,
        label_smoothing,
        n_tile,
        v_tile,
        z_loss=0.0,
        softcap=0.0,
        class_weight=None,
    ):
        dot = hidden.new_empty(hidden.shape[0], dtype=accumulation_dtype(hidden.dtype))
        return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), _bias_result(weight, bias), dot

    @torch.library.register_fake("curvkern::linear_ce_ggn_vp")
    def _ggn_vp_fake(
        hidden,
        weight,
        bias,
        target,
        scale,
        d_hidden,
        d_weight,
        d_bias,
        ignore_index,
        n_tile,
        v_tile,
        label_smoothing=0.0,
        z_loss=0.0,
        softcap=0.0,
        class_weight=None,
    ):
        tangents = d_hidden.shape[0]
        return (
            hidden.new_empty((tangents, *hidden.shape)),
            weight.new_empty((tangents, *weight.shape)),
            _bias_result(weight, bias, (tangents,)),
        )


def _bias_or_none(result: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else result


def _variants(hyperparameters: CrossEntropyHyperparameters, dtype: torch.dtype) -> tuple:
    """The ops' ``(z_loss, softcap, class_weight)`` for inputs of ``dtype``; a plain record has no variants."""
    softcap = getattr(hyperparameters, "softcap", None)
    class_weight = getattr(hyperparameters, "class_weight", None)
    if class_weight is not None:
        class_weight = class_weight.to(accumulation_dtype(dtype)).contiguous()
    return float(getattr(hyperparameters, "z_loss", 0.0)), 0.0 if softcap is None else float(softcap), class_weight


@register("linear_cross_entropy", "cpp")
class CppLinearCrossEntropy:
    """The C++ kernels; the contract is :class:`curvkern.families.LinearLossKernels`."""

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        refuse_missing_variants(hyperparameters, "cpp")
        h = hyperparameters
        return torch.ops.curvkern.linear_cross_entropy_forward(
            hidden, weight, bias, target, h.ignore_index, h.label_smoothing, N_TILE, V_TILE, *_variants(h, hidden.dtype)
        )

    @staticmethod
    def backward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        refuse_missing_variants(hyperparameters, "cpp")
        h = hyperparameters
        grad_hidden, grad_weight, grad_bias = torch.ops.curvkern.linear_cross_entropy_backward(
            hidden,
            weight,
            bias,
            target,
            lse,
            grad_scale,
            h.ignore_index,
            h.label_smoothing,
            N_TILE,
            V_TILE,
            *_variants(h, hidden.dtype),
        )
        return grad_hidden, grad_weight, _bias_or_none(grad_bias, bias)

    @staticmethod
    def hvp(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        v_hidden: torch.Tensor | None,
        v_weight: torch.Tensor | None,
        v_bias: torch.Tensor | None,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        refuse_missing_variants(hyperparameters, "cpp")
        h = hyperparameters
        grad_hidden, grad_weight, grad_bias, dot = torch.ops.curvkern.linear_cross_entropy_hvp(
            hidden,
            weight,
            bias,
            target,
            lse,
            grad_scale,
            v_hidden,
            v_weight,
            v_bias,
            h.ignore_index,
            h.label_smoothing,
            N_TILE,
            V_TILE,
            *_variants(h, hidden.dtype),
        )
        return grad_hidden, grad_weight, _bias_or_none(grad_bias, bias), dot

    @staticmethod
    def ggn_vp(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        scale: torch.Tensor,
        d_hidden: torch.Tensor,
        d_weight: torch.Tensor | None,
        d_bias: torch.Tensor | None,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        refuse_missing_variants(hyperparameters, "cpp")
        h = hyperparameters
        prod_hidden, prod_weight, prod_bias = torch.ops.curvkern.linear_ce_ggn_vp(
            hidden,
            weight,
            bias,
            target,
            scale,
            d_hidden,
            d_weight,
            d_bias,
            h.ignore_index,
            N_TILE,
            V_TILE,
            h.label_smoothing,
            *_variants(h, hidden.dtype),
        )
        return prod_hidden, prod_weight, _bias_or_none(prod_bias, bias)
