"""The eager reference of the cross-entropy kernels: plain PyTorch, the semantics every backend is
tested against (``docs/cross_entropy.md``, "The math").

Every backend exposes the same three kernels on 2-D logits (N, V) whose last dimension is dense:

- ``forward(logits, target, ignore_index, label_smoothing) -> (loss_rows, lse)``: per-row loss ℓ_r
  (0 on ignored rows) and log-sum-exp, both in the accumulation dtype;
- ``backward(logits, target, lse, grad_scale, ignore_index, label_smoothing) -> grad``:
  ``grad_scale_r · (p_r − q_r)`` in the logits' dtype, exactly 0 on ignored rows;
- ``hvp(logits, target, u, scale, ignore_index, label_smoothing, shift_period, out, out_is_callers) -> dot``: writes
  ``scale_r · (p_r ⊙ u_r − p_r ⟨p_r, u_r⟩)`` into ``out`` (exactly 0 on ignored rows) and returns
  ``dot_r = ⟨u_r, p_r − q_r⟩`` (0 on ignored rows), what the gradient of the loss's incoming
  gradient needs.

``grad_scale`` and ``scale`` are 0-dim or (N,) tensors on the logits' device in the accumulation
dtype (fp64 for fp64 logits, fp32 otherwise), so no kernel reads a number back to the host.
``out_is_callers`` says ``out`` is a buffer the caller passed in rather than one just allocated (the C++
kernel then writes large fp32 results with streaming stores). ``shift_period`` T > 0 is the causal-LM shift: row r takes its label from ``target[r + 1]`` and is
ignored when ``(r + 1) % T == 0`` (the last time step); 0 means row r takes ``target[r]``.
"""
from __future__ import annotations

import torch

from curvkern._dispatch import register


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
    @staticmethod
    def forward(logits, target, ignore_index, label_smoothing):
        z = logits.to(accumulation_dtype(logits.dtype))
        valid = target != ignore_index
        lse = torch.logsumexp(z, dim=1)
        z_target = z.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
        loss = lse - (1 - label_smoothing) * z_target
        if label_smoothing:
            loss = loss - label_smoothing * z.mean(dim=1)
        return torch.where(valid, loss, 0.0), lse

    @staticmethod
    def backward(logits, target, lse, grad_scale, ignore_index, label_smoothing):
        z = logits.to(lse.dtype)
        valid = target != ignore_index
        grad = torch.exp(z - lse[:, None])
        grad.scatter_add_(1, torch.where(valid, target, 0)[:, None],
                          torch.full((z.shape[0], 1), label_smoothing - 1, dtype=z.dtype, device=z.device))
        grad -= label_smoothing / z.shape[1]
        grad *= _rows(grad_scale)
        return torch.where(valid[:, None], grad, 0.0).to(logits.dtype)

    @staticmethod
    def hvp(logits, target, u, scale, ignore_index, label_smoothing, shift_period, out, out_is_callers=False):
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
