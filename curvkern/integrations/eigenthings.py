"""``loss_of_output_fn`` objects for hessian-eigenthings' ``GGNOperator``.

Both take logits with the classes last, (…, T, V) or (N, V), as hessian-eigenthings passes them (not
``F.cross_entropy``'s classes-in-dim-1 convention of :func:`curvkern.cross_entropy` for more than 2-D).
Calling one returns the loss through curvkern's cross-entropy kernels, so the operator's autograd path
(``autograd.grad`` twice on the loss-only graph, hessian-eigenthings 1.0.0a5) runs the fused double
backward. ``.hvp(output, batch, u)`` is the closed-form protocol of hessian-eigenthings 1.0.0a6: one HVP
kernel that reads the logits and ``u`` in place (strided rows, no ``.contiguous()`` copies), reads the
labels itself (the causal shift folded in) and writes the full-shape result, ignored rows and the last
time step as zeros.

Data parallelism: hessian-eigenthings' ``DDPHessianOperator`` averages the ranks' HVPs, so with each rank's
loss a mean over its own valid tokens it computes the mean of per-rank means, which is not the Hessian of
the whole batch when the ranks hold different numbers of valid tokens. Built with ``process_group=`` (a
``torch.distributed`` group, e.g. ``dist.group.WORLD``), a loss object takes the mean over the valid tokens
of every rank of that group instead: the loss and ``.hvp`` are the local sums times world_size / (valid
tokens in the group), the count summed with one ``all_reduce`` per call, so the operator's average over the
ranks is the single-process mean over their union. Every rank must then call the loss object (or
``.hvp``) the same number of times, as the operator does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from curvkern._dispatch import check_fused, select
from curvkern.ce.function import FAMILY, _check_arguments, _check_not_dtensor, _cross_entropy_classes_last, _hvp_into
from curvkern.hyperparameters import CrossEntropyHyperparameters
from curvkern.optim._distributed import check_process_group

IGNORE_INDEX = -100
# What hessian-eigenthings' losses compute: the mean over the valid rows, no label smoothing.
_HYPERPARAMETERS = CrossEntropyHyperparameters(ignore_index=IGNORE_INDEX, reduction="mean")


class _LossOfOutput:
    def __init__(self, fused: str = "auto", process_group: dist.ProcessGroup | None = None) -> None:
        self.fused = check_fused(fused)
        check_process_group(process_group, type(self).__name__)
        self.process_group = process_group

    def _kernels(self, device: torch.device):
        return select(FAMILY, self.fused, device)[1]

    def _mean_count(self, valid_count: torch.Tensor) -> torch.Tensor:
        """What the mean divides by: this rank's valid tokens, or with ``process_group`` the group's valid
        tokens over its world size (so the ranks' average of the results is the mean over all of them)."""
        if self.process_group is None:
            return valid_count
        total = valid_count.to(torch.int64).clone()
        dist.all_reduce(total, group=self.process_group)
        return total.double() / dist.get_world_size(self.process_group)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, valid_count: torch.Tensor) -> torch.Tensor:
        local = self.process_group is None
        loss = _cross_entropy_classes_last(
            logits,
            target,
            ignore_index=IGNORE_INDEX,
            reduction="mean" if local else "sum",
            label_smoothing=0.0,
            fused=self.fused,
        )
        return loss if local else loss * torch.reciprocal(self._mean_count(valid_count)).to(logits.dtype)


class HFCausalLMLossOfOutput(_LossOfOutput):
    """HuggingFace causal-LM loss: logits (…, T, V), ``batch["labels"]`` (…, T); row t predicts label t+1,
    ``-100`` ignored, mean over the valid tokens."""

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        # The labels shifted left with the last step ignored: the logits are used unsliced, as
        # (…, T, V) rows, so no (N, V) copy is made and the last step's gradient is written as zeros.
        shifted = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE_INDEX)], dim=-1)
        return self._loss(logits, shifted, (shifted != IGNORE_INDEX).sum())

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
            valid_count=self._mean_count(valid_count),
        )


class CrossEntropyLossOfOutput(_LossOfOutput):
    """Plain cross-entropy: logits (N, V) (or (…, V), classes last) and an ``(x, y)`` batch, mean over valid rows."""

    def __call__(self, logits: torch.Tensor, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        return self._loss(logits, batch[1], (batch[1] != IGNORE_INDEX).sum())

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
            valid_count=None if self.process_group is None else self._mean_count((target != IGNORE_INDEX).sum()),
        )


def _check_tangent(output: torch.Tensor, u: torch.Tensor) -> None:
    _check_not_dtensor(u=u)
    if u.shape != output.shape or u.device != output.device:
        raise ValueError(
            f"u of shape {tuple(u.shape)} on {u.device} for output {tuple(output.shape)} on {output.device}"
        )
    if u.dtype != output.dtype:
        raise ValueError(f"u ({u.dtype}) must have the output's dtype ({output.dtype})")


def hf_lm_loss_of_output(
    fused: str = "auto", *, process_group: dist.ProcessGroup | None = None
) -> HFCausalLMLossOfOutput:
    """Drop-in for ``hessian_eigenthings.hf_lm_loss_of_output()`` with curvkern's kernels and ``.hvp``.

    ``process_group``: None (default) takes the mean over this process's valid tokens; a group takes it over
    the valid tokens of all its ranks, for ``DDPHessianOperator`` (see the module docstring). Build it after
    ``init_process_group``: before, ``dist.group.WORLD`` is None. Raises TypeError for anything but a
    ``ProcessGroup`` or None, RuntimeError for a group whose default group was destroyed.
    """
    return HFCausalLMLossOfOutput(fused, process_group)


def cross_entropy_loss_of_output(
    fused: str = "auto", *, process_group: dist.ProcessGroup | None = None
) -> CrossEntropyLossOfOutput:
    """``loss_of_output_fn`` for (N, V) logits and ``(x, y)`` batches, with ``.hvp``; ``process_group`` as
    in :func:`hf_lm_loss_of_output`."""
    return CrossEntropyLossOfOutput(fused, process_group)
