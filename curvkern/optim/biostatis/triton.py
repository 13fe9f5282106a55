"""BiostatisV6's Triton backend: pass A (six sums per chunk), per-tensor sums, the scalar stage, pass B;
one launch per pass per group and dtype combination (see :mod:`curvkern.optim._triton_multi_tensor`).

The scalar stage is the eager :func:`~curvkern.optim.biostatis.eager.biostatis_scalars` itself: it runs
on the device in float64 (a fixed number of small torch ops, whatever the number of tensors), never
reads back to the host, and reusing it keeps every gain and coefficient exactly the reference's.

The elementwise math mirrors the eager pass B op for op, including where torch's kernels fuse: ``add_``
with ``alpha`` is ``fma(g, α, x)`` and ``addcmul_`` is ``fma(c·g, g, x)``; ``/`` and ``sqrt`` are
correctly rounded. ``|tanh g|`` is computed in float64 from ``exp`` (Triton has no portable ``tanh``):
it only enters the Σ|tanh g| sums, within rounding of torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from curvkern._dispatch import register
from curvkern.families import BiostatisState
from curvkern.hyperparameters import BiostatisHyperparameters
from curvkern.optim._common import lr_as
from curvkern.optim._distributed import GroupReduction, refuse_reduction_under_compile
from curvkern.optim._triton_multi_tensor import (
    BLOCK_SIZE,
    CHUNK_SIZE,
    TRITON_DTYPES,
    DenseLayout,
    build_table,
    chunk_range,
    device_scalar,
    device_vector,
    div_rn,
    in_dtype,
    launch,
    lr_arguments,
    per_tensor_sums,
    sqrt_rn,
    store_rounded,
    tensor_pointer,
)
from curvkern.optim.biostatis.eager import (
    N_SUMS,
    BiostatisScalars,
    biostatis_scalars,
    biostatis_step as eager_biostatis_step,
    group_statistics,
)

# Roles in the chunk table (rows of its address table), the memory EMAs from FIRST_EMA on; constexpr,
# because the kernels index the address table with them too.
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, FIRST_EMA = (tl.constexpr(role) for role in range(5))


@triton.jit
def _abs_tanh(x):
    a = tl.abs(x.to(tl.float64))
    t = tl.exp(-2.0 * a)
    return ((1.0 - t) / (1.0 + t)).to(x.dtype)


@triton.jit
def _moments(grad_ptr, m_ptr, v_ptr, offsets, mask, b1, c1, b2, c2, STATE_DTYPE: tl.constexpr):
    """g, m' = fma(g, 1−β1, m·β1), v' = fma((1−β2)·g, g, v·β2), as torch's add_(alpha=) and addcmul_."""
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    m = tl.fma(g, c1, tl.load(m_ptr + offsets, mask=mask, other=0.0) * b1)
    v = tl.fma(c2 * g, g, tl.load(v_ptr + offsets, mask=mask, other=0.0) * b2)
    return g, m, v


@triton.jit(do_not_specialize=["num_tensors", "num_chunks"])
def _sums_kernel(
    addresses,
    chunks,
    numels,
    partials,
    num_tensors,
    num_chunks,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass A, read-only: the chunk's ``[Σg², Σ|tanh g|, Σm'g, Σm'², Σ|m'|, Σ√v']`` in the state dtype."""
    chunk = tl.program_id(0)
    slot, start, end = chunk_range(chunks, numels, num_chunks, chunk, CHUNK)
    grad_ptr = tensor_pointer(addresses, GRAD, num_tensors, slot, GRAD_DTYPE, ALIGN)
    m_ptr = tensor_pointer(addresses, EXP_AVG, num_tensors, slot, STATE_DTYPE, ALIGN)
    v_ptr = tensor_pointer(addresses, EXP_AVG_SQ, num_tensors, slot, STATE_DTYPE, ALIGN)
    b1, c1 = in_dtype(beta1, STATE_DTYPE), in_dtype(one_minus_beta1, STATE_DTYPE)
    b2, c2 = in_dtype(beta2, STATE_DTYPE), in_dtype(one_minus_beta2, STATE_DTYPE)
    gg = tl.zeros([BLOCK], STATE_DTYPE)
    th = tl.zeros([BLOCK], STATE_DTYPE)
    mg = tl.zeros([BLOCK], STATE_DTYPE)
    mm = tl.zeros([BLOCK], STATE_DTYPE)
    am = tl.zeros([BLOCK], STATE_DTYPE)
    sv = tl.zeros([BLOCK], STATE_DTYPE)
    # Full blocks without a mask (vector loads where ALIGN allows), then the tail, if any, masked.
    # Lanes past the end load zeros, which add nothing to any sum.
    full_end = end - (end - start) % BLOCK
    for block in range(start, full_end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        g, m, v = _moments(
            grad_ptr, m_ptr, v_ptr, offsets, tl.full([BLOCK], True, tl.int1), b1, c1, b2, c2, STATE_DTYPE
        )
        gg, th, mg, mm, am, sv = gg + g * g, th + _abs_tanh(g), mg + m * g, mm + m * m, am + tl.abs(m), sv + sqrt_rn(v)
    for block in range(full_end, end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        g, m, v = _moments(grad_ptr, m_ptr, v_ptr, offsets, offsets < end, b1, c1, b2, c2, STATE_DTYPE)
        gg, th, mg, mm, am, sv = gg + g * g, th + _abs_tanh(g), mg + m * g, mm + m * m, am + tl.abs(m), sv + sqrt_rn(v)
    row = partials + tl.load(chunks + 2 * num_chunks + chunk) * 6
    tl.store(row, tl.sum(gg).to(tl.float64))
    tl.store(row + 1, tl.sum(th).to(tl.float64))
    tl.store(row + 2, tl.sum(mg).to(tl.float64))
    tl.store(row + 3, tl.sum(mm).to(tl.float64))
    tl.store(row + 4, tl.sum(am).to(tl.float64))
    tl.store(row + 5, tl.sum(sv).to(tl.float64))


@triton.jit
def _update_block(
    addresses,
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    memory,
    num_tensors,
    slot,
    offsets,
    mask,
    b1,
    c1,
    b2,
    c2,
    eps_s,
    decay_s,
    apply_decay,
    tau,
    ascent,
    sqrt_bc2,
    coef,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    NUM_MEMORIES: tl.constexpr,
    ALIGN: tl.constexpr,
):
    g, m, v = _moments(grad_ptr, m_ptr, v_ptr, offsets, mask, b1, c1, b2, c2, STATE_DTYPE)
    tl.store(m_ptr + offsets, m, mask=mask)
    tl.store(v_ptr + offsets, v, mask=mask)
    flow = tl.zeros(offsets.shape, STATE_DTYPE)
    for j in tl.static_range(NUM_MEMORIES):
        ema_ptr = tensor_pointer(addresses, FIRST_EMA + j, num_tensors, slot, STATE_DTYPE, ALIGN)
        d = tl.load(memory + j).to(STATE_DTYPE)
        one_minus_d = tl.load(memory + NUM_MEMORIES + j).to(STATE_DTYPE)
        weight = tl.load(memory + 2 * NUM_MEMORIES + j).to(STATE_DTYPE)
        ema = tl.fma(g, one_minus_d, tl.load(ema_ptr + offsets, mask=mask, other=0.0) * d)
        tl.store(ema_ptr + offsets, ema, mask=mask)
        flow = tl.fma(ema, weight, flow)  # flow.add_(ema, alpha=w), from zeros, in order
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(STATE_DTYPE)  # torch.sign; NaN gives 0
    adaptive = g * (1.0 + sign * 0.5 * tau)
    adaptive = adaptive + ascent * g
    denom = div_rn(sqrt_rn(v), sqrt_bc2) + eps_s
    update = div_rn(m, denom) + flow * 0.05
    update = (update + adaptive * 0.01) * coef
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(STATE_DTYPE)
    p = tl.where(apply_decay != 0, p * decay_s, p)
    store_rounded(param_ptr + offsets, p + update, mask, PARAM_DTYPE)


@triton.jit(do_not_specialize=["num_tensors", "num_chunks", "apply_decay"])
def _update_kernel(
    addresses,
    chunks,
    numels,
    tensor_index,
    memory,
    tau_ptr,
    ascent_ptr,
    sqrt_bc2_ptr,
    coef_ptr,
    num_tensors,
    num_chunks,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    eps: tl.float64,
    decay_ptr,
    apply_decay,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    NUM_MEMORIES: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass B: m, v and the EMAs written back; p ← p·(1 − lr·wd) (when wd ≠ 0), then p ← p + U·coef."""
    slot, start, end = chunk_range(chunks, numels, num_chunks, tl.program_id(0), CHUNK)
    param_ptr = tensor_pointer(addresses, PARAM, num_tensors, slot, PARAM_DTYPE, ALIGN)
    grad_ptr = tensor_pointer(addresses, GRAD, num_tensors, slot, GRAD_DTYPE, ALIGN)
    m_ptr = tensor_pointer(addresses, EXP_AVG, num_tensors, slot, STATE_DTYPE, ALIGN)
    v_ptr = tensor_pointer(addresses, EXP_AVG_SQ, num_tensors, slot, STATE_DTYPE, ALIGN)
    b1, c1 = in_dtype(beta1, STATE_DTYPE), in_dtype(one_minus_beta1, STATE_DTYPE)
    b2, c2 = in_dtype(beta2, STATE_DTYPE), in_dtype(one_minus_beta2, STATE_DTYPE)
    eps_s = in_dtype(eps, STATE_DTYPE)
    decay_s = tl.load(decay_ptr).to(STATE_DTYPE)
    tensor = tl.load(tensor_index + slot)
    tau = tl.load(tau_ptr + tensor).to(STATE_DTYPE)
    ascent = tl.load(ascent_ptr + tensor).to(STATE_DTYPE)
    sqrt_bc2 = tl.load(sqrt_bc2_ptr + tensor).to(STATE_DTYPE)
    coef = tl.load(coef_ptr + tensor).to(STATE_DTYPE)
    full_end = end - (end - start) % BLOCK
    for block in range(start, full_end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        _update_block(
            addresses,
            param_ptr,
            grad_ptr,
            m_ptr,
            v_ptr,
            memory,
            num_tensors,
            slot,
            offsets,
            tl.full([BLOCK], True, tl.int1),
            b1,
            c1,
            b2,
            c2,
            eps_s,
            decay_s,
            apply_decay,
            tau,
            ascent,
            sqrt_bc2,
            coef,
            PARAM_DTYPE,
            STATE_DTYPE,
            NUM_MEMORIES,
            ALIGN,
        )
    for block in range(full_end, end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block + tl.arange(0, BLOCK), ALIGN), BLOCK)
        _update_block(
            addresses,
            param_ptr,
            grad_ptr,
            m_ptr,
            v_ptr,
            memory,
            num_tensors,
            slot,
            offsets,
            offsets < end,
            b1,
            c1,
            b2,
            c2,
            eps_s,
            decay_s,
            apply_decay,
            tau,
            ascent,
            sqrt_bc2,
            coef,
            PARAM_DTYPE,
            STATE_DTYPE,
            NUM_MEMORIES,
            ALIGN,
        )


@register("biostatis", "triton")
def biostatis_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: BiostatisState,
    hyperparameters: BiostatisHyperparameters,
    reduce_partials: GroupReduction | None = None,
) -> BiostatisScalars:
    """One group's step, as the eager ``biostatis_step``; increments each step count.

    Under torch.compile it is one opaque op (``curvkern::biostatis_triton_step_``): the chunk table holds
    the tensors' raw addresses, which a traced graph cannot hold, so the compiler calls the step as it is.
    """
    exp_avgs, exp_avg_sqs, memory_emas, state_steps = state
    h = hyperparameters
    if torch.compiler.is_compiling():
        refuse_reduction_under_compile(reduce_partials, "BiostatisV6")
        # An op's schema takes no dataclass and no list of lists: the records' fields, flat, in their order
        # (_step_op rebuilds both).
        return BiostatisScalars(
            *torch.ops.curvkern.biostatis_triton_step_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [ema for emas in memory_emas for ema in emas],
                state_steps,
                *lr_arguments(h.lr),
                *h.betas,
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
    if not params:  # a rank holding none of the group's gradients: no kernel to run, it joins the sum
        return eager_biostatis_step(params, grads, state, h, reduce_partials)
    device = params[0].device
    torch._foreach_add_(state_steps, 1)
    layout = DenseLayout(params, grads, [exp_avgs, exp_avg_sqs, *zip(*memory_emas)])
    table = build_table(layout.roles, device, CHUNK_SIZE)
    beta1, beta2 = h.betas
    moments = (beta1, 1 - beta1, beta2, 1 - beta2)

    partials = torch.empty((table.num_chunks, N_SUMS), dtype=torch.float64, device=device)  # every chunk writes its row
    for bucket in table.buckets:
        if bucket.num_chunks:
            launch(
                _sums_kernel,
                (bucket.num_chunks,),
                bucket.addresses,
                bucket.chunks,
                bucket.numels,
                partials,
                bucket.num_tensors,
                bucket.num_chunks,
                *moments,
                GRAD_DTYPE=TRITON_DTYPES[bucket.dtypes[GRAD]],
                STATE_DTYPE=TRITON_DTYPES[bucket.dtypes[EXP_AVG]],
                ALIGN=bucket.alignment,
                CHUNK=CHUNK_SIZE,
                BLOCK=BLOCK_SIZE,
            )
    sums, numels, group_sums = group_statistics(
        per_tensor_sums(table, partials, N_SUMS, EXP_AVG), table.numels, reduce_partials
    )
    scalars = biostatis_scalars(
        sums,
        numels,
        torch.stack(list(state_steps)),
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

    # 1 − lr·wd on the device: a tensor lr may change between replays of a captured step.
    decay = device_scalar(1 - lr_as(h.lr, torch.float64) * h.weight_decay, device)
    memory = device_vector([*h.memory_decays, *(1 - d for d in h.memory_decays), *h.memory_weights], device)
    for bucket in table.buckets:
        if bucket.num_chunks:
            launch(
                _update_kernel,
                (bucket.num_chunks,),
                bucket.addresses,
                bucket.chunks,
                bucket.numels,
                bucket.tensor_index,
                memory,
                scalars.tau,
                scalars.ascent,
                scalars.sqrt_bc2,
                scalars.coef,
                bucket.num_tensors,
                bucket.num_chunks,
                *moments,
                h.eps,
                decay,
                int(h.weight_decay != 0),
                PARAM_DTYPE=TRITON_DTYPES[bucket.dtypes[PARAM]],
                GRAD_DTYPE=TRITON_DTYPES[bucket.dtypes[GRAD]],
                STATE_DTYPE=TRITON_DTYPES[bucket.dtypes[EXP_AVG]],
                NUM_MEMORIES=len(h.memory_decays),
                ALIGN=bucket.alignment,
                CHUNK=CHUNK_SIZE,
                BLOCK=BLOCK_SIZE,
            )
    layout.finish()
    return scalars


@torch.library.custom_op(
    "curvkern::biostatis_triton_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "memory_emas", "steps"),
)
def _step_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    memory_emas: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr_value: float,
    lr: torch.Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    homeo_rate: float,
    coherence_target: float,
    energy_target: float,
    lambda_energy: float,
    memory_decays: list[float],
    memory_weights: list[float],
    flip_threshold: float,
    ascent_strength: float,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """:func:`biostatis_step` as an op of torch's, for torch.compile: the state record's fields with
    ``memory_emas`` flat, parameter-major (an op takes no list of lists), then the hyperparameter record's
    (``lr`` the tensor lr or None, ``lr_value`` the float lr otherwise; ``betas`` as two floats); returns
    the fields of the :class:`BiostatisScalars`."""
    n = len(memory_decays)  # EMAs per parameter, possibly none
    state = BiostatisState(exp_avgs, exp_avg_sqs, [memory_emas[i * n : (i + 1) * n] for i in range(len(params))], steps)
    hyperparameters = BiostatisHyperparameters(
        lr=lr_value if lr is None else lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        homeo_rate=homeo_rate,
        coherence_target=coherence_target,
        energy_target=energy_target,
        lambda_energy=lambda_energy,
        memory_decays=tuple(memory_decays),
        memory_weights=tuple(memory_weights),
        flip_threshold=flip_threshold,
        ascent_strength=ascent_strength,
    )
    return tuple(biostatis_step(params, grads, state, hyperparameters))


@_step_op.register_fake
def _step_fake(params, grads, exp_avgs, exp_avg_sqs, memory_emas, steps, *hyperparameters):
    group_value = params[0].new_empty((), dtype=torch.float64)
    per_tensor = params[0].new_empty(len(params), dtype=torch.float64)
    return (group_value, group_value.clone(), *(per_tensor.clone() for _ in range(7)))
