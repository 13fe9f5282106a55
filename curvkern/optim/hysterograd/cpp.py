"""HysteroGrad on the CPU: the C++/OpenMP kernels of ``curvkern._C`` (csrc/optim/hysterograd.cpp).

The three stages are ops of their own, as in the eager reference: ``hysterograd_pass_a_`` (one
OpenMP region over the whole group: G updated, Σu² reduced per tensor in a fixed order),
``hysterograd_scalars_`` (clip, τ, T, E, barrier and gate) and ``hysterograd_pass_b_`` (one region,
run only when the gate is open). Their fake implementations below let ``torch.compile`` trace them.
"""

from __future__ import annotations

import torch

from curvkern._dispatch import register
from curvkern.families import HysteroGradState
from curvkern.hyperparameters import HysteroGradHyperparameters
from curvkern.optim._common import by_dtype, lr_tensor, pick
from curvkern.optim._distributed import GroupReduction

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
    reduce_partials: GroupReduction | None = None,
) -> torch.Tensor:
    """One group's step, same contract as the eager ``hysterograd_step``: returns ``[N̂, h, gate]``."""
    metrics, tau, temp, energy = state
    h = hyperparameters
    accumulator = torch.zeros((), dtype=tau.dtype)
    counted = reduce_partials.counted if reduce_partials is not None else None
    if counted is None or all(counted):
        sums_into = [(accumulator, grads, metrics)]
    else:  # shards another rank also holds: their metrics move, their Σu² goes to a scratch accumulator
        kept = [i for i, count in enumerate(counted) if count]
        left_out = [i for i, count in enumerate(counted) if not count]
        scratch = torch.zeros_like(accumulator)
        sums_into = [(accumulator, pick(grads, kept), pick(metrics, kept))]
        sums_into.append((scratch, pick(grads, left_out), pick(metrics, left_out)))
    for into, some_grads, some_metrics in sums_into:
        for bucket_grads, bucket_metrics in by_dtype(some_grads, some_metrics):
            _ops.hysterograd_pass_a_(bucket_grads, bucket_metrics, into, h.beta, h.epsilon, h.metric_scale)
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
    for bucket_params, bucket_grads, bucket_metrics in by_dtype(params, grads, metrics):
        _ops.hysterograd_pass_b_(bucket_params, bucket_grads, bucket_metrics, stats, neg_step_size, h.epsilon)
    return stats
