"""``cross_entropy`` and ``ce_hvp``: argument checks, the reduction scale on the device, and the two
autograd functions whose forward and backward are each one kernel of the selected backend.

``_CrossEntropy`` saves the logits and the per-row log-sum-exp only. Its backward is
``_CrossEntropyBackward``, itself an autograd function whose backward is the fused Hessian-vector
product: double backward never materialises a softmax of shape (N, V), and also returns the
gradient with respect to the loss's incoming gradient (docs/cross_entropy.md, "Double backward").
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from curvkern._dispatch import select
from curvkern.ce.eager import accumulation_dtype

FAMILY = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_arguments(logits: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction; expected one of {REDUCTIONS}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"curvkern.cross_entropy: logits must be one of {LOGIT_DTYPES}, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("curvkern.cross_entropy: logits must have a class dimension (the last one)")
    if target.dtype != torch.int64:
        raise RuntimeError(f"expected target dtype to be Long (class indices), got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"Expected target size {tuple(logits.shape[:-1])} for logits of shape {tuple(logits.shape)} "
            f"(classes last), got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise RuntimeError(f"logits on {logits.device} and target on {target.device}: expected one device")
    if logits.shape[-1] == 0 and target.numel() > 0:
        raise ValueError("curvkern.cross_entropy: logits have no classes (V = 0)")
    _check_target_range(target, logits.shape[-1], ignore_index)


def _check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Targets outside [0, V) other than ``ignore_index`` raise like PyTorch's, on CPU tensors.

    On a GPU the check would cost a host sync on every call; there the kernels write NaN for the
    row instead (the Triton kernel also asserts when TRITON_DEBUG is set), so a bad label is never
    a silent wrong number.
    """
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        raise IndexError(f"Target {target[bad][0].item()} is out of bounds.")


def _row_shape(tensor: torch.Tensor) -> tuple[int, int]:
    return math.prod(tensor.shape[:-1]), tensor.shape[-1]


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(…, V) as (N, V) with a dense last dimension and any row stride: a view where one exists."""
    rows = tensor.reshape(_row_shape(tensor))
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else rows.contiguous()


def _writable_rows(tensor: torch.Tensor) -> torch.Tensor | None:
    """(…, V) as an (N, V) view with a dense last dimension, or None where no such view exists."""
    try:
        rows = tensor.view(_row_shape(tensor))
    except RuntimeError:
        return None
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else None


def _mean_scale(valid_count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / n with n counted exactly (int64) on the device; n = 0 gives inf, so the loss is 0/0 = NaN."""
    return torch.reciprocal(valid_count.to(dtype))


def _reduction_scale(target: torch.Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "mean":
        return _mean_scale((target != ignore_index).sum(), dtype)
    return torch.ones((), dtype=dtype, device=target.device)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, kernels, ignore_index, label_smoothing, reduction):
        loss_rows, lse = kernels.forward(logits, target, ignore_index, label_smoothing)
        scale = _reduction_scale(target, ignore_index, reduction, lse.dtype)
        ctx.save_for_backward(logits, target, lse, scale)
        ctx.config = (kernels, ignore_index, label_smoothing, reduction)
        if reduction == "none":
            return loss_rows.to(logits.dtype)
        return (loss_rows.sum() * scale).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse, scale = ctx.saved_tensors
        grad_logits = _CrossEntropyBackward.apply(logits, grad_loss, target, lse, scale, *ctx.config)
        return grad_logits, None, None, None, None, None


class _CrossEntropyBackward(torch.autograd.Function):
    """grad_logits = grad_loss · c_r (p_r − q_r); its own backward is the fused HVP kernel."""

    @staticmethod
    def forward(ctx, logits, grad_loss, target, lse, scale, kernels, ignore_index, label_smoothing, reduction):
        grad_scale = grad_loss.to(scale.dtype) * scale
        ctx.save_for_backward(logits, target, grad_scale, scale)
        ctx.config = (kernels, ignore_index, label_smoothing, reduction, grad_loss.dtype)
        return kernels.backward(logits, target, lse, grad_scale, ignore_index, label_smoothing)

    @staticmethod
    @once_differentiable
    def backward(ctx, u):
        logits, target, grad_scale, scale = ctx.saved_tensors
        kernels, ignore_index, label_smoothing, reduction, grad_loss_dtype = ctx.config
        hvp = torch.empty_like(logits, memory_format=torch.contiguous_format)
        dot = kernels.hvp(logits, target, _as_rows(u.to(logits.dtype)), grad_scale, ignore_index,
                          label_smoothing, 0, hvp)
        # d/d(grad_loss) of ⟨u, grad_loss · c (p − q)⟩ = c ⟨u, p − q⟩, per row for reduction="none".
        grad_grad_loss = dot * scale if reduction == "none" else dot.sum() * scale
        return hvp, grad_grad_loss.to(grad_loss_dtype), None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    fused: str = "auto",
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` on (…, V) logits (classes last) and (…) int64 targets.

    Differentiable twice: the backward is one kernel, and the backward of the backward one fused
    Hessian-vector-product kernel. ``fused`` picks the backend (see :mod:`curvkern._dispatch`).
    """
    _check_arguments(logits, target, reduction, ignore_index)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    _, kernels = select(FAMILY, fused, logits.device)
    rows = _as_rows(logits)
    loss = _CrossEntropy.apply(rows, target.reshape(-1).contiguous(), kernels, int(ignore_index), float(label_smoothing), reduction)
    return loss.view(target.shape) if reduction == "none" else loss


def ce_hvp(
    logits: torch.Tensor,
    target: torch.Tensor,
    u: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    out: torch.Tensor | None = None,
    fused: str = "auto",
) -> torch.Tensor:
    """The Hessian of the cross-entropy loss with respect to the logits, times ``u``: one kernel.

    ``(H u)_r = c_r (p_r ⊙ u_r − p_r ⟨p_r, u_r⟩)`` with ``c_r`` the reduction's weight of row r
    (1/n for ``mean``, 1 for ``sum`` and ``none``, 0 on ignored rows). Label smoothing does not enter
    the Hessian. The result has the logits' shape and dtype (fp32 accumulation) and is written into
    ``out`` when given. Not differentiable.
    """
    _check_arguments(logits, target, reduction, ignore_index)
    if u.shape != logits.shape or u.dtype != logits.dtype or u.device != logits.device:
        raise ValueError(
            f"u must match the logits' shape, dtype and device: got {tuple(u.shape)} {u.dtype} on {u.device} "
            f"for logits {tuple(logits.shape)} {logits.dtype} on {logits.device}"
        )
    _, kernels = select(FAMILY, fused, logits.device)
    return _hvp_into(kernels, logits, target.reshape(-1).contiguous(), u, ignore_index, reduction, out, shift_period=0,
                     valid_count=None)


def _hvp_into(kernels, logits, flat_target, u, ignore_index, reduction, out, shift_period, valid_count):
    """Run the HVP kernel on (…, V) tensors, writing into ``out`` (allocated when None) without copies
    where the rows are already strided views; returns ``out``."""
    out_given = out is not None
    if not out_given:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(f"out must match the logits' shape, dtype and device, got {tuple(out.shape)} {out.dtype}")
    acc = accumulation_dtype(logits.dtype)
    if reduction == "mean" and valid_count is not None:  # the caller counted (the causal shift)
        scale = _mean_scale(valid_count, acc)
    else:
        scale = _reduction_scale(flat_target, ignore_index, reduction, acc)
    out_rows = _writable_rows(out)
    out_is_callers = out_given and out_rows is not None
    with torch.no_grad():
        result_rows = out_rows if out_rows is not None else torch.empty(_row_shape(out), dtype=out.dtype, device=out.device)
        kernels.hvp(_as_rows(logits), flat_target, _as_rows(u), scale, int(ignore_index), 0.0, shift_period,
                    result_rows, out_is_callers)
        if out_rows is None:  # an ``out`` no (N, V) view can write, e.g. a transposed one
            out.copy_(result_rows.view(out.shape))
    return out
