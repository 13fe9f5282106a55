"""BiostatisV6's eager reference: the functional step every backend is tested against.

Follows ``docs/biostatis.md`` ("The algorithm") operation by operation, cut into the three separately
callable stages it describes, so that a later distributed all-reduce can sit between pass A and the scalar
stage:

- :func:`biostatis_sums` (pass A): read-only; per tensor the six sums
  ``[Σg², Σ|tanh g|, Σm'g, Σm'², Σ|m'|, Σ√v']`` of the raw gradient and the *updated* moments
  ``m' = β1·m + (1−β1)·g``, ``v' = β2·v + (1−β2)·g²``, accumulated in the state dtype.
- :func:`biostatis_scalars`: the count-weighted group gains ``h_G, e_G`` and, per tensor, ``cos``,
  ``τ = tanh(cos)``, the importance ``I`` and its flag ``I < θ``, ``δ``, the bias corrections, the
  local gains, ``h``, ``e`` and the update coefficient ``−(lr/bc1)·h·e``. All on the device in
  float64, except ``tanh(C − c*)``, which goes through the default dtype (fp32) as in the original.
- :func:`biostatis_update` (pass B): the elementwise update writing ``m, v``, the EMAs and ``p``.

Nothing leaves the device: the original's ``if I < θ`` is an ascent coefficient
``a = [I < θ]·α_a·δ`` selected on the device, and ``ã + a·g`` equals the original's
``ã`` when the flag is off (for a non-finite g the tensor's τ is NaN, so both are NaN anyway).

Rounding contract the fused kernels mirror (elementwise math in the state dtype, every scalar
rounded from float64 to it where it meets a tensor, as torch does with the original's Python floats):

    m ← m·β1 + g·(1−β1);  v ← v·β2 + g·g·(1−β2);  ema_j ← ema_j·d_j + g·(1−d_j)
    M = Σ_j w_j·ema_j                      (from 0, in order)
    ã = g·(1 + (0.5·sign g)·τ) + a·g
    U = (m / (√v / √bc2 + ε) + 0.05·M) + 0.01·ã
    p ← p·(1 − lr·wd)  (only when wd ≠ 0);  p ← p + U·coef

lr may be a 0-dim tensor (on the device, for CUDA graphs): it then acts as the float it holds, in
float64 as the Python float would be, so both give the same bits.

Empty tensors (numel 0): they take part like any other active tensor (state, step count) but add
nothing to the sums or to the group's element count, and pass B skips them; their per-tensor means
divide by max(N, 1), so every scalar stays finite (the original gets NaN there and no effect).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from curvkern._dispatch import register
from curvkern.families import BiostatisState
from curvkern.hyperparameters import BiostatisHyperparameters
from curvkern.optim._common import lr_as, updated_in_math_dtype
from curvkern.optim._distributed import GroupReduction

# Hard-coded constants of the original (docs/biostatis.md, "Hyperparameters and constants"); csrc/optim/biostatis.cpp
# has them too, named kGlobalFactor, ... (tests/test_cpp_constants.py checks that they agree).
GLOBAL_FACTOR = 0.5  # global gains use ρ/2 and λ/2
GLOBAL_BLEND = (0.9, 0.1)  # e_G = 0.9·x + 0.1, then clamp
GLOBAL_CLAMP = (0.925, 1.075)
LOCAL_BLEND = (0.8, 0.2)
LOCAL_CLAMP = (0.85, 1.15)
ALPHA_GLOBAL = 0.3  # h = 0.3·h_G + 0.7·h_L (likewise e)
POLARITY_SCALE = 0.5
FLOW_WEIGHT = 0.05
ADAPTIVE_WEIGHT = 0.01
ASCENT_RATE = 0.02  # δ = 1 − exp(−0.02·t)
IMPORTANCE_EPS = 1e-12
COSINE_EPS = 1e-8

# Columns of the [n, 6] sums tensor.
S_GG, S_TH, S_MG, S_MM, S_AM, S_SV = range(6)
N_SUMS = 6


class BiostatisScalars(NamedTuple):
    """Output of the scalar stage: 0-dim group values and 1-dim per-tensor values, float64, on the device."""

    h_global: torch.Tensor  # 0-dim
    e_global: torch.Tensor  # 0-dim
    h: torch.Tensor  # per tensor: 0.3·h_G + 0.7·h_L
    e: torch.Tensor  # per tensor: 0.3·e_G + 0.7·e_L
    tau: torch.Tensor  # tanh(cos(m', g))
    importance: torch.Tensor  # mean|m'| / (mean √v' + 1e-12)
    ascent: torch.Tensor  # [I < θ]·α_a·δ
    sqrt_bc2: torch.Tensor  # √(1 − β2^t)
    coef: torch.Tensor  # −(lr/bc1)·h·e


def _moments(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, beta2: float):
    """m', v' out of place, with the same ops (hence the same rounding) pass B uses in place."""
    m = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    return m, v


def biostatis_sums(
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    betas: tuple[float, float],
) -> torch.Tensor:
    """Pass A: per tensor ``[Σg², Σ|tanh g|, Σm'g, Σm'², Σ|m'|, Σ√v']`` as an ``[n, 6]`` float64 tensor.

    Each sum is accumulated in the tensor's state dtype (``exp_avg.dtype``), then widened. The state
    is not written. Empty tensors give zero sums.
    """
    beta1, beta2 = betas
    if not grads:
        return torch.zeros((0, N_SUMS), dtype=torch.float64)
    rows = []
    for grad, exp_avg, exp_avg_sq in zip(grads, exp_avgs, exp_avg_sqs, strict=True):
        g = grad.to(exp_avg.dtype)
        m, v = _moments(g, exp_avg, exp_avg_sq, beta1, beta2)
        row = torch.stack(
            [
                (g * g).sum(),
                g.tanh().abs().sum(),
                (m * g).sum(),
                (m * m).sum(),
                m.abs().sum(),
                v.sqrt().sum(),
            ]
        )
        rows.append(row.to(torch.float64))
    return torch.stack(rows)


def statistics_rows(sums: torch.Tensor, numels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``[n, 7]`` float64: each tensor's element count, then its six sums (the rows C++'s pass A returns)."""
    n = torch.as_tensor(numels, dtype=torch.float64).to(sums.device, non_blocking=True)
    return torch.cat([n.reshape(-1, 1), sums.to(torch.float64)], dim=1)


def group_statistics(
    sums: torch.Tensor, numels: Sequence[int] | torch.Tensor, reduce_partials: GroupReduction | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the scalar stage reads: the per-tensor sums ``[n, 6]``, the element counts ``[n]`` and the group's
    ``[ΣN, ΣS_gg, ΣS_th, ΣS_mg, ΣS_mm, ΣS_am, ΣS_sv]`` (float64), this rank's own or summed over the ranks by
    ``reduce_partials`` (the group columns under ``process_group=``, every row for DTensor shards)."""
    rows = statistics_rows(sums, numels)
    if reduce_partials is None:
        group_sums = rows.sum(0)
    else:
        rows, group_sums = reduce_partials.tensor_and_group_sums(rows)
    return rows[:, 1:], rows[:, 0], group_sums


def _tanh_default_dtype(x: torch.Tensor) -> torch.Tensor:
    # The original builds torch.tensor(C − c*) (default dtype, fp32) for this tanh.
    return x.to(torch.get_default_dtype()).tanh().to(torch.float64)


def _clip(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    # Python's max(low, min(high, x)) and C's fmax/fmin: a NaN maps to `high`, not NaN.
    return torch.fmax(torch.fmin(x, torch.full_like(x, high)), torch.full_like(x, low))


def biostatis_scalars(
    sums: torch.Tensor,
    numels: Sequence[int] | torch.Tensor,
    steps: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    homeo_rate: float,
    coherence_target: float,
    energy_target: float,
    lambda_energy: float,
    flip_threshold: float,
    ascent_strength: float,
    group_sums: torch.Tensor | None = None,
) -> BiostatisScalars:
    """Scalar stage: gains and coefficients from pass A's sums, the element counts and the steps.

    ``sums`` is pass A's ``[n, 6]`` (for a sharded tensor: already all-reduced), ``numels`` the
    tensors' element counts, ``steps`` their (already incremented) step counts. Group means are
    count-weighted: ``E_G = ΣS_gg / ΣN``, from ``group_sums`` (:func:`group_statistics`) when given.
    """
    f64 = torch.float64
    sums = sums.to(f64)
    device = sums.device
    beta1, beta2 = betas
    # Host-built counts travel without a blocking copy (a blocking one synchronizes a CUDA stream).
    n = torch.as_tensor(numels, dtype=f64).to(device, non_blocking=True)
    t = steps.to(dtype=f64).to(device, non_blocking=True)
    gg, th, mg, mm, am, sv = sums.unbind(1)
    if group_sums is None:
        group_sums = statistics_rows(sums, n).sum(0)
    group_sums = group_sums.to(device=device, dtype=f64)

    # Global sensors and gains (per group).
    n_group = group_sums[0].clamp_min(1.0)
    energy_g = group_sums[1 + S_GG] / n_group
    coherence_g = group_sums[1 + S_TH] / n_group
    h_global = 1.0 - GLOBAL_FACTOR * homeo_rate * _tanh_default_dtype(coherence_g - coherence_target)
    e_global = 1 + GLOBAL_FACTOR * lambda_energy * (energy_target - energy_g)
    e_global = _clip(GLOBAL_BLEND[0] * e_global + GLOBAL_BLEND[1], *GLOBAL_CLAMP)

    # Local sensors and gains (per tensor).
    n_local = n.clamp_min(1.0)
    energy_l = gg / n_local
    coherence_l = th / n_local
    h_local = 1.0 - homeo_rate * _tanh_default_dtype(coherence_l - coherence_target)
    e_local = 1 + lambda_energy * (energy_target - energy_l)
    e_local = _clip(LOCAL_BLEND[0] * e_local + LOCAL_BLEND[1], *LOCAL_CLAMP)
    h = ALPHA_GLOBAL * h_global + (1 - ALPHA_GLOBAL) * h_local
    e = ALPHA_GLOBAL * e_global + (1 - ALPHA_GLOBAL) * e_local

    # Directional coherence: torch's cosine_similarity, each norm clamped at 1e-8.
    cos = mg / (mm.sqrt().clamp_min(COSINE_EPS) * gg.sqrt().clamp_min(COSINE_EPS))
    tau = cos.tanh()

    # Importance on the un-bias-corrected m', v', and the (extra descent) "ascent" coefficient.
    importance = (am / n_local) / (sv / n_local + IMPORTANCE_EPS)
    delta = 1 - torch.exp(-ASCENT_RATE * t)
    ascent = torch.where(importance < flip_threshold, ascent_strength * delta, torch.zeros_like(delta))

    bc1 = 1 - torch.pow(beta1, t)
    bc2 = 1 - torch.pow(beta2, t)
    # The original divides host doubles, lr / bc1: one correctly rounded division. A float lr meeting a
    # tensor would go through torch's __rtruediv__ (reciprocal, then product: two roundings).
    lr64 = lr_as(lr, f64)
    step_size = (lr64 if isinstance(lr64, torch.Tensor) else torch.full_like(bc1, lr64)) / bc1
    coef = -step_size * h * e
    return BiostatisScalars(h_global, e_global, h, e, tau, importance, ascent, bc2.sqrt(), coef)


def stacked_steps(state_steps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' step counts as one 1-dim tensor (empty for no tensors: a rank that only joins the sum)."""
    return torch.stack(list(state_steps)) if state_steps else torch.zeros(0, dtype=torch.float32)


def biostatis_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    memory_emas: Sequence[Sequence[torch.Tensor]],
    scalars: BiostatisScalars,
    *,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    memory_decays: Sequence[float],
    memory_weights: Sequence[float],
) -> None:
    """Pass B: write m', v', the EMAs and p (weight decay first, then add the update)."""
    beta1, beta2 = betas
    decay = 1 - lr_as(lr, torch.float64) * weight_decay
    for i, (param, grad, exp_avg, exp_avg_sq, emas) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, memory_emas, strict=True)
    ):
        if param.numel() == 0:
            continue
        dtype = exp_avg.dtype
        g = grad.to(dtype)
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        flow = torch.zeros_like(g)
        for ema, d in zip(emas, memory_decays, strict=True):
            ema.mul_(d).add_(g, alpha=1 - d)
        for w, ema in zip(memory_weights, emas, strict=True):
            flow.add_(ema, alpha=w)

        polarity = POLARITY_SCALE * torch.sign(g) * scalars.tau[i].to(dtype)
        adaptive = g * (1.0 + polarity)
        adaptive.add_(scalars.ascent[i].to(dtype) * g)

        denom = (exp_avg_sq.sqrt() / scalars.sqrt_bc2[i].to(dtype)).add_(eps)
        update = exp_avg / denom + FLOW_WEIGHT * flow + ADAPTIVE_WEIGHT * adaptive
        update.mul_(scalars.coef[i].to(dtype))

        with updated_in_math_dtype(param) as target:
            if weight_decay != 0:
                target.mul_(decay)
            target.add_(update)


@register("biostatis", "eager")
def biostatis_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: BiostatisState,
    hyperparameters: BiostatisHyperparameters,
    reduce_partials: GroupReduction | None = None,
) -> BiostatisScalars:
    """One group's step over its active tensors (the contract: :class:`curvkern.families.OptimizerStep`);
    increments each 0-dim step count."""
    exp_avgs, exp_avg_sqs, memory_emas, state_steps = state
    h = hyperparameters
    for step in state_steps:
        step.add_(1)
    sums = biostatis_sums(grads, exp_avgs, exp_avg_sqs, betas=h.betas)
    sums, numels, group_sums = group_statistics(sums, [p.numel() for p in params], reduce_partials)
    scalars = biostatis_scalars(
        sums,
        numels,
        stacked_steps(state_steps),
        lr=h.lr,
        betas=h.betas,
        homeo_rate=h.homeo_rate,
        coherence_target=h.coherence_target,
        energy_target=h.energy_target,
        lambda_energy=h.lambda_energy,
        flip_threshold=h.flip_threshold,
        ascent_strength=h.ascent_strength,
        group_sums=group_sums,
    )
    biostatis_update(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        memory_emas,
        scalars,
        lr=h.lr,
        betas=h.betas,
        eps=h.eps,
        weight_decay=h.weight_decay,
        memory_decays=h.memory_decays,
        memory_weights=h.memory_weights,
    )
    return scalars
