"""The eager reference of the cross-entropy kernels: plain PyTorch, the semantics every backend is
tested against (``docs/cross_entropy.md``, "The math").

Every backend exposes the same three kernels on 2-D logits (N, V) whose last dimension is dense, the
contract of :class:`curvkern.families.LossKernels` (shapes, dtypes and results are stated there), each
taking the :class:`~curvkern.hyperparameters.CrossEntropyHyperparameters` of the call:

- ``forward(logits, target, hyperparameters) -> (loss_rows, lse)``;
- ``backward(logits, target, lse, grad_scale, hyperparameters) -> grad``;
- ``hvp(logits, target, u, scale, hyperparameters, shift_period, out, out_is_callers) -> dot``.
"""

from __future__ import annotations

import torch

from curvkern._dispatch import register
from curvkern.hyperparameters import CrossEntropyHyperparameters


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def shifted_target(target: torch.Tensor, ignore_index: int, shift_period: int) -> torch.Tensor:
    """The labels row r uses: ``target`` itself, or ``target[r + 1]`` with the last time step ignored."""
    if shift_period == 0:
        return target
    shifted = torch.full_like(target, ignore_index).view(-1, shift_period)
    shifted[:, :-1] = target.view(-1, shift_period)[:, 1:]
    return shifted.view(-1)


def _rows(scale: torch.Tensor) -> torch.Tensor:
    """A 0-dim or (N,) scale, broadcastable against (N, V)."""
    return scale if scale.dim() == 0 else scale[:, None]


@register("cross_entropy", "eager")
class EagerCrossEntropy:
    """The reference kernels; the contract is :class:`curvkern.families.LossKernels`."""

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, hyperparameters: CrossEntropyHyperparameters):
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        z = logits.to(accumulation_dtype(logits.dtype))
        valid = target != ignore_index
        lse = torch.logsumexp(z, dim=1)
        z_target = z.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
        loss = lse - (1 - label_smoothing) * z_target
        if label_smoothing:
            loss = loss - label_smoothing * z.mean(dim=1)
        return torch.where(valid, loss, 0.0), lse

    @staticmethod
    def backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        hyperparameters: CrossEntropyHyperparameters,
    ):
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        z = logits.to(lse.dtype)
        valid = target != ignore_index
        grad = torch.exp(z - lse[:, None])
        grad.scatter_add_(
            1,
            torch.where(valid, target, 0)[:, None],
            torch.full((z.shape[0], 1), label_smoothing - 1, dtype=z.dtype, device=z.device),
        )
        grad -= label_smoothing / z.shape[1]
        grad *= _rows(grad_scale)
        return torch.where(valid[:, None], grad, 0.0).to(logits.dtype)

    @staticmethod
    def hvp(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor,
        scale: torch.Tensor,
        hyperparameters: CrossEntropyHyperparameters,
        shift_period: int,
        out: torch.Tensor,
        out_is_callers: bool = False,
    ):
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        target = shifted_target(target, ignore_index, shift_period)
        z = logits.to(accumulation_dtype(logits.dtype))
        u = u.to(z.dtype)
        valid = target != ignore_index
        p = torch.softmax(z, dim=1)
        p_dot_u = (p * u).sum(dim=1)
        out.copy_(torch.where(valid[:, None], p * (u - p_dot_u[:, None]) * _rows(scale), 0.0))
        dot = p_dot_u - (1 - label_smoothing) * u.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
        if label_smoothing:
            dot = dot - label_smoothing * u.mean(dim=1)
        return torch.where(valid, dot, 0.0)
