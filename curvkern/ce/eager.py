"""The eager reference of the cross-entropy kernels: plain PyTorch, the semantics every backend is
tested against (``docs/cross_entropy.md``, "The math").

Every backend exposes the same three kernels on 2-D logits (N, V) whose last dimension is dense, the
contract of :class:`curvkern.families.LossKernels` (shapes, dtypes and results are stated there), each
taking the :class:`~curvkern.hyperparameters.CrossEntropyHyperparameters` of the call:

- ``forward(logits, target, hyperparameters) -> (loss_rows, lse)``;
- ``backward(logits, target, lse, grad_scale, hyperparameters) -> grad``;
- ``hvp(logits, target, u, scale, hyperparameters, shift_period, out, out_is_callers) -> dot``;

and three for a shard of a vocabulary-parallel row (``curvkern/ce/vocab_parallel.py``):

- ``partial_stats(logits, target, u, class_offset, num_classes, hyperparameters) -> stats``;
- ``shard_backward(logits, target, lse, grad_scale, class_offset, num_classes, hyperparameters) -> grad``;
- ``shard_hvp(logits, target, u, lse, p_dot_u, scale, num_classes, hyperparameters, out)``.
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


def check_shard_inputs(
    op: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    class_offset: int,
    num_classes: int,
    rows: dict[str, torch.Tensor | None],
    per_row: dict[str, torch.Tensor],
) -> None:
    """The shard kernels' argument checks, made before any work (the C++ ops make the same ones):
    (N, V) logits with a dense last dimension, (N,) contiguous int64 targets, the shard inside
    [0, ``num_classes``), ``rows`` (N, V) in the logits' dtype with a dense last dimension, ``per_row``
    0-dim or (N,) in the accumulation dtype, everything on the logits' device. Raises ValueError."""
    n = logits.shape[0] if logits.dim() == 2 else -1
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"{op}: logits must be 2-D (N, V) with a dense last dimension, got {tuple(logits.shape)}")
    if target.dtype != torch.int64 or target.shape != (n,) or not target.is_contiguous():
        raise ValueError(
            f"{op}: target must be a contiguous int64 tensor of shape ({n},), got {target.dtype} "
            f"of shape {tuple(target.shape)}"
        )
    if not 0 <= class_offset <= class_offset + logits.shape[1] <= num_classes:
        raise ValueError(
            f"{op}: a shard of {logits.shape[1]} classes at offset {class_offset} does not fit in "
            f"num_classes={num_classes}"
        )
    acc = accumulation_dtype(logits.dtype)
    for name, tensor in rows.items():
        if tensor is not None and (
            tensor.shape != logits.shape
            or tensor.dtype != logits.dtype
            or (n and logits.shape[1] > 1 and tensor.stride(1) != 1)
        ):
            raise ValueError(
                f"{op}: {name} must be {tuple(logits.shape)} {logits.dtype} with a dense last "
                f"dimension, got {tuple(tensor.shape)} {tensor.dtype}"
            )
    for name, tensor in per_row.items():
        if tensor.dtype != acc or tensor.shape not in ((), (n,)):
            raise ValueError(f"{op}: {name} must be 0-dim or ({n},) {acc}, got {tuple(tensor.shape)} {tensor.dtype}")
    for name, tensor in {"target": target, **rows, **per_row}.items():
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, the logits on {logits.device}")


def _label_in_shard(target: torch.Tensor, valid: torch.Tensor, class_offset: int, classes: int):
    """Per row: whether its label falls in this shard's columns, and its column there (0 where not)."""
    local = target - class_offset
    here = valid & (local >= 0) & (local < classes)
    return here, torch.where(here, local, 0)


def _in_range(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return (target >= 0) & (target < num_classes)


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
        return EagerCrossEntropy.shard_backward(logits, target, lse, grad_scale, 0, logits.shape[1], hyperparameters)

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

    @staticmethod
    def partial_stats(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor | None,
        class_offset: int,
        num_classes: int,
        hyperparameters: CrossEntropyHyperparameters,
    ):
        check_shard_inputs("partial_stats", logits, target, class_offset, num_classes, {"u": u}, {})
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        z = logits.to(accumulation_dtype(logits.dtype))
        n, v = z.shape
        valid = target != ignore_index
        row_max = z.amax(dim=1) if v else z.new_full((n,), float("-inf"))
        # Shift by 0 where the shard holds only -inf (or nothing): e^{-inf} = 0 and NaN still propagates.
        e = torch.exp(z - torch.where(row_max == float("-inf"), 0.0, row_max)[:, None])
        w = z if u is None else u.to(z.dtype)
        sum_exp_u = (e * w).sum(dim=1) if u is not None else torch.zeros_like(row_max)
        here, column = _label_in_shard(target, valid, class_offset, v)
        at_label = torch.where(here, w.gather(1, column[:, None])[:, 0], 0.0) if v else torch.zeros_like(row_max)
        at_label = torch.where(_in_range(target, num_classes), at_label, float("nan"))
        total = w.sum(dim=1) if label_smoothing else torch.zeros_like(row_max)
        stats = torch.stack([row_max, e.sum(dim=1), sum_exp_u, at_label, total], dim=1)
        return torch.where(valid[:, None], stats, 0.0)

    @staticmethod
    def shard_backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        class_offset: int,
        num_classes: int,
        hyperparameters: CrossEntropyHyperparameters,
    ):
        check_shard_inputs(
            "shard_backward", logits, target, class_offset, num_classes, {}, {"lse": lse, "grad_scale": grad_scale}
        )
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        z = logits.to(lse.dtype)
        valid = target != ignore_index
        grad = torch.exp(z - lse[:, None])
        here, column = _label_in_shard(target, valid, class_offset, z.shape[1])
        if z.shape[1]:
            grad.scatter_add_(1, column[:, None], (here.to(z.dtype) * (label_smoothing - 1))[:, None])
        grad -= label_smoothing / num_classes
        grad *= _rows(grad_scale)
        grad = torch.where(_in_range(target, num_classes)[:, None], grad, float("nan"))
        return torch.where(valid[:, None], grad, 0.0).to(logits.dtype)

    @staticmethod
    def shard_hvp(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor,
        lse: torch.Tensor,
        p_dot_u: torch.Tensor,
        scale: torch.Tensor,
        num_classes: int,
        hyperparameters: CrossEntropyHyperparameters,
        out: torch.Tensor,
    ):
        check_shard_inputs(
            "shard_hvp",
            logits,
            target,
            0,
            num_classes,
            {"u": u, "out": out},
            {"lse": lse, "p_dot_u": p_dot_u, "scale": scale},
        )
        z = logits.to(lse.dtype)
        valid = target != hyperparameters.ignore_index
        hvp = torch.exp(z - lse[:, None]) * (u.to(z.dtype) - p_dot_u[:, None]) * _rows(scale)
        hvp = torch.where(_in_range(target, num_classes)[:, None], hvp, float("nan"))
        out.copy_(torch.where(valid[:, None], hvp, 0.0))
