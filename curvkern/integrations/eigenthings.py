"""``loss_of_output_fn`` objects for hessian-eigenthings' ``GGNOperator``.

Both take logits with the classes last, (…, T, V) or (N, V), as hessian-eigenthings passes them (not
``F.cross_entropy``'s classes-in-dim-1 convention of :func:`curvkern.cross_entropy` for more than 2-D).
Calling one returns the loss through curvkern's cross-entropy kernels, so the operator's autograd path
(``autograd.grad`` twice on the loss-only graph, hessian-eigenthings 1.0.0a5) runs the fused double
backward. ``.hvp(output, batch, u)`` is the closed-form protocol of hessian-eigenthings 1.0.0a6: one HVP
kernel that reads the logits and ``u`` in place (strided rows, no ``.contiguous()`` copies), reads the
labels itself (the causal shift folded in) and writes the full-shape result, ignored rows and the last
time step as zeros.
"""

from __future__ import annotations

from typing import Any

import torch

from curvkern._dispatch import check_fused, select
from curvkern.ce.function import FAMILY, _check_arguments, _check_not_dtensor, _cross_entropy_classes_last, _hvp_into
from curvkern.hyperparameters import CrossEntropyHyperparameters

IGNORE_INDEX = -100
# What hessian-eigenthings' losses compute: the mean over the valid rows, no label smoothing.
_HYPERPARAMETERS = CrossEntropyHyperparameters(ignore_index=IGNORE_INDEX, reduction="mean")


class _LossOfOutput:
    def __init__(self, fused: str) -> None:
        self.fused = check_fused(fused)

    def _kernels(self, device: torch.device):
        return select(FAMILY, self.fused, device)[1]


class HFCausalLMLossOfOutput(_LossOfOutput):
    """HuggingFace causal-LM loss: logits (…, T, V), ``batch["labels"]`` (…, T); row t predicts label t+1,
    ``-100`` ignored, mean over the valid tokens."""

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        # The labels shifted left with the last step ignored: the logits are used unsliced, as
        # (…, T, V) rows, so no (N, V) copy is made and the last step's gradient is written as zeros.
        shifted = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE_INDEX)], dim=-1)
        return _cross_entropy_classes_last(
            logits, shifted, ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0, fused=self.fused
        )

    def hvp(self, output: torch.Tensor, batch: dict[str, Any], u: torch.Tensor) -> torch.Tensor:
        labels = batch["labels"]
        _check_arguments(output, labels, "mean", IGNORE_INDEX)
        _check_tangent(output, u)
        valid_count = (labels[..., 1:] != IGNORE_INDEX).sum()
        return _hvp_into(
            self._kernels(output.device),
            output,
            labels.reshape(-1).contiguous(),
            u,
            _HYPERPARAMETERS,
            None,
            shift_period=labels.shape[-1],
            valid_count=valid_count,
        )


class CrossEntropyLossOfOutput(_LossOfOutput):
    """Plain cross-entropy: logits (N, V) (or (…, V), classes last) and an ``(x, y)`` batch, mean over valid rows."""

    def __call__(self, logits: torch.Tensor, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        return _cross_entropy_classes_last(
            logits, batch[1], ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0, fused=self.fused
        )

    def hvp(self, output: torch.Tensor, batch: tuple[Any, torch.Tensor], u: torch.Tensor) -> torch.Tensor:
        target = batch[1]
        _check_arguments(output, target, "mean", IGNORE_INDEX)
        _check_tangent(output, u)
        return _hvp_into(
            self._kernels(output.device),
            output,
            target.reshape(-1).contiguous(),
            u,
            _HYPERPARAMETERS,
            None,
            shift_period=0,
            valid_count=None,
        )


def _check_tangent(output: torch.Tensor, u: torch.Tensor) -> None:
    _check_not_dtensor(u=u)
    if u.shape != output.shape or u.device != output.device:
        raise ValueError(
            f"u of shape {tuple(u.shape)} on {u.device} for output {tuple(output.shape)} on {output.device}"
        )
    if u.dtype != output.dtype:
        raise ValueError(f"u ({u.dtype}) must have the output's dtype ({output.dtype})")


def hf_lm_loss_of_output(fused: str = "auto") -> HFCausalLMLossOfOutput:
    """Drop-in for ``hessian_eigenthings.hf_lm_loss_of_output()`` with curvkern's kernels and ``.hvp``."""
    return HFCausalLMLossOfOutput(fused)


def cross_entropy_loss_of_output(fused: str = "auto") -> CrossEntropyLossOfOutput:
    """``loss_of_output_fn`` for (N, V) logits and ``(x, y)`` batches, with ``.hvp``."""
    return CrossEntropyLossOfOutput(fused)
