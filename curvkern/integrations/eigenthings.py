"""``loss_of_output_fn`` objects for hessian-eigenthings' ``GGNOperator``.

:func:`hf_lm_loss_of_output` and :func:`cross_entropy_loss_of_output` take logits; :func:`hf_lm_hidden_loss_of_output`
takes the final hidden states and holds the LM head, so the (N, V) logits are never formed (see its docstring).

The logits objects take logits with the classes last, (…, T, V) or (N, V), as hessian-eigenthings passes them (not
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
from torch import nn

from curvkern._dispatch import check_fused, select
from curvkern.ce.function import FAMILY, _check_arguments, _check_not_dtensor, _cross_entropy_classes_last, _hvp_into
from curvkern.hyperparameters import CrossEntropyHyperparameters
from curvkern.linear_ce.function import linear_ce_ggn_vp, linear_cross_entropy
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


def _shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The labels shifted left, the last step ignored: position t is scored against label t + 1."""
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE_INDEX)], dim=-1)


class HFCausalLMHiddenLossOfOutput(_LossOfOutput):
    """HuggingFace causal-LM loss of the final hidden states (…, T, d) through a held LM head (V, d):
    :func:`curvkern.linear_cross_entropy`, never the (…, T, V) logits. See :func:`hf_lm_hidden_loss_of_output`."""

    def __init__(self, lm_head: nn.Module, fused: str = "auto", process_group: dist.ProcessGroup | None = None):
        super().__init__(fused, process_group)
        self.lm_head = _output_embedding(lm_head)

    def _head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Read at every call: the head's parameters may have been updated or replaced since construction.
        return self.lm_head.weight, getattr(self.lm_head, "bias", None)

    def _reduction(self) -> str:
        return "mean" if self.process_group is None else "sum"

    def _group_scale(self, shifted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.reciprocal(self._mean_count((shifted != IGNORE_INDEX).sum())).to(dtype)

    def __call__(self, hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        weight, bias = self._head()
        shifted = _shifted_labels(batch["labels"])
        loss = linear_cross_entropy(
            hidden, weight, shifted, bias, ignore_index=IGNORE_INDEX, reduction=self._reduction(), fused=self.fused
        )
        return loss if self.process_group is None else loss * self._group_scale(shifted, hidden.dtype)

    def hvp(self, output: torch.Tensor, batch: dict[str, Any], u: torch.Tensor) -> torch.Tensor:
        """Wᵀ H_z W u for the hidden states ``output`` and a tangent ``u`` of their shape: the loss's Hessian
        with respect to the hidden states (z = output·Wᵀ + b is linear in them), one ``linear_ce_ggn_vp``."""
        _check_tangent(output, u)
        weight, bias = self._head()
        shifted = _shifted_labels(batch["labels"])
        product = linear_ce_ggn_vp(
            output.detach(),
            weight.detach(),
            shifted,
            u.detach(),
            bias=None if bias is None else bias.detach(),
            ignore_index=IGNORE_INDEX,
            reduction=self._reduction(),
            fused=self.fused,
        )[0]
        return product if self.process_group is None else product * self._group_scale(shifted, output.dtype)


def _output_embedding(lm_head: nn.Module) -> nn.Module:
    """The LM head: ``lm_head`` itself, or a model's ``get_output_embeddings()``; its ``weight`` must be (V, d)."""
    if not isinstance(lm_head, nn.Module):
        raise TypeError(f"lm_head must be an nn.Module (an nn.Linear or a model), got {type(lm_head).__name__}")
    getter = getattr(lm_head, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if head is None:
            raise ValueError(f"{type(lm_head).__name__}.get_output_embeddings() returned None: no LM head")
        lm_head = head
    weight = getattr(lm_head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"the LM head {type(lm_head).__name__} must have a (V, d) weight like nn.Linear, got "
            f"{None if weight is None else tuple(getattr(weight, 'shape', ()))}"
        )
    bias = getattr(lm_head, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"the LM head's bias must be None or ({weight.shape[0]},)")
    return lm_head


def hf_lm_hidden_loss_of_output(
    lm_head: nn.Module, fused: str = "auto", *, process_group: dist.ProcessGroup | None = None
) -> HFCausalLMHiddenLossOfOutput:
    """``loss_of_output_fn`` on the final hidden states of a causal LM, holding its LM head: the GGN of the
    backbone at LM scale without the (N, V) logits.

    ``lm_head``: an ``nn.Linear``-like module (weight (V, d), optional bias (V)), or a model whose
    ``get_output_embeddings()`` returns one (a HuggingFace ``PreTrainedModel``). The head's weight and bias
    are read at every call. ``batch["labels"]`` (…, T) as in :func:`hf_lm_loss_of_output`: position t is
    scored against label t + 1, ``-100`` ignored, mean over the valid tokens.

    - **Called** with hidden states (…, T, d) (as ``GGNOperator`` passes its ``forward_fn``'s output), it
      returns the loss through :func:`curvkern.linear_cross_entropy`: the logits exist only as tiles, and the
      operator's autograd path (two ``autograd.grad`` on the loss-only graph) runs its tiled double backward.
    - **``.hvp(hidden, batch, u)``** (hessian-eigenthings 1.0.0a6's protocol) returns Wᵀ H_z W u, H_z the
      cross-entropy's Hessian in the logits: one :func:`curvkern.linear_ce_ggn_vp`, two sweeps over the
      logits tiles.

    Scope: with ``GGNOperator(model, loader, forward_fn, this)`` and a ``forward_fn`` returning the hidden
    states (e.g. :func:`hf_lm_hidden_forward`), the operator is Jᵀ Wᵀ H_z W J, J the Jacobian of the hidden
    states in the parameters: the GGN through the logits restricted to the parameters upstream of the head.
    The head's own weight and bias are not parameters of this GGN (a tangent of them does not move the
    hidden states; their rows come out zero). With tied embeddings the tied weight is seen only through its
    input-embedding use, not through the head. For the full Hessian including the head, give
    ``HessianOperator`` a loss function calling :func:`curvkern.linear_cross_entropy` with the head's
    parameters (its exact double backward; examples/lm_head_hessian.py).

    ``process_group`` as in :func:`hf_lm_loss_of_output`: the mean over the valid tokens of every rank of the
    group, for ``DDPHessianOperator``. ``fused`` chooses the backend of the ``linear_cross_entropy`` family.
    Raises TypeError or ValueError for a head without a (V, d) weight or a model without output embeddings.
    """
    return HFCausalLMHiddenLossOfOutput(lm_head, fused, process_group)


def hf_lm_hidden_forward():
    """``forward_fn`` for ``GGNOperator`` on a HuggingFace causal LM: the final hidden states (after the last
    norm), without computing any logits.

    Calls ``model(**batch_without_labels, output_hidden_states=True, logits_to_keep=<no position>)`` and
    returns ``hidden_states[-1]``; the call goes through the model itself, as hessian-eigenthings'
    functional adapter needs. The model's forward must accept a tensor ``logits_to_keep`` (transformers 5
    causal LMs; tested with GPT-2 on transformers 5.24.0); a model that computes logits anyway raises
    ValueError.
    """

    def _fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        device = next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))
        keep_none = torch.empty(0, dtype=torch.int64, device=device)
        out = model(**inputs, output_hidden_states=True, logits_to_keep=keep_none)
        logits = getattr(out, "logits", None)
        if logits is not None and logits.shape[-2] != 0:
            raise ValueError(
                f"{type(model).__name__} computed logits of shape {tuple(logits.shape)} despite logits_to_keep: "
                "pass a forward_fn returning the final hidden states instead"
            )
        return out.hidden_states[-1]

    return _fn
