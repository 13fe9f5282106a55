"""The C++/OpenMP cross-entropy kernels of ``curvkern._C`` (``csrc/ce/cross_entropy.cpp``): thin wrappers
with the eager reference's signatures (:mod:`curvkern.ce.eager`), and the ops' fake implementations so
``torch.compile`` can trace them."""

from __future__ import annotations

import torch

from curvkern._dispatch import cpp_unavailable_reason, register
from curvkern.ce.eager import accumulation_dtype, is_soft, refuse_variants
from curvkern.hyperparameters import CrossEntropyLossHyperparameters


def _check_fake_target(logits, target):
    """The ops' target: (N,) int64 class indices or (N, V) probabilities of the logits' shape and dtype."""
    if target.is_floating_point():
        torch._check(
            target.shape == logits.shape and target.dtype == logits.dtype,
            lambda: "probability targets must have the logits' shape and dtype",
        )
    else:
        torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0], lambda: "target must be (N,)")


if cpp_unavailable_reason() is None:

    @torch.library.register_fake("curvkern::cross_entropy_forward")
    def _forward_fake(logits, target, ignore_index, label_smoothing, z_loss=0.0, softcap=0.0, weight=None):
        _check_fake_target(logits, target)
        row = logits.new_empty(logits.shape[0], dtype=accumulation_dtype(logits.dtype))
        return row, torch.empty_like(row)

    @torch.library.register_fake("curvkern::cross_entropy_backward")
    def _backward_fake(
        logits, target, lse, grad_scale, ignore_index, label_smoothing, z_loss=0.0, softcap=0.0, weight=None
    ):
        _check_fake_target(logits, target)
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("curvkern::cross_entropy_hvp_")
    def _hvp_fake(
        logits,
        target,
        u,
        scale,
        ignore_index,
        label_smoothing,
        shift_period,
        stream_out,
        out,
        z_loss=0.0,
        softcap=0.0,
        weight=None,
    ):
        _check_fake_target(logits, target)
        torch._check(not (shift_period and target.is_floating_point()), lambda: "the causal shift takes class indices")
        torch._check(
            u.shape[-2:] == logits.shape and u.dim() in (2, 3) and out.shape == u.shape,
            lambda: "u and out must be (N, V) or (K, N, V) for (N, V) logits",
        )
        return logits.new_empty(u.shape[:-1], dtype=accumulation_dtype(logits.dtype))

    @torch.library.register_fake("curvkern::cross_entropy_partial_stats")
    def _partial_stats_fake(logits, target, u, ignore_index, label_smoothing, class_offset, num_classes):
        return logits.new_empty((logits.shape[0], 5), dtype=accumulation_dtype(logits.dtype))

    @torch.library.register_fake("curvkern::cross_entropy_shard_backward")
    def _shard_backward_fake(logits, target, lse, grad_scale, ignore_index, label_smoothing, class_offset, num_classes):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("curvkern::cross_entropy_shard_hvp_")
    def _shard_hvp_fake(logits, target, u, lse, p_dot_u, scale, ignore_index, num_classes, out):
        torch._check(u.shape == logits.shape and out.shape == logits.shape, lambda: "u and out must match the logits")


def _variants(h: CrossEntropyLossHyperparameters) -> dict:
    """The ops' keyword arguments for the loss variants: softcap 0 means no cap."""
    return {"z_loss": h.z_loss, "softcap": 0.0 if h.softcap is None else h.softcap, "weight": h.weight}


@register("cross_entropy", "cpp")
class CppCrossEntropy:
    """The C++ kernels; the contract is :class:`curvkern.families.LossKernels`. Every loss variant is
    implemented; the target is (N,) int64 class indices or (N, V) probabilities of the logits' dtype."""

    VARIANTS: frozenset[str] = frozenset(
        {"z_loss", "softcap", "weight", "weight with label smoothing", "probability targets"}
    )  # refuse_variants raises for any other

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, hyperparameters: CrossEntropyLossHyperparameters):
        refuse_variants("cpp", CppCrossEntropy.VARIANTS, hyperparameters, target)
        h = hyperparameters
        return torch.ops.curvkern.cross_entropy_forward(
            logits, target, h.ignore_index, h.label_smoothing, **_variants(h)
        )

    @staticmethod
    def backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        hyperparameters: CrossEntropyLossHyperparameters,
    ):
        refuse_variants("cpp", CppCrossEntropy.VARIANTS, hyperparameters, target)
        h = hyperparameters
        return torch.ops.curvkern.cross_entropy_backward(
            logits, target, lse, grad_scale, h.ignore_index, h.label_smoothing, **_variants(h)
        )

    @staticmethod
    def hvp(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor,
        scale: torch.Tensor,
        hyperparameters: CrossEntropyLossHyperparameters,
        shift_period: int,
        out: torch.Tensor,
        out_is_callers: bool = False,
    ):
        refuse_variants("cpp", CppCrossEntropy.VARIANTS, hyperparameters, target)
        if shift_period and is_soft(target):
            raise NotImplementedError("the causal shift takes class indices, not probability targets")
        h = hyperparameters
        return torch.ops.curvkern.cross_entropy_hvp_(
            logits,
            target,
            u,
            scale,
            h.ignore_index,
            h.label_smoothing,
            shift_period,
            out_is_callers,
            out,
            **_variants(h),
        )

    @staticmethod
    def partial_stats(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor | None,
        class_offset: int,
        num_classes: int,
        hyperparameters: CrossEntropyLossHyperparameters,
    ):
        h = hyperparameters
        return torch.ops.curvkern.cross_entropy_partial_stats(
            logits, target, u, h.ignore_index, h.label_smoothing, class_offset, num_classes
        )

    @staticmethod
    def shard_backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        class_offset: int,
        num_classes: int,
        hyperparameters: CrossEntropyLossHyperparameters,
    ):
        h = hyperparameters
        return torch.ops.curvkern.cross_entropy_shard_backward(
            logits, target, lse, grad_scale, h.ignore_index, h.label_smoothing, class_offset, num_classes
        )

    @staticmethod
    def shard_hvp(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor,
        lse: torch.Tensor,
        p_dot_u: torch.Tensor,
        scale: torch.Tensor,
        num_classes: int,
        hyperparameters: CrossEntropyLossHyperparameters,
        out: torch.Tensor,
    ):
        torch.ops.curvkern.cross_entropy_shard_hvp_(
            logits, target, u, lse, p_dot_u, scale, hyperparameters.ignore_index, num_classes, out
        )
