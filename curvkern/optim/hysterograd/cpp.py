"""HysteroGrad on the CPU: the C++/OpenMP kernels of ``curvkern._C`` (csrc/optim/hysterograd.cpp).

The three stages are ops of their own, as in the eager reference: ``hysterograd_pass_a_`` (one
OpenMP region over the whole group: G updated, Σu² reduced per tensor in a fixed order),
``hysterograd_scalars_`` (clip, τ, T, E, barrier and gate) and ``hysterograd_pass_b_`` (one region,
run only when the gate is open). Their fake implementations below let ``torch.compile`` trace them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from curvkern._dispatch import register
from curvkern.families import HysteroGradState
from curvkern.hyperparameters import HysteroGradHyperparameters
from curvkern.optim._common import by_dtype, lr_tensor

_ops = torch.ops.curvkern


@torch.library.register_fake("curvkern::hysterograd_pass_a_")
def _pass_a_fake(grads, metrics, accumulator, beta, epsilon, metric_scale):
    torch._check(len(grads) == len(metrics), lambda: "one metric per gradient")


@torch.library.register_fake("curvkern::hysterograd_scalars_")
def _scalars_fake(
    accumulator,
    tau,
    temp,
    energy,
    lr,
    stiffening_factor,
    beta,
    cooling_rate,
    adaptive_threshold,
    grad_clip,
    hysteresis_scale,
):
    return accumulator.new_empty(3), accumulator.new_empty((), dtype=torch.float64)


@torch.library.register_fake("curvkern::hysterograd_pass_b_")
def _pass_b_fake(params, grads, metrics, stats, neg_step_size, epsilon):
    torch._check(len(params) == len(grads) == len(metrics), lambda: "one gradient and one metric per parameter")


@register("hysterograd", "cpp")
def hysterograd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: HysteroGradState,
    hyperparameters: HysteroGradHyperparameters,
    reduce_partials: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One group's step, same contract as the eager ``hysterograd_step``: returns ``[N̂, h, gate]``."""
    metrics, tau, temp, energy = state
    h = hyperparameters
    accumulator = torch.zeros((), dtype=tau.dtype)
    buckets = by_dtype(params, grads, metrics)
    for _, bucket_grads, bucket_metrics in buckets:
        _ops.hysterograd_pass_a_(bucket_grads, bucket_metrics, accumulator, h.beta, h.epsilon, h.metric_scale)
    if reduce_partials is not None:
        accumulator = reduce_partials(accumulator)
    stats, neg_step_size = _ops.hysterograd_scalars_(
        accumulator,
        tau,
        temp,
        energy,
        lr_tensor(h.lr),
        h.stiffening_factor,
        h.beta,
        h.cooling_rate,
        h.adaptive_threshold,
        h.grad_clip,
        h.hysteresis_scale,
    )
    for bucket_params, bucket_grads, bucket_metrics in buckets:
        _ops.hysterograd_pass_b_(bucket_params, bucket_grads, bucket_metrics, stats, neg_step_size, h.epsilon)
    return stats
