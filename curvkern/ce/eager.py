"""The eager reference of the cross-entropy kernels: plain PyTorch, the semantics every backend is
tested against (``docs/cross_entropy.md``, "The math").

Every backend exposes the same three kernels on 2-D logits (N, V) whose last dimension is dense, the
contract of :class:`curvkern.families.LossKernels` (shapes, dtypes and results are stated there), each
taking the :class:`~curvkern.hyperparameters.CrossEntropyHyperparameters` of the call:

- ``forward(logits, target, hyperparameters) -> (loss_rows, lse)``;
- ``backward(logits, target, lse, grad_scale, hyperparameters) -> grad``;
- ``hvp(logits, target, u, scale, hyperparameters, shift_period, out, out_is_callers) -> dot`` (``u`` and
  ``out`` (N, V), or (K, N, V) for K tangents, ``dot`` then (K, N));

and three for a shard of a vocabulary-parallel row (``curvkern/ce/vocab_parallel.py``):

- ``partial_stats(logits, target, u, class_offset, num_classes, hyperparameters) -> stats``;
- ``shard_backward(logits, target, lse, grad_scale, class_offset, num_classes, hyperparameters) -> grad``;
- ``shard_hvp(logits, target, u, lse, p_dot_u, scale, num_classes, hyperparameters, out)``.
"""

from __future__ import annotations

import torch

from curvkern._dispatch import register
from curvkern.hyperparameters import CrossEntropyLossHyperparameters, loss_variants


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


def check_hvp_tangents(op: str, logits: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> int:
    """The HVP kernels' checks on ``u`` and ``out`` before any work: (N, V) like the (N, V) logits, or K
    tangents (K, N, V), in the logits' dtype and on their device, last dimension dense, ``out`` shaped like
    ``u``. Returns K (1 for (N, V)). Raises ValueError."""
    batched = u.dim() == 3 and u.shape[1:] == logits.shape
    for name, tensor in (("u", u), ("out", out)):
        if (
            (tensor.shape != logits.shape and not batched)
            or tensor.shape != u.shape
            or tensor.dtype != logits.dtype
            or tensor.device != logits.device
            or (tensor.shape[-1] > 1 and tensor.numel() and tensor.stride(-1) != 1)
        ):
            raise ValueError(
                f"{op}: {name} must be {tuple(logits.shape)} or (K, {', '.join(map(str, logits.shape))}) "
                f"{logits.dtype} on {logits.device} with a dense last dimension (out shaped like u), got "
                f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
            )
    return u.shape[0] if batched else 1


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


def is_soft(target: torch.Tensor) -> bool:
    """Whether ``target`` holds class probabilities ((N, V) floating) rather than (N,) class indices."""
    return target.is_floating_point()


def refuse_variants(
    backend: str, supported: frozenset[str], hyperparameters: CrossEntropyLossHyperparameters, target: torch.Tensor
) -> None:
    """NotImplementedError naming each loss variant of the call that ``backend`` does not implement: a backend
    never computes something else in its place."""
    missing = [name for name in loss_variants(hyperparameters, is_soft(target)) if name not in supported]
    if missing:
        raise NotImplementedError(
            f"curvkern.cross_entropy: the {backend} backend does not implement {', '.join(missing)} yet; "
            "fused='eager' does"
        )


def capped(x: torch.Tensor, softcap: float | None):
    """z = c·tanh(x/c) and its first and second derivatives dz/dx = 1 − (z/c)², d²z/dx² = −2(z/c²)·dz/dx
    (None, None without a cap: z = x)."""
    if softcap is None:
        return x, None, None
    t = torch.tanh(x / softcap)
    dz = 1 - t * t
    return softcap * t, dz, -2 / softcap * t * dz


def target_weights(z: torch.Tensor, target: torch.Tensor, h: CrossEntropyLossHyperparameters):
    """``(valid, q, W)``: which rows count, the weighted smoothed target distribution q̃ (N, V) and its row
    sums W = Σ_j q̃_j (docs/cross_entropy.md, "Loss variants"): the row's loss is W·lse − ⟨q̃, z⟩.

    Class indices: q̃ = w_y·(1 − α)·e_y + α/V·w (w = 1 without weights), 0 on ignored rows. Probabilities t:
    q̃ = w ⊙ ((1 − α)·t + α/V), every row valid."""
    n, v = z.shape
    alpha = h.label_smoothing
    if is_soft(target):
        valid = torch.ones(n, dtype=torch.bool, device=z.device)
        q = target.to(z.dtype)
        if alpha:
            q = (1 - alpha) * q + alpha / v
    else:
        valid = target != h.ignore_index
        in_range = _in_range(target, v)
        q = torch.zeros_like(z)
        if v:
            q.scatter_(1, torch.where(valid & in_range, target, 0)[:, None], 1 - alpha)
        q += alpha / v if v else 0.0
        q = torch.where(valid[:, None], q, 0.0)
        q = torch.where((valid & ~in_range)[:, None], float("nan"), q)  # a bad label: NaN, never a number
    if h.weight is not None:
        q = q * h.weight.to(z.dtype)
    return valid, q, q.sum(dim=1)


def _general_forward(logits, target, h):
    z, _, _ = capped(logits.to(accumulation_dtype(logits.dtype)), h.softcap)
    valid, q, weight_sum = target_weights(z, target, h)
    lse = torch.logsumexp(z, dim=1)
    loss = weight_sum * lse - (q * torch.where(valid[:, None], z, 0.0)).sum(dim=1)
    if h.z_loss:
        loss = loss + h.z_loss * lse * lse
    return torch.where(valid, loss, 0.0), lse


def _gradient_to_capped(z, lse, q, weight_sum, h):
    """g_z = (W + 2λ·lse)·p − q̃, the row loss's gradient to the capped logits, and a = W + 2λ·lse."""
    a = weight_sum + 2 * h.z_loss * lse if h.z_loss else weight_sum
    p = torch.exp(z - lse[:, None])
    return a[:, None] * p - q, a, p


def _general_backward(logits, target, lse, grad_scale, h):
    z, dz, _ = capped(logits.to(lse.dtype), h.softcap)
    valid, q, weight_sum = target_weights(z, target, h)
    grad, _, _ = _gradient_to_capped(z, lse, q, weight_sum, h)
    if dz is not None:
        grad = grad * dz
    grad = grad * _rows(grad_scale)
    if not is_soft(target):
        grad = torch.where(_in_range(target, z.shape[1])[:, None], grad, float("nan"))
    return torch.where(valid[:, None], grad, 0.0).to(logits.dtype)


def _general_hvp(logits, target, u, scale, h, out):
    """H u = Jᵀ H_z J u + diag(g_z ⊙ d²z/dx²) u with J = diag(dz/dx) and
    H_z v = a·p ⊙ (v − ⟨p, v⟩) + 2λ·p·⟨p, v⟩; returns ⟨u, J g_z⟩ per row."""
    z, dz, d2z = capped(logits.to(accumulation_dtype(logits.dtype)), h.softcap)
    u = u.to(z.dtype)
    valid, q, weight_sum = target_weights(z, target, h)
    lse = torch.logsumexp(z, dim=1)
    g_z, a, p = _gradient_to_capped(z, lse, q, weight_sum, h)
    v = u if dz is None else u * dz
    p_dot_v = (p * v).sum(dim=-1)
    hvp = a[:, None] * p * (v - p_dot_v[..., None])
    if h.z_loss:
        hvp = hvp + 2 * h.z_loss * p * p_dot_v[..., None]
    if dz is not None:
        hvp = hvp * dz + g_z * d2z * u
    hvp = hvp * _rows(scale)
    dot = (v * g_z).sum(dim=-1)
    if not is_soft(target):
        bad = ~_in_range(target, z.shape[1])
        hvp = torch.where(bad[:, None], float("nan"), hvp)
        dot = torch.where(bad, float("nan"), dot)
    out.copy_(torch.where(valid[:, None], hvp, 0.0))
    return torch.where(valid, dot, 0.0)


@register("cross_entropy", "eager")
class EagerCrossEntropy:
    """The reference kernels; the contract is :class:`curvkern.families.LossKernels`. Every loss variant
    (:func:`~curvkern.hyperparameters.loss_variants`) is implemented, through the general formulas of
    docs/cross_entropy.md ("Loss variants"); the default case keeps the plain formulas."""

    VARIANTS = frozenset({"z_loss", "softcap", "weight", "weight with label smoothing", "probability targets"})

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, hyperparameters: CrossEntropyLossHyperparameters):
        if loss_variants(hyperparameters, is_soft(target)):
            return _general_forward(logits, target, hyperparameters)
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
        hyperparameters: CrossEntropyLossHyperparameters,
    ):
        if loss_variants(hyperparameters, is_soft(target)):
            return _general_backward(logits, target, lse, grad_scale, hyperparameters)
        return EagerCrossEntropy.shard_backward(logits, target, lse, grad_scale, 0, logits.shape[1], hyperparameters)

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
        check_hvp_tangents("curvkern.ce eager hvp", logits, u, out)
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        if loss_variants(hyperparameters, is_soft(target)):
            if shift_period and is_soft(target):
                raise NotImplementedError("the causal shift takes class indices, not probability targets")
            target = shifted_target(target, ignore_index, shift_period)
            return _general_hvp(logits, target, u, scale, hyperparameters, out)
        target = shifted_target(target, ignore_index, shift_period)
        z = logits.to(accumulation_dtype(logits.dtype))
        u = u.to(z.dtype)
        valid = target != ignore_index
        p = torch.softmax(z, dim=1)
        p_dot_u = (p * u).sum(dim=-1)
        out.copy_(torch.where(valid[:, None], p * (u - p_dot_u[..., None]) * _rows(scale), 0.0))
        label_column = torch.where(valid, target, 0)[:, None].expand(*u.shape[:-1], 1)
        dot = p_dot_u - (1 - label_smoothing) * u.gather(-1, label_column)[..., 0]
        if label_smoothing:
            dot = dot - label_smoothing * u.mean(dim=-1)
        return torch.where(valid, dot, 0.0)

    @staticmethod
    def partial_stats(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor | None,
        class_offset: int,
        num_classes: int,
        hyperparameters: CrossEntropyLossHyperparameters,
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
        hyperparameters: CrossEntropyLossHyperparameters,
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
        hyperparameters: CrossEntropyLossHyperparameters,
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
