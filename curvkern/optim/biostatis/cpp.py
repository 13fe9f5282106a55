"""BiostatisV6 on the CPU: the C++/OpenMP kernels of ``curvkern._C`` (csrc/optim/biostatis.cpp).

The eager reference's stages as two ops, so that a group is summed as a whole before any of it moves:

- ``biostatis_sums`` (pass A, one OpenMP region reading g, m, v): per tensor ``(numel, Σg², Σ|tanh g|,
  Σm'g, Σm'², Σ|m'|, Σ√v')``; their column sums over the group are its group statistics (the
  all-reduce seam for sharded training);
- ``biostatis_update_``: the scalar stage, then pass B (one region) writing m, v, the EMAs and p.

A group that mixes parameter dtypes runs one pair of calls per dtype around one shared group sum.
"""

from __future__ import annotations

import torch

from curvkern._dispatch import register
from curvkern.families import BiostatisState
from curvkern.hyperparameters import BiostatisHyperparameters
from curvkern.optim._common import by_dtype, lr_tensor
from curvkern.optim._distributed import GroupReduction
from curvkern.optim.biostatis.eager import BiostatisScalars, biostatis_step as eager_biostatis_step

_ops = torch.ops.curvkern
_SCALAR_COLUMNS = 9  # h_G, e_G, h, e, τ, I, ascent, √bc2, coef


@torch.library.register_fake("curvkern::biostatis_sums")
def _sums_fake(grads, exp_avgs, exp_avg_sqs, beta1, beta2):
    torch._check(len(grads) == len(exp_avgs) == len(exp_avg_sqs), lambda: "one exp_avg and exp_avg_sq per gradient")
    return torch.empty((len(grads), 7), dtype=torch.float64, device="cpu")


@torch.library.register_fake("curvkern::biostatis_update_")
def _update_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    memory_emas,
    steps,
    sums,
    group_sums,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    homeo_rate,
    coherence_target,
    energy_target,
    lambda_energy,
    memory_decays,
    memory_weights,
    flip_threshold,
    ascent_strength,
):
    torch._check(len(memory_decays) == len(memory_weights), lambda: "one memory weight per memory decay")
    torch._check(len(memory_emas) == len(params) * len(memory_decays), lambda: "one EMA per parameter and memory")
    return sums.new_empty((len(params), _SCALAR_COLUMNS))


@register("biostatis", "cpp")
def biostatis_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: BiostatisState,
    hyperparameters: BiostatisHyperparameters,
    reduce_partials: GroupReduction | None = None,
) -> BiostatisScalars:
    """One group's step, same contract as the eager ``biostatis_step``."""
    if not params:  # a rank holding none of the group's gradients: no kernel to run, it joins the sum
        return eager_biostatis_step(params, grads, state, hyperparameters, reduce_partials)
    exp_avgs, exp_avg_sqs, memory_emas, state_steps = state
    h = hyperparameters
    positions = list(range(len(params)))
    buckets = by_dtype(params, grads, exp_avgs, exp_avg_sqs, memory_emas, state_steps, positions)
    beta1, beta2 = h.betas
    sums = [_ops.biostatis_sums(bucket[1], bucket[2], bucket[3], beta1, beta2) for bucket in buckets]
    rows = sums[0] if len(sums) == 1 else torch.cat(sums)  # in bucket order
    if reduce_partials is None:
        group_sums = rows.sum(0)
    else:
        order = [i for bucket in buckets for i in bucket[-1]]
        in_order = rows if order == positions else torch.empty_like(rows).index_copy_(0, torch.tensor(order), rows)
        in_order, group_sums = reduce_partials.tensor_and_group_sums(in_order)
        sums = [in_order[bucket[-1]] for bucket in buckets]
    lr = lr_tensor(h.lr)
    columns = []
    for (b_params, b_grads, b_exp_avgs, b_exp_avg_sqs, b_emas, b_steps, _), b_sums in zip(buckets, sums):
        columns.append(
            _ops.biostatis_update_(
                b_params,
                b_grads,
                b_exp_avgs,
                b_exp_avg_sqs,
                [ema for emas in b_emas for ema in emas],
                b_steps,
                b_sums,
                group_sums,
                lr,
                beta1,
                beta2,
                h.eps,
                h.weight_decay,
                h.homeo_rate,
                h.coherence_target,
                h.energy_target,
                h.lambda_energy,
                list(h.memory_decays),
                list(h.memory_weights),
                h.flip_threshold,
                h.ascent_strength,
            )
        )
    if len(columns) == 1:
        table = columns[0]
    else:  # back to the parameters' order
        order = torch.tensor([i for bucket in buckets for i in bucket[-1]])
        table = torch.empty_like(torch.cat(columns)).index_copy_(0, order, torch.cat(columns))
    h_global, e_global = table[0, 0], table[0, 1]
    return BiostatisScalars(h_global, e_global, *table[:, 2:].unbind(1))
