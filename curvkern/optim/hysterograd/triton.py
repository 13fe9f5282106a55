"""HysteroGrad's Triton backend: pass A, per-tensor sums, scalar stage and pass B, one launch each per
group and dtype combination, whatever the number of tensors (see :mod:`curvkern.optim._triton_multi_tensor`).

Every rounding mirrors :mod:`curvkern.optim.hysterograd.eager` op for op, including where torch's own
kernels fuse: ``addcmul_`` is one FMA ``fma(c·g, g, G·β)``; ``/`` and ``sqrt`` are correctly rounded;
``C / x`` is torch's ``reciprocal(x)·C``. Nothing else is contracted (the launcher turns contraction off).

The scalar stage is a one-program kernel rather than the eager torch ops, because the group accumulator
is a sequence of roundings (each tensor's Σu², taken in the state dtype, added into the fp32 accumulator
in group order) that no fixed-size torch op reproduces without one op per tensor. It writes τ, T, E, the
returned ``[N̂, h, gate]`` and ``−η·k`` on the device; pass B loads the gate and leaves every element of a
frozen group unread and unwritten (its masks are off), so a NaN step never reaches a parameter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from curvkern._dispatch import register
from curvkern.optim._triton_multi_tensor import (
    BLOCK_SIZE, CHUNK_SIZE, TRITON_DTYPES, DenseLayout, build_table, div_rn, launch, per_tensor_sums, sqrt_rn,
    store_rounded,
)

PARAM, GRAD, METRIC = range(3)  # roles in the chunk table


@triton.jit
def _pass_a_block(grad_ptr, metric_ptr, offsets, mask, beta_s, coef_s, eps_s, STATE_DTYPE: tl.constexpr):
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    metric = tl.fma(coef_s * g, g, tl.load(metric_ptr + offsets, mask=mask, other=0.0) * beta_s)
    tl.store(metric_ptr + offsets, metric, mask=mask)
    u = div_rn(g, sqrt_rn(metric) + eps_s)
    return tl.where(mask, u * u, 0.0)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])
def _pass_a_kernel(
    addresses, chunks, numels, partials, num_tensors, num_chunks,
    beta: tl.float64, metric_coef: tl.float64, epsilon: tl.float64,
    GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, ALIGN: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """G ← fma((1−β)·s·g, g, G·β) in place; the chunk's Σu² (state dtype) into ``partials``."""
    zero64 = tl.zeros([], tl.float64)  # zero64 + x: an fp64 argument as a tensor, compiled or interpreted
    chunk = tl.program_id(0)
    slot = tl.load(chunks + chunk)
    start = tl.load(chunks + num_chunks + chunk)
    end = tl.minimum(start + CHUNK, tl.load(numels + slot))
    grad_ptr = tl.multiple_of(tl.load(addresses + 1 * num_tensors + slot).to(tl.pointer_type(GRAD_DTYPE)), ALIGN)
    metric_ptr = tl.multiple_of(tl.load(addresses + 2 * num_tensors + slot).to(tl.pointer_type(STATE_DTYPE)), ALIGN)
    beta_s = (zero64 + beta).to(STATE_DTYPE)
    coef_s = (zero64 + metric_coef).to(STATE_DTYPE)
    eps_s = (zero64 + epsilon).to(STATE_DTYPE)
    total = tl.zeros([BLOCK], STATE_DTYPE)
    # Full blocks without a mask (vector loads where ALIGN allows), then the tail, if any, masked.
    full_end = end - (end - start) % BLOCK
    for block in range(start, full_end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        total += _pass_a_block(grad_ptr, metric_ptr, offsets, tl.full([BLOCK], True, tl.int1), beta_s, coef_s, eps_s, STATE_DTYPE)
    for block in range(full_end, end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        total += _pass_a_block(grad_ptr, metric_ptr, offsets, offsets < end, beta_s, coef_s, eps_s, STATE_DTYPE)
    tl.store(partials + tl.load(chunks + 2 * num_chunks + chunk), tl.sum(total).to(tl.float64))


@triton.jit(do_not_specialize=["num_tensors"])
def _scalar_kernel(
    sums, num_tensors, tau_ptr, temp_ptr, energy_ptr, stats_ptr, neg_step_ptr,
    lr: tl.float64, neg_lr: tl.float64, stiffening_factor: tl.float64, beta: tl.float64,
    one_minus_beta: tl.float64, cooling_rate: tl.float64, grad_clip: tl.float64, hysteresis_scale: tl.float64,
    CLIP: tl.constexpr, ADAPTIVE: tl.constexpr, SCALAR_DTYPE: tl.constexpr,
):
    """τ, T, E and the gate from the per-tensor Σu², as ``hysterograd_scalars`` computes them."""
    # Double rounding through float64 is innocuous for one addition, so this equals the eager
    # accumulator's own-dtype additions.
    zero64 = tl.zeros([], tl.float64)  # zero64 + x: an fp64 argument as a tensor, compiled or interpreted
    accumulator = tl.zeros([], SCALAR_DTYPE)
    for i in range(num_tensors):
        accumulator = (accumulator.to(tl.float64) + tl.load(sums + i)).to(SCALAR_DTYPE)
    norm = sqrt_rn(accumulator)
    one = tl.full([], 1.0, SCALAR_DTYPE)
    if CLIP:
        ratio = div_rn(one, norm + 1e-6) * (zero64 + grad_clip).to(SCALAR_DTYPE)
        clipped = ratio < 1.0
        g_norm = norm * tl.where(clipped, ratio, one)
        neg_step = tl.where(clipped, ((zero64 + neg_lr).to(SCALAR_DTYPE) * ratio).to(tl.float64), zero64 + neg_lr)
    else:
        g_norm = norm
        neg_step = zero64 + neg_lr
    tau = tl.load(tau_ptr) + g_norm * (zero64 + lr).to(SCALAR_DTYPE)
    temp = tl.load(temp_ptr) * (zero64 + cooling_rate).to(SCALAR_DTYPE)
    energy = tl.load(energy_ptr) * (zero64 + beta).to(SCALAR_DTYPE)
    energy = energy + g_norm * (zero64 + one_minus_beta).to(SCALAR_DTYPE)
    clamped = tl.minimum(tl.maximum(temp, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)
    barrier = sqrt_rn(tau) * (zero64 + stiffening_factor).to(SCALAR_DTYPE) * (1.0 - clamped)
    barrier = barrier * (zero64 + hysteresis_scale).to(SCALAR_DTYPE)
    if ADAPTIVE:
        barrier = barrier * (energy + 1e-8)
    tl.store(tau_ptr, tau)
    tl.store(temp_ptr, temp)
    tl.store(energy_ptr, energy)
    tl.store(stats_ptr, g_norm)
    tl.store(stats_ptr + 1, barrier)
    tl.store(stats_ptr + 2, (g_norm > barrier).to(SCALAR_DTYPE))
    tl.store(neg_step_ptr, neg_step)


@triton.jit
def _pass_b_block(param_ptr, grad_ptr, metric_ptr, offsets, mask, eps_s, neg_step,
                  PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr):
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    u = div_rn(g, sqrt_rn(tl.load(metric_ptr + offsets, mask=mask, other=0.0)) + eps_s)
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    store_rounded(param_ptr + offsets, p + u * neg_step, mask, PARAM_DTYPE)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])
def _pass_b_kernel(
    addresses, chunks, numels, stats_ptr, neg_step_ptr, num_tensors, num_chunks,
    epsilon: tl.float64,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, ALIGN: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """p ← p + u·(−η·k) where the gate is open; nothing is read or written where it is closed."""
    zero64 = tl.zeros([], tl.float64)
    chunk = tl.program_id(0)
    liquid = tl.load(stats_ptr + 2) != 0
    slot = tl.load(chunks + chunk)
    start = tl.load(chunks + num_chunks + chunk)
    # A frozen group's range is empty: no element is read or written.
    end = tl.where(liquid, tl.minimum(start + CHUNK, tl.load(numels + slot)), start)
    param_ptr = tl.multiple_of(tl.load(addresses + 0 * num_tensors + slot).to(tl.pointer_type(PARAM_DTYPE)), ALIGN)
    grad_ptr = tl.multiple_of(tl.load(addresses + 1 * num_tensors + slot).to(tl.pointer_type(GRAD_DTYPE)), ALIGN)
    metric_ptr = tl.multiple_of(tl.load(addresses + 2 * num_tensors + slot).to(tl.pointer_type(STATE_DTYPE)), ALIGN)
    eps_s = (zero64 + epsilon).to(STATE_DTYPE)
    neg_step = tl.load(neg_step_ptr).to(STATE_DTYPE)
    full_end = end - (end - start) % BLOCK
    for block in range(start, full_end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        _pass_b_block(param_ptr, grad_ptr, metric_ptr, offsets, tl.full([BLOCK], True, tl.int1), eps_s, neg_step,
                      PARAM_DTYPE, STATE_DTYPE)
    for block in range(full_end, end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        _pass_b_block(param_ptr, grad_ptr, metric_ptr, offsets, offsets < end, eps_s, neg_step, PARAM_DTYPE, STATE_DTYPE)


@register("hysterograd", "triton")
def hysterograd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    metrics: list[torch.Tensor],
    tau: torch.Tensor,
    temp: torch.Tensor,
    energy: torch.Tensor,
    *,
    lr: float,
    stiffening_factor: float,
    beta: float,
    epsilon: float,
    cooling_rate: float,
    metric_scale: float,
    adaptive_threshold: bool,
    grad_clip: float | None,
    hysteresis_scale: float,
) -> torch.Tensor:
    """One group's step, as the eager ``hysterograd_step``. Returns ``[N̂, h, gate]`` on the device."""
    device = tau.device
    layout = DenseLayout()
    work_params, work_grads, work_metrics = [], [], []
    for param, grad, metric in zip(params, grads, metrics, strict=True):
        reference = layout.reference(param)
        work_params.append(reference)
        work_grads.append(layout.readable(grad, reference))
        work_metrics.append(layout.writable(metric, reference))
    table = build_table([work_params, work_grads, work_metrics], device, CHUNK_SIZE)

    partials = torch.zeros(table.num_chunks, dtype=torch.float64, device=device)
    for bucket in table.buckets:
        if bucket.num_chunks:
            launch(
                _pass_a_kernel, (bucket.num_chunks,),
                bucket.addresses, bucket.chunks, bucket.numels, partials, bucket.num_tensors, bucket.num_chunks,
                float(beta), (1 - beta) * metric_scale, float(epsilon),
                GRAD_DTYPE=TRITON_DTYPES[bucket.dtypes[GRAD]], STATE_DTYPE=TRITON_DTYPES[bucket.dtypes[METRIC]],
                ALIGN=bucket.alignment, CHUNK=CHUNK_SIZE, BLOCK=BLOCK_SIZE,
            )
    sums = per_tensor_sums(table, partials, 1, METRIC)

    stats = torch.empty(3, dtype=tau.dtype, device=device)
    neg_step = torch.empty((), dtype=torch.float64, device=device)
    launch(
        _scalar_kernel, (1,),
        sums, table.num_tensors, tau, temp, energy, stats, neg_step,
        float(lr), -float(lr), float(stiffening_factor), float(beta), 1 - beta, float(cooling_rate),
        float(grad_clip or 0.0), float(hysteresis_scale),
        CLIP=bool(grad_clip), ADAPTIVE=adaptive_threshold, SCALAR_DTYPE=TRITON_DTYPES[tau.dtype],
    )

    for bucket in table.buckets:
        if bucket.num_chunks:
            launch(
                _pass_b_kernel, (bucket.num_chunks,),
                bucket.addresses, bucket.chunks, bucket.numels, stats, neg_step,
                bucket.num_tensors, bucket.num_chunks, float(epsilon),
                PARAM_DTYPE=TRITON_DTYPES[bucket.dtypes[PARAM]], GRAD_DTYPE=TRITON_DTYPES[bucket.dtypes[GRAD]],
                STATE_DTYPE=TRITON_DTYPES[bucket.dtypes[METRIC]], ALIGN=bucket.alignment,
                CHUNK=CHUNK_SIZE, BLOCK=BLOCK_SIZE,
            )
    layout.finish()
    return stats
