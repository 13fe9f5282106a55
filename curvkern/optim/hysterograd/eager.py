"""HysteroGrad's eager reference: the functional step every backend is tested against.

Follows ``docs/hysterograd.md`` ("The algorithm") operation by operation, in three separately callable
stages ("The fused kernels"): pass A updates the metric and reduces Σu² over the group, the scalar stage advances
τ, T, E and decides the gate, pass B moves the parameters. Everything stays on the device: the
gate is a 0-dim bool tensor and pass B selects with it, so a NaN step is never written (G10).

Rounding contract the fused kernels mirror:
- pass A, per tensor: ``G ← G·β + ((1−β)·s)·g²``; ``u = g / (√G + ε)``; the per-tensor Σu² is
  taken in the state dtype, then added, tensor by tensor in group order, into the group
  accumulator kept in the group scalars' dtype (torch's default dtype, fp32, as in the original);
- scalar stage in the group scalars' dtype;
- pass B: ``p ← p + u·(−η·k)`` where the gate is open (``−η·k`` is a Python float without
  clipping, a 0-dim fp64 tensor with it, holding the fp32 product −η·k where the clip bites).
lr may be a 0-dim tensor (on the device, for CUDA graphs): it then acts as the float it holds,
converted wherever the float would be, so both give the same bits.
bf16/fp16 parameters keep G in fp32 and do all of this in fp32, then round p to nearest even.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curvkern._dispatch import register
from curvkern.families import HysteroGradState
from curvkern.hyperparameters import HysteroGradHyperparameters
from curvkern.optim._common import lr_as, updated_in_math_dtype
from curvkern.optim._distributed import GroupReduction

# Constants of the scalar stage; csrc/optim/hysterograd.cpp has them too, as kClipEps and kEnergyEps
# (tests/test_cpp_constants.py checks that they agree).
CLIP_EPS = 1e-6  # k = min(1, C / (N + CLIP_EPS))
ENERGY_EPS = 1e-8  # h = κ·√τ·(1 − clamp(T, 0, 1))·hs·(E + ENERGY_EPS) with adaptive_threshold


def hysterograd_pass_a(
    grads: list[torch.Tensor],
    metrics: list[torch.Tensor],
    accumulator: torch.Tensor,
    *,
    beta: float,
    epsilon: float,
    metric_scale: float,
    counted: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """Update each metric G in place, add Σu² of the group into ``accumulator``; return the u.

    ``counted`` (per tensor, default all): whose Σu² enters the accumulator; a DTensor's shard that another rank
    also holds is left out (:class:`~curvkern.optim._distributed.ShardReduction`)."""
    steps = []
    for index, (grad, metric) in enumerate(zip(grads, metrics)):
        grad = grad.to(metric.dtype)
        metric.mul_(beta).addcmul_(grad, grad, value=(1 - beta) * metric_scale)
        step = grad / (metric.sqrt() + epsilon)
        if counted is None or counted[index]:
            accumulator += step.pow(2).sum()
        steps.append(step)
    return steps


def hysterograd_scalars(
    accumulator: torch.Tensor,
    tau: torch.Tensor,
    temp: torch.Tensor,
    energy: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    stiffening_factor: float,
    beta: float,
    cooling_rate: float,
    adaptive_threshold: bool,
    grad_clip: float | None,
    hysteresis_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | float]:
    """Advance τ, T, E in place from the group's Σu²; return (N̂, h, gate, −η·k)."""
    norm = accumulator.sqrt()
    if grad_clip:
        ratio = grad_clip / (norm + CLIP_EPS)
        clipped = ratio < 1.0
        # min(1, C/(N+CLIP_EPS)) as the original writes it: a NaN ratio gives 1, not NaN.
        clip_scale = torch.where(clipped, ratio, torch.ones_like(ratio))
        # −η·k as the original forms it: an fp32 product where the clip bites, the double −η elsewhere.
        neg_step_size = torch.where(clipped, (-lr_as(lr, ratio.dtype) * ratio).double(), -lr_as(lr, torch.float64))
    else:
        clip_scale = 1.0
        neg_step_size = -lr_as(lr, torch.float64)
    g_norm = norm * clip_scale
    tau.add_(lr_as(lr, g_norm.dtype) * g_norm)
    temp.mul_(cooling_rate)
    energy.copy_(beta * energy + (1 - beta) * g_norm)
    cold_factor = 1 - torch.clamp(temp, 0, 1)
    barrier = stiffening_factor * torch.sqrt(tau) * cold_factor * hysteresis_scale
    if adaptive_threshold:
        barrier = barrier * (energy + ENERGY_EPS)
    return g_norm, barrier, g_norm > barrier, neg_step_size


def hysterograd_pass_b(
    params: list[torch.Tensor],
    steps: list[torch.Tensor],
    liquid: torch.Tensor,
    neg_step_size: torch.Tensor | float,
) -> None:
    """Apply ``p ← p + u·(−η·k)`` where ``liquid``; a select, so NaN in u never reaches p."""
    for param, step in zip(params, steps):
        delta = torch.where(liquid, step, torch.zeros_like(step)).mul_(neg_step_size)
        with updated_in_math_dtype(param) as target:
            target.add_(delta)


@register("hysterograd", "eager")
def hysterograd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: HysteroGradState,
    hyperparameters: HysteroGradHyperparameters,
    reduce_partials: GroupReduction | None = None,
) -> torch.Tensor:
    """One group's step (the contract: :class:`curvkern.families.OptimizerStep`). Returns ``[N̂, h, gate]``
    as one device tensor in the group scalars' dtype."""
    metrics, tau, temp, energy = state
    h = hyperparameters
    accumulator = torch.zeros((), dtype=tau.dtype, device=tau.device)
    counted = reduce_partials.counted if reduce_partials is not None else None
    steps = hysterograd_pass_a(
        grads, metrics, accumulator, beta=h.beta, epsilon=h.epsilon, metric_scale=h.metric_scale, counted=counted
    )
    if reduce_partials is not None:
        accumulator = reduce_partials(accumulator)
    g_norm, barrier, liquid, neg_step_size = hysterograd_scalars(
        accumulator,
        tau,
        temp,
        energy,
        lr=h.lr,
        stiffening_factor=h.stiffening_factor,
        beta=h.beta,
        cooling_rate=h.cooling_rate,
        adaptive_threshold=h.adaptive_threshold,
        grad_clip=h.grad_clip,
        hysteresis_scale=h.hysteresis_scale,
    )
    hysterograd_pass_b(params, steps, liquid, neg_step_size)
    return torch.stack([g_norm, barrier, liquid.to(g_norm.dtype)])
