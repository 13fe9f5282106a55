"""HysteroGrad's Triton backend: pass A, per-tensor sums, the group accumulator, the scalar stage and
pass B; one launch each per group and dtype combination, whatever the number of tensors (see
:mod:`curvkern.optim._triton_multi_tensor`).

Every rounding mirrors :mod:`curvkern.optim.hysterograd.eager` op for op, including where torch's own
kernels fuse: ``addcmul_`` is one FMA ``fma(c·g, g, G·β)``; ``/`` and ``sqrt`` are correctly rounded.
Nothing else is contracted (the launcher turns contraction off).

The group accumulator is a sequence of roundings (each tensor's Σu², taken in the state dtype, added
into the fp32 accumulator in group order) that no fixed-size torch op reproduces, so a one-program
kernel adds them. The scalar stage on that accumulator is the eager
:func:`~curvkern.optim.hysterograd.eager.hysterograd_scalars` itself: a fixed handful of 0-dim torch ops
on the device, never read back, and bit for bit the reference's on every device (torch's CPU ``sqrt``
is not always correctly rounded, and τ, T, E and the clip factor must match it exactly). Pass B loads
the gate and gives a frozen group an empty element range: nothing is read or written, so a NaN step
never reaches a parameter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from curvkern._dispatch import register
from curvkern.families import HysteroGradState
from curvkern.hyperparameters import HysteroGradHyperparameters
from curvkern.optim._distributed import GroupReduction, refuse_reduction_under_compile
from curvkern.optim._triton_multi_tensor import (
    BLOCK_SIZE,
    CHUNK_SIZE,
    TRITON_DTYPES,
    DenseLayout,
    build_table,
    chunk_range,
    device_scalar,
    div_rn,
    in_dtype,
    launch,
    lr_arguments,
    per_tensor_sums,
    sqrt_rn,
    store_rounded,
    tensor_pointer,
)
from curvkern.optim.hysterograd.eager import hysterograd_scalars, hysterograd_step as eager_hysterograd_step

# Roles in the chunk table; constexpr, because the kernels index the address table with them too.
PARAM, GRAD, METRIC = (tl.constexpr(role) for role in range(3))


@triton.jit
def _pass_a_block(grad_ptr, metric_ptr, offsets, mask, beta_s, coef_s, eps_s, STATE_DTYPE: tl.constexpr):
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    metric = tl.fma(coef_s * g, g, tl.load(metric_ptr + offsets, mask=mask, other=0.0) * beta_s)
    tl.store(metric_ptr + offsets, metric, mask=mask)
    u = div_rn(g, sqrt_rn(metric) + eps_s)
    return tl.where(mask, u * u, 0.0)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])
def _pass_a_kernel(
    addresses,
    chunks,
    numels,
    partials,
    num_tensors,
    num_chunks,
    beta: tl.float64,
    metric_coef: tl.float64,
    epsilon: tl.float64,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """G ← fma((1−β)·s·g, g, G·β) in place; the chunk's Σu² (state dtype) into ``partials``."""
    chunk = tl.program_id(0)
    slot, start, end = chunk_range(chunks, numels, num_chunks, chunk, CHUNK)
    grad_ptr = tensor_pointer(addresses, GRAD, num_tensors, slot, GRAD_DTYPE, ALIGN)
    metric_ptr = tensor_pointer(addresses, METRIC, num_tensors, slot, STATE_DTYPE, ALIGN)
    beta_s = in_dtype(beta, STATE_DTYPE)
    coef_s = in_dtype(metric_coef, STATE_DTYPE)
    eps_s = in_dtype(epsilon, STATE_DTYPE)
    total = tl.zeros([BLOCK], STATE_DTYPE)
    # Full blocks without a mask (vector loads where ALIGN allows), then the tail, if any, masked.
    full_end = end - (end - start) % BLOCK
    for block in range(start, full_end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        all_lanes = tl.full([BLOCK], True, tl.int1)
        total += _pass_a_block(grad_ptr, metric_ptr, offsets, all_lanes, beta_s, coef_s, eps_s, STATE_DTYPE)
    for block in range(full_end, end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        total += _pass_a_block(grad_ptr, metric_ptr, offsets, offsets < end, beta_s, coef_s, eps_s, STATE_DTYPE)
    tl.store(partials + tl.load(chunks + 2 * num_chunks + chunk), tl.sum(total).to(tl.float64))


@triton.jit(do_not_specialize=["num_tensors"])
def _accumulate_kernel(sums, num_tensors, accumulator, SCALAR_DTYPE: tl.constexpr):
    """One program: the per-tensor Σu² added into the accumulator in group order, each addition rounded
    to its dtype, as the eager ``accumulator += Σu²`` (in float64 and rounded once: the same, as eager
    computes an fp32 += fp64 in float64)."""
    total = tl.zeros([], SCALAR_DTYPE)
    for i in range(num_tensors):
        total = (total.to(tl.float64) + tl.load(sums + i)).to(SCALAR_DTYPE)
    tl.store(accumulator, total)


@triton.jit
def _pass_b_block(
    param_ptr,
    grad_ptr,
    metric_ptr,
    offsets,
    mask,
    eps_s,
    neg_step,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
):
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    u = div_rn(g, sqrt_rn(tl.load(metric_ptr + offsets, mask=mask, other=0.0)) + eps_s)
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    store_rounded(param_ptr + offsets, p + u * neg_step, mask, PARAM_DTYPE)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])
def _pass_b_kernel(
    addresses,
    chunks,
    numels,
    stats_ptr,
    neg_step_ptr,
    num_tensors,
    num_chunks,
    epsilon: tl.float64,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """p ← p + u·(−η·k) where the gate is open; nothing is read or written where it is closed."""
    liquid = tl.load(stats_ptr + 2) != 0
    slot, start, end = chunk_range(chunks, numels, num_chunks, tl.program_id(0), CHUNK)
    end = tl.where(liquid, end, start)  # a frozen group's range is empty: no element is read or written
    param_ptr = tensor_pointer(addresses, PARAM, num_tensors, slot, PARAM_DTYPE, ALIGN)
    grad_ptr = tensor_pointer(addresses, GRAD, num_tensors, slot, GRAD_DTYPE, ALIGN)
    metric_ptr = tensor_pointer(addresses, METRIC, num_tensors, slot, STATE_DTYPE, ALIGN)
    eps_s = in_dtype(epsilon, STATE_DTYPE)
    neg_step = tl.load(neg_step_ptr).to(STATE_DTYPE)
    full_end = end - (end - start) % BLOCK
    for block in range(start, full_end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        _pass_b_block(
            param_ptr,
            grad_ptr,
            metric_ptr,
            offsets,
            tl.full([BLOCK], True, tl.int1),
            eps_s,
            neg_step,
            PARAM_DTYPE,
            STATE_DTYPE,
        )
    for block in range(full_end, end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        _pass_b_block(
            param_ptr, grad_ptr, metric_ptr, offsets, offsets < end, eps_s, neg_step, PARAM_DTYPE, STATE_DTYPE
        )


@register("hysterograd", "triton")
def hysterograd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: HysteroGradState,
    hyperparameters: HysteroGradHyperparameters,
    reduce_partials: GroupReduction | None = None,
) -> torch.Tensor:
    """One group's step, as the eager ``hysterograd_step``. Returns ``[N̂, h, gate]`` on the device.

    Under torch.compile it is one opaque op (``curvkern::hysterograd_triton_step_``): the chunk table holds
    the tensors' raw addresses, which a traced graph cannot hold, so the compiler calls the step as it is.
    """
    metrics, tau, temp, energy = state
    h = hyperparameters
    if torch.compiler.is_compiling():
        refuse_reduction_under_compile(reduce_partials, "HysteroGrad")
        # An op's schema takes no dataclass: the records' fields, flat, in their order (_step_op rebuilds both).
        return torch.ops.curvkern.hysterograd_triton_step_(
            params,
            grads,
            metrics,
            tau,
            temp,
            energy,
            *lr_arguments(h.lr),
            h.stiffening_factor,
            h.beta,
            h.epsilon,
            h.cooling_rate,
            h.initial_temp,
            h.metric_scale,
            h.adaptive_threshold,
            h.grad_clip,
            h.hysteresis_scale,
        )
    if not params:  # a rank holding none of the group's gradients: no kernel to run, it joins the sum
        return eager_hysterograd_step(params, grads, state, h, reduce_partials)
    device = tau.device
    layout = DenseLayout(params, grads, [metrics])
    table = build_table(layout.roles, device, CHUNK_SIZE)

    partials = torch.empty(table.num_chunks, dtype=torch.float64, device=device)  # every chunk writes its own
    for bucket in table.buckets:
        if bucket.num_chunks:
            launch(
                _pass_a_kernel,
                (bucket.num_chunks,),
                bucket.addresses,
                bucket.chunks,
                bucket.numels,
                partials,
                bucket.num_tensors,
                bucket.num_chunks,
                h.beta,
                (1 - h.beta) * h.metric_scale,
                h.epsilon,
                GRAD_DTYPE=TRITON_DTYPES[bucket.dtypes[GRAD]],
                STATE_DTYPE=TRITON_DTYPES[bucket.dtypes[METRIC]],
                ALIGN=bucket.alignment,
                CHUNK=CHUNK_SIZE,
                BLOCK=BLOCK_SIZE,
            )
    sums = per_tensor_sums(table, partials, 1, METRIC)
    counted = reduce_partials.counted if reduce_partials is not None else None
    if counted is not None:  # a DTensor's shard another rank also holds adds nothing here
        sums = torch.where(torch.tensor(counted, device=device).reshape(-1, 1), sums, torch.zeros_like(sums))

    accumulator = torch.empty((), dtype=tau.dtype, device=device)
    launch(_accumulate_kernel, (1,), sums, table.num_tensors, accumulator, SCALAR_DTYPE=TRITON_DTYPES[tau.dtype])
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
    stats = torch.stack([g_norm, barrier, liquid.to(g_norm.dtype)])
    neg_step_size = device_scalar(neg_step_size, device)

    for bucket in table.buckets:
        if bucket.num_chunks:
            launch(
                _pass_b_kernel,
                (bucket.num_chunks,),
                bucket.addresses,
                bucket.chunks,
                bucket.numels,
                stats,
                neg_step_size,
                bucket.num_tensors,
                bucket.num_chunks,
                h.epsilon,
                PARAM_DTYPE=TRITON_DTYPES[bucket.dtypes[PARAM]],
                GRAD_DTYPE=TRITON_DTYPES[bucket.dtypes[GRAD]],
                STATE_DTYPE=TRITON_DTYPES[bucket.dtypes[METRIC]],
                ALIGN=bucket.alignment,
                CHUNK=CHUNK_SIZE,
                BLOCK=BLOCK_SIZE,
            )
    layout.finish()
    return stats


@torch.library.custom_op(
    "curvkern::hysterograd_triton_step_",
    mutates_args=("params", "metrics", "tau", "temp", "energy"),
)
def _step_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    metrics: list[torch.Tensor],
    tau: torch.Tensor,
    temp: torch.Tensor,
    energy: torch.Tensor,
    lr_value: float,
    lr: torch.Tensor | None,
    stiffening_factor: float,
    beta: float,
    epsilon: float,
    cooling_rate: float,
    initial_temp: float,
    metric_scale: float,
    adaptive_threshold: bool,
    grad_clip: float | None,
    hysteresis_scale: float,
) -> torch.Tensor:
    """:func:`hysterograd_step` as an op of torch's, for torch.compile: the state record's fields, then the
    hyperparameter record's (``lr`` the tensor lr or None, ``lr_value`` the float lr otherwise)."""
    hyperparameters = HysteroGradHyperparameters(
        lr=lr_value if lr is None else lr,
        stiffening_factor=stiffening_factor,
        beta=beta,
        epsilon=epsilon,
        cooling_rate=cooling_rate,
        initial_temp=initial_temp,
        metric_scale=metric_scale,
        adaptive_threshold=adaptive_threshold,
        grad_clip=grad_clip,
        hysteresis_scale=hysteresis_scale,
    )
    return hysterograd_step(params, grads, HysteroGradState(metrics, tau, temp, energy), hyperparameters)


@_step_op.register_fake
def _step_fake(params, grads, metrics, tau, temp, energy, *hyperparameters):
    return tau.new_empty(3)
