"""The Triton cross-entropy kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``), with the eager
reference's signatures (:mod:`curvkern.ce.eager`).

A program takes ``ROWS`` rows (several where V is small, one where it is large) and walks V in tiles of
``BLOCK_V`` with an online softmax. The HVP makes two sweeps per row: the first keeps the running max,
Σ e^{z−max} and ⟨e^{z−max}, u⟩, the second recomputes p and writes; 5 copies of (N, V) traffic when a row
does not stay in L2, 3 when it does. Labels (and the causal shift) are read in the kernel, ignored rows
are written as zeros without a single load of the logits or u, offsets are 64-bit, rows may be strided,
and the reduction scale is read from a device tensor: no host sync anywhere. Probability targets, and class
weights with label smoothing, give the weighted target q̃ a part on every class (``DENSE``): its sums ride
along sweep 1, and the backward, which writes from its first tile, sweeps them once before.
"""

from __future__ import annotations

import importlib.util
import struct

import torch

from curvkern._dispatch import register
from curvkern.ce.eager import accumulation_dtype, check_hvp_tangents, check_shard_inputs, is_soft, refuse_variants
from curvkern.hyperparameters import CrossEntropyLossHyperparameters

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _exact_scalar(hi, lo, ACC: tl.constexpr):
        """A host float passed as two fp32 numbers (Triton passes floats as fp32), rebuilt in ACC."""
        return tl.cast(hi, ACC) + tl.cast(lo, ACC)

    @triton.jit
    def _tanh(y):
        """tanh with its relative accuracy near 0 (Triton's interpreter has no libdevice): an odd series below
        |y| = 0.04 (the first omitted term is under 2^-53 of tanh there), (1 − e^{−2|y|}) / (1 + e^{−2|y|})
        above, whose cancellation costs at most about 1.5e-15 relative in fp64 (7e-7 in fp32) at 0.04."""
        a = tl.abs(y)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        y2 = a * a
        small = a * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))))
        t = tl.where(a < 0.04, small, big)
        return tl.where(y < 0.0, -t, t)

    @triton.jit
    def _label_weight(weight_ptr, label, live, in_range, ACC: tl.constexpr, ROWS: tl.constexpr, WEIGHTED: tl.constexpr):
        """w_y per row, the class weight of its label (1 without weights; only without label smoothing)."""
        if WEIGHTED:
            return tl.load(weight_ptr + label, mask=live & in_range, other=1.0).to(ACC)
        return tl.full([ROWS], 1.0, ACC)

    @triton.jit
    def _target_weights(
        weight_ptr,
        label,
        live,
        in_range,
        sum_q,
        alpha,
        ACC: tl.constexpr,
        ROWS: tl.constexpr,
        WEIGHTED: tl.constexpr,
        SOFT: tl.constexpr,
        DENSE: tl.constexpr,
    ):
        """(w_y, W) per row: the label's class weight (1 without weights or labels) and W = Σ_j q̃_j, from
        ``sum_q`` = Σ_j q̄_j where q̃ has a DENSE part q̄ (:func:`_spread_target`). Otherwise q̃ is w_y times a
        distribution and W = w_y."""
        # One return: the compiler checks every return after a taken constexpr branch against the others.
        label_weight = _label_weight(weight_ptr, label, live, in_range, ACC, ROWS, WEIGHTED and not SOFT)
        if SOFT:
            total = sum_q
        elif DENSE:
            total = (1.0 - alpha) * label_weight + sum_q
        else:
            total = label_weight
        return label_weight, total

    @triton.jit
    def _label_part(label, label_weight, col, alpha, WEIGHTED: tl.constexpr):
        """(1 − α)·w_y·e_y on a [ROWS, BLOCK_V] tile of columns ``col``: the label's part of q̃."""
        part = tl.where(col[None, :] == label[:, None], 1.0 - alpha, 0.0)
        if WEIGHTED:
            part = part * label_weight[:, None]
        return part

    @triton.jit
    def _spread_target(
        t_ptrs,
        weight_ptr,
        col,
        mask,
        alpha,
        V,
        ACC: tl.constexpr,
        SOFT: tl.constexpr,
        WEIGHTED: tl.constexpr,
        DENSE: tl.constexpr,
    ):
        """q̄, q̃ less the label's part: the scalar α/V unless DENSE; else a [ROWS, BLOCK_V] tile, 0 where ``mask``
        is not, of w ⊙ ((1 − α)·t + α/V) for probabilities t (rows at ``t_ptrs``), (α/V)·w for class indices."""
        if not DENSE:
            q = alpha / V
        else:
            if SOFT:
                t = tl.load(t_ptrs[:, None] + col[None, :], mask=mask, other=0.0).to(ACC)
                q = tl.where(mask, (1.0 - alpha) * t + alpha / V, 0.0)
            else:
                q = tl.where(mask, alpha / V, 0.0)
            if WEIGHTED:
                q = q * tl.load(weight_ptr + col, mask=col < V, other=0.0).to(ACC)[None, :]
        return q

    @triton.jit
    def _dense_target_sum(
        t_ptrs,
        weight_ptr,
        live,
        V,
        alpha,
        ACC: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        SOFT: tl.constexpr,
        WEIGHTED: tl.constexpr,
    ):
        """Σ_j q̄_j per row in a sweep of its own: the backward writes from its first tile, so it needs W first."""
        cols = tl.arange(0, BLOCK_V)
        total = tl.zeros([ROWS], ACC)
        for start in range(0, V, BLOCK_V):
            col = start + cols
            mask = live[:, None] & (col < V)[None, :]
            total += tl.sum(_spread_target(t_ptrs, weight_ptr, col, mask, alpha, V, ACC, SOFT, WEIGHTED, True), axis=1)
        return total

    @triton.jit
    def _program_rows(
        target_ptr,
        N,
        V,
        ignore_index,
        shift_period,
        ROWS: tl.constexpr,
        SHIFTED: tl.constexpr,
        SOFT: tl.constexpr = False,
    ):
        """This program's ROWS rows: their indices, which exist, their labels, which are live (not ignored)
        and whose label is in [0, V). Row r's label is target[r], or (SHIFTED) target[r + 1] with the last
        step of each sequence of ``shift_period`` rows ignored; the period is a runtime value, so a new
        sequence length never recompiles. SOFT (probability targets): every row is live and has no label
        (0 here, never read)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < N
        if SOFT:
            label = tl.zeros([ROWS], tl.int64)
            live = row_mask
            in_range = row_mask
        else:
            if not SHIFTED:
                label = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
            else:
                last_step = (rows + 1) % shift_period == 0
                label = tl.load(target_ptr + rows + 1, mask=row_mask & ~last_step, other=ignore_index)
            live = row_mask & (label != ignore_index)
            in_range = (label >= 0) & (label < V)
        return rows, row_mask, label, live, in_range

    @triton.jit
    def _row_stats(
        z_ptrs,
        u_ptrs,
        live,
        V,
        ACC: tl.constexpr,
        WITH_U: tl.constexpr,
        SUMS: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        cap=1.0,
        CAP: tl.constexpr = False,
        u_live=None,
        TANGENTS: tl.constexpr = 1,
        t_ptrs=None,
        weight_ptr=None,
        alpha=0.0,
        DENSE: tl.constexpr = False,
        SOFT: tl.constexpr = False,
        WEIGHTED: tl.constexpr = False,
    ):
        """Sweep 1: online max, Σ e^{z−max}, ⟨e^{z−max}, u⟩, Σz, Σu over [ROWS, V] rows, tile by tile.

        ``z_ptrs`` point at column 0 of each row; ``live`` masks the rows to read at all. With u, ``u_ptrs``
        and ``u_live`` are [TANGENTS, ROWS]: column 0 of each tangent's rows and which to read, and the u sums
        come back [TANGENTS, ROWS] (the logits read once for all tangents). CAP: the logits are capped,
        z = cap·tanh(x/cap), and u is replaced by J⊙u with J = 1 − tanh². DENSE: the sums are Σq̄⊙z and Σq̄⊙u
        instead, with q̄ of :func:`_spread_target`, and Σq̄ comes back last (0 otherwise)."""
        cols = tl.arange(0, BLOCK_V)
        running_max = tl.full([ROWS], float("-inf"), ACC)
        sum_exp = tl.zeros([ROWS], ACC)
        sum_exp_u = tl.zeros([TANGENTS, ROWS], ACC)
        sum_z = tl.zeros([ROWS], ACC)
        sum_u = tl.zeros([TANGENTS, ROWS], ACC)
        sum_q = tl.zeros([ROWS], ACC)
        for start in range(0, V, BLOCK_V):
            mask = live[:, None] & (start + cols < V)[None, :]
            if DENSE:
                q = _spread_target(t_ptrs, weight_ptr, start + cols, mask, alpha, V, ACC, SOFT, WEIGHTED, True)
                sum_q += tl.sum(q, axis=1)
            z = tl.load(z_ptrs[:, None] + (start + cols)[None, :], mask=mask, other=float("-inf")).to(ACC)
            if CAP:
                t = _tanh(z / cap)
                z = tl.where(mask, cap * t, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            # While a row has seen only -inf, shift by 0: e^{-inf} = 0 and a NaN still propagates.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(running_max - shift)
            e = tl.exp(z - shift[:, None])
            sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
            if WITH_U:
                u_mask = u_live[:, :, None] & (start + cols < V)[None, None, :]
                u = tl.load(u_ptrs[:, :, None] + (start + cols)[None, None, :], mask=u_mask, other=0.0).to(ACC)
                if CAP:
                    u = u * (1.0 - t * t)[None, :, :]
                sum_exp_u = sum_exp_u * rescale[None, :] + tl.sum(e[None, :, :] * u, axis=2)
                if DENSE:
                    sum_u += tl.sum(q[None, :, :] * u, axis=2)
                elif SUMS:
                    sum_u += tl.sum(u, axis=2)
            if DENSE:
                sum_z += tl.sum(q * tl.where(mask, z, 0.0), axis=1)
            elif SUMS:
                sum_z += tl.sum(tl.where(mask, z, 0.0), axis=1)
            running_max = new_max
        return running_max, sum_exp, sum_exp_u, sum_z, sum_u, sum_q

    @triton.jit
    def _forward_kernel(
        logits_ptr,
        row_stride,
        target_ptr,
        target_row_stride,
        weight_ptr,
        loss_ptr,
        lse_ptr,
        N,
        V,
        ignore_index,
        smoothing_hi,
        smoothing_lo,
        z_loss_hi,
        z_loss_lo,
        cap_hi,
        cap_lo,
        ACC: tl.constexpr,
        SMOOTHING: tl.constexpr,
        Z_LOSS: tl.constexpr,
        CAP: tl.constexpr,
        WEIGHTED: tl.constexpr,
        SOFT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """SOFT: ``target_ptr`` holds (N, V) probabilities, rows ``target_row_stride`` apart."""
        DENSE: tl.constexpr = SOFT or (WEIGHTED and SMOOTHING)  # q̃ has a part on every class
        label_smoothing = _exact_scalar(smoothing_hi, smoothing_lo, ACC)
        cap = _exact_scalar(cap_hi, cap_lo, ACC)
        rows, row_mask, label, live, in_range = _program_rows(target_ptr, N, V, ignore_index, 0, ROWS, False, SOFT)
        z_ptrs = logits_ptr + rows * row_stride
        t_ptrs = target_ptr + rows * target_row_stride
        running_max, sum_exp, _, sum_z, _, sum_q = _row_stats(
            z_ptrs,
            z_ptrs,
            live,
            V,
            ACC,
            False,
            SMOOTHING,
            ROWS,
            BLOCK_V,
            cap,
            CAP,
            t_ptrs=t_ptrs,
            weight_ptr=weight_ptr,
            alpha=label_smoothing,
            DENSE=DENSE,
            SOFT=SOFT,
            WEIGHTED=WEIGHTED,
        )
        lse = running_max + tl.log(sum_exp)
        if not SOFT:
            z_label = tl.load(z_ptrs + label, mask=live & in_range, other=0.0).to(ACC)
            if CAP:
                z_label = cap * _tanh(z_label / cap)
        if DENSE:
            # W·lse − ⟨q̃, z⟩ with q̃ = q̄ (+ the label's (1 − α)·w_y·e_y), W = Σq̄ (+ (1 − α)·w_y).
            loss = sum_q * lse - sum_z
            if not SOFT:
                label_weight = _label_weight(weight_ptr, label, live, in_range, ACC, ROWS, WEIGHTED)
                loss += (1.0 - label_smoothing) * label_weight * (lse - z_label)
        else:
            loss = lse - (1.0 - label_smoothing) * z_label
            if SMOOTHING:
                loss -= label_smoothing / V * sum_z
            if WEIGHTED:
                loss = loss * _label_weight(weight_ptr, label, live, in_range, ACC, ROWS, WEIGHTED)
        if Z_LOSS:
            loss += _exact_scalar(z_loss_hi, z_loss_lo, ACC) * lse * lse
        loss = tl.where(in_range, loss, float("nan"))  # a bad label is never a silent number
        tl.store(loss_ptr + rows, tl.where(live, loss, 0.0), mask=row_mask)
        tl.store(lse_ptr + rows, tl.where(live, lse, 0.0), mask=row_mask)

    @triton.jit
    def _backward_kernel(
        logits_ptr,
        row_stride,
        target_ptr,
        target_row_stride,
        weight_ptr,
        lse_ptr,
        scale_ptr,
        scale_stride,
        grad_ptr,
        N,
        V,
        class_offset,
        num_classes,
        ignore_index,
        smoothing_hi,
        smoothing_lo,
        z_loss_hi,
        z_loss_lo,
        cap_hi,
        cap_lo,
        ACC: tl.constexpr,
        SMOOTHING: tl.constexpr,
        Z_LOSS: tl.constexpr,
        CAP: tl.constexpr,
        WEIGHTED: tl.constexpr,
        SOFT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """The gradient over V columns starting at ``class_offset`` of ``num_classes`` (a vocabulary shard;
        0 and V for whole rows, the only case with variants): scale·(a·p − q̃) with a = W + 2λ·lse."""
        DENSE: tl.constexpr = SOFT or (WEIGHTED and SMOOTHING)  # q̃ has a part on every class
        label_smoothing = _exact_scalar(smoothing_hi, smoothing_lo, ACC)
        rows, row_mask, label, live, in_range = _program_rows(
            target_ptr, N, num_classes, ignore_index, 0, ROWS, False, SOFT
        )
        t_ptrs = target_ptr + rows * target_row_stride
        lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
        scale = tl.load(scale_ptr + rows * scale_stride, mask=live, other=0.0)
        scale = tl.where(live, tl.where(in_range, scale, float("nan")), 0.0)
        sum_q = 0.0
        if DENSE:
            sum_q = _dense_target_sum(t_ptrs, weight_ptr, live, V, label_smoothing, ACC, ROWS, BLOCK_V, SOFT, WEIGHTED)
        label_weight, a = _target_weights(
            weight_ptr, label, live, in_range, sum_q, label_smoothing, ACC, ROWS, WEIGHTED, SOFT, DENSE
        )
        if Z_LOSS:
            a += 2.0 * _exact_scalar(z_loss_hi, z_loss_lo, ACC) * lse
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            col = start + cols
            mask = row_mask[:, None] & (col < V)[None, :]
            z = tl.load(
                logits_ptr + rows[:, None] * row_stride + col[None, :], mask=mask & live[:, None], other=0.0
            ).to(ACC)
            if CAP:
                cap = _exact_scalar(cap_hi, cap_lo, ACC)
                t = _tanh(z / cap)
                z = cap * t
            p = tl.exp(z - lse[:, None])
            if Z_LOSS or WEIGHTED or SOFT:
                p = a[:, None] * p
            grad = p - _spread_target(
                t_ptrs, weight_ptr, col, mask & live[:, None], label_smoothing, num_classes, ACC, SOFT, WEIGHTED, DENSE
            )
            if not SOFT:
                grad -= _label_part(label, label_weight, col + class_offset, label_smoothing, WEIGHTED)
            grad = scale[:, None] * grad
            if CAP:
                grad = grad * (1.0 - t * t)
            grad = tl.where(live[:, None], grad, 0.0)
            tl.store(grad_ptr + rows[:, None] * V + col[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["shift_period"])
    def _hvp_kernel(
        logits_ptr,
        row_stride,
        target_ptr,
        target_row_stride,
        weight_ptr,
        u_ptr,
        u_tangent_stride,
        u_row_stride,
        scale_ptr,
        scale_stride,
        out_ptr,
        out_tangent_stride,
        out_row_stride,
        dot_ptr,
        K,
        N,
        V,
        ignore_index,
        smoothing_hi,
        smoothing_lo,
        z_loss_hi,
        z_loss_lo,
        cap_hi,
        cap_lo,
        shift_period,
        SHIFTED: tl.constexpr,
        ACC: tl.constexpr,
        SMOOTHING: tl.constexpr,
        Z_LOSS: tl.constexpr,
        CAP: tl.constexpr,
        WEIGHTED: tl.constexpr,
        SOFT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        TANGENTS: tl.constexpr,
    ):
        """The HVP of ROWS rows for all K tangents (TANGENTS ≥ K, a power of two): row values are [ROWS],
        tangent values [TANGENTS, ROWS], tiles [TANGENTS, ROWS, BLOCK_V]; each logits tile is read once per
        sweep for every tangent. SOFT: (N, V) probabilities as in :func:`_forward_kernel` (not SHIFTED)."""
        DENSE: tl.constexpr = SOFT or (WEIGHTED and SMOOTHING)  # q̃ has a part on every class
        label_smoothing = _exact_scalar(smoothing_hi, smoothing_lo, ACC)
        rows, row_mask, label, live, in_range = _program_rows(
            target_ptr, N, V, ignore_index, shift_period, ROWS, SHIFTED, SOFT
        )
        tangent = tl.arange(0, TANGENTS).to(tl.int64)
        tangent_mask = (tangent < K)[:, None] & row_mask[None, :]
        u_live = tangent_mask & live[None, :]
        z_ptrs = logits_ptr + rows * row_stride
        u_ptrs = u_ptr + tangent[:, None] * u_tangent_stride + rows[None, :] * u_row_stride
        t_ptrs = target_ptr + rows * target_row_stride
        cap = _exact_scalar(cap_hi, cap_lo, ACC)
        running_max, sum_exp, sum_exp_u, _, sum_u, sum_q = _row_stats(
            z_ptrs,
            u_ptrs,
            live,
            V,
            ACC,
            True,
            SMOOTHING,
            ROWS,
            BLOCK_V,
            cap,
            CAP,
            u_live,
            TANGENTS,
            t_ptrs=t_ptrs,
            weight_ptr=weight_ptr,
            alpha=label_smoothing,
            DENSE=DENSE,
            SOFT=SOFT,
            WEIGHTED=WEIGHTED,
        )
        p_dot_u = sum_exp_u / sum_exp[None, :]  # ⟨p, J⊙u⟩ with a cap
        scale = tl.load(scale_ptr + rows * scale_stride, mask=live, other=0.0).to(ACC)
        weight = tl.where(live, tl.where(in_range, scale / sum_exp, float("nan")), 0.0)
        # H = a·(diag p − p pᵀ) + 2λ·p pᵀ with a = W + 2λ·lse, so H u = p ⊙ (a·u − (a − 2λ)·⟨p, u⟩); W = 1
        # without class weights or probabilities.
        label_weight, a = _target_weights(
            weight_ptr, label, live, in_range, sum_q, label_smoothing, ACC, ROWS, WEIGHTED, SOFT, DENSE
        )
        shift = p_dot_u
        two_lambda = 0.0
        if Z_LOSS:
            two_lambda = 2.0 * _exact_scalar(z_loss_hi, z_loss_lo, ACC)
            a += two_lambda * (running_max + tl.log(sum_exp))
        if Z_LOSS or WEIGHTED or SOFT:
            shift = (a - two_lambda)[None, :] * p_dot_u
        cols = tl.arange(0, BLOCK_V)
        out_ptrs = out_ptr + tangent[:, None] * out_tangent_stride + rows[None, :] * out_row_stride
        # Sweep 2: recompute p tile by tile and write; ignored rows load nothing and store zeros.
        for start in range(0, V, BLOCK_V):
            col = start + cols
            mask = row_mask[:, None] & (col < V)[None, :]
            read = mask & live[:, None]
            z = tl.load(z_ptrs[:, None] + col[None, :], mask=read, other=0.0).to(ACC)
            u = tl.load(
                u_ptrs[:, :, None] + col[None, None, :], mask=u_live[:, :, None] & read[None, :, :], other=0.0
            ).to(ACC)
            if CAP:
                # J⊙H_z(J⊙u) + g⊙z''⊙u with t = tanh(x/c), J = 1 − t², z'' = −(2/c)·t·J, g = a·p − q̃.
                t = _tanh(z / cap)
                jacobian = 1.0 - t * t
                p = weight[:, None] * tl.exp(cap * t - running_max[:, None])
                h = (a[:, None] * p)[None, :, :] * (jacobian[None, :, :] * u - p_dot_u[:, :, None]) + (two_lambda * p)[
                    None, :, :
                ] * p_dot_u[:, :, None]
                q = _spread_target(t_ptrs, weight_ptr, col, read, label_smoothing, V, ACC, SOFT, WEIGHTED, DENSE)
                if not SOFT:
                    q = q + _label_part(label, label_weight, col, label_smoothing, WEIGHTED)
                g = a[:, None] * p - q * tl.where(live, scale, 0.0)[:, None]
                hvp = jacobian[None, :, :] * h + (g * (-2.0 / cap) * t * jacobian)[None, :, :] * u
            else:
                if Z_LOSS or WEIGHTED or SOFT:
                    u = a[None, :, None] * u
                p = weight[:, None] * tl.exp(z - running_max[:, None])
                hvp = p[None, :, :] * (u - shift[:, :, None])
            hvp = tl.where(live[None, :, None], hvp, 0.0)
            tl.store(
                out_ptrs[:, :, None] + col[None, None, :],
                hvp.to(out_ptr.dtype.element_ty),
                mask=tangent_mask[:, :, None] & mask[None, :, :],
            )
        # ⟨J⊙u, g⟩ = a·⟨p, J⊙u⟩ − ⟨q̃, J⊙u⟩: the label's part here, q̄'s from the sweep (Σ(J⊙u) without DENSE).
        dot = a[None, :] * p_dot_u
        if not SOFT:
            u_label = tl.load(u_ptrs + label[None, :], mask=u_live & in_range[None, :], other=0.0).to(ACC)
            if CAP:
                t_label = _tanh(tl.load(z_ptrs + label, mask=live & in_range, other=0.0).to(ACC) / cap)
                u_label = u_label * (1.0 - t_label * t_label)[None, :]
            dot -= ((1.0 - label_smoothing) * label_weight)[None, :] * u_label
        if DENSE:
            dot -= sum_u
        elif SMOOTHING:
            dot -= label_smoothing / V * sum_u
        dot = tl.where(in_range[None, :], dot, float("nan"))
        tl.store(dot_ptr + tangent[:, None] * N + rows[None, :], tl.where(live[None, :], dot, 0.0), mask=tangent_mask)

    @triton.jit
    def _stats_kernel(
        logits_ptr,
        row_stride,
        target_ptr,
        u_ptr,
        u_row_stride,
        stats_ptr,
        N,
        V,
        class_offset,
        num_classes,
        ignore_index,
        ACC: tl.constexpr,
        WITH_U: tl.constexpr,
        SMOOTHING: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """A shard's part of each row's statistics (``LossKernels.partial_stats``): sweep 1 of the HVP
        (of the forward without u), and w (u, or z without u) at the label where the label is in this shard."""
        rows, row_mask, label, live, in_range = _program_rows(target_ptr, N, num_classes, ignore_index, 0, ROWS, False)
        z_ptrs = logits_ptr + rows * row_stride
        u_ptrs = u_ptr + rows * u_row_stride
        running_max, sum_exp, sum_exp_u, sum_z, sum_u, _ = _row_stats(
            z_ptrs, u_ptrs[None, :], live, V, ACC, WITH_U, SMOOTHING, ROWS, BLOCK_V, u_live=live[None, :]
        )
        sum_exp_u = tl.sum(sum_exp_u, axis=0)  # the one tangent's [ROWS]
        sum_u = tl.sum(sum_u, axis=0)
        column = label - class_offset
        in_shard = live & (column >= 0) & (column < V)
        w_ptrs = u_ptrs if WITH_U else z_ptrs
        at_label = tl.load(w_ptrs + column, mask=in_shard, other=0.0).to(ACC)
        at_label = tl.where(in_range, at_label, float("nan"))
        total = sum_u if WITH_U else sum_z
        out = stats_ptr + rows * 5
        tl.store(out, tl.where(live, running_max, 0.0), mask=row_mask)
        tl.store(out + 1, tl.where(live, sum_exp, 0.0), mask=row_mask)
        tl.store(out + 2, tl.where(live, sum_exp_u, 0.0), mask=row_mask)
        tl.store(out + 3, tl.where(live, at_label, 0.0), mask=row_mask)
        tl.store(out + 4, tl.where(live, total, 0.0), mask=row_mask)

    @triton.jit
    def _shard_hvp_kernel(
        logits_ptr,
        row_stride,
        target_ptr,
        u_ptr,
        u_row_stride,
        lse_ptr,
        p_dot_u_ptr,
        scale_ptr,
        scale_stride,
        out_ptr,
        out_row_stride,
        N,
        V,
        num_classes,
        ignore_index,
        ACC: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """A shard's HVP given the whole rows' lse and ⟨p, u⟩: scale · e^{z − lse} ⊙ (u − ⟨p, u⟩)."""
        rows, row_mask, _, live, in_range = _program_rows(target_ptr, N, num_classes, ignore_index, 0, ROWS, False)
        lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
        p_dot_u = tl.load(p_dot_u_ptr + rows, mask=live, other=0.0)
        scale = tl.load(scale_ptr + rows * scale_stride, mask=live, other=0.0).to(ACC)
        scale = tl.where(live, tl.where(in_range, scale, float("nan")), 0.0)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            col = start + cols
            mask = row_mask[:, None] & (col < V)[None, :]
            read = mask & live[:, None]
            z = tl.load(logits_ptr + rows[:, None] * row_stride + col[None, :], mask=read, other=0.0).to(ACC)
            u = tl.load(u_ptr + rows[:, None] * u_row_stride + col[None, :], mask=read, other=0.0).to(ACC)
            hvp = scale[:, None] * tl.exp(z - lse[:, None]) * (u - p_dot_u[:, None])
            hvp = tl.where(live[:, None], hvp, 0.0)
            tl.store(
                out_ptr + rows[:, None] * out_row_stride + col[None, :], hvp.to(out_ptr.dtype.element_ty), mask=mask
            )


# Tile width: a power of two, at most MAX_BLOCK_V columns; rows per program fill a TILE-element tile.
MAX_BLOCK_V = 4096
TILE = 4096


def _launch_shape(n: int, v: int, tangents: int = 1) -> tuple[tuple[int], int, int]:
    """The grid, rows per program and tile width for (N, V) rows; a program of the HVP holds a tile of each
    of ``tangents`` (a power of two) tangents, so its tile is that many times narrower."""
    block_v = min(max(1, MAX_BLOCK_V // tangents), triton.next_power_of_2(max(v, 1)))
    rows = min(max(1, TILE // (block_v * tangents)), triton.next_power_of_2(max(n, 1)))
    return (triton.cdiv(n, rows),), rows, block_v


def _split(value: float) -> tuple[float, float]:
    """``value`` as fp32 high and low parts whose sum is ``value`` to about 2^-48."""
    (high,) = struct.unpack("f", struct.pack("f", value))
    return high, value - high


def _accumulator(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def _variant_inputs(
    op: str, logits: torch.Tensor, target: torch.Tensor, hyperparameters: CrossEntropyLossHyperparameters
) -> tuple[torch.Tensor, int]:
    """The class weights as the kernels read them (dense; the logits, unread, without weights) and the row stride
    of probability targets (0 for class indices), both checked against the (N, V) logits before any launch:
    ValueError for weights not (V,) in the logits' dtype and on their device, or probabilities not (N, V) in
    the logits' dtype and on their device with a dense last dimension."""
    n, v = logits.shape
    weight = hyperparameters.weight
    if weight is None:
        weight = logits
    elif weight.shape != (v,) or weight.dtype != logits.dtype or weight.device != logits.device:
        raise ValueError(
            f"{op}: weight must be ({v},) {logits.dtype} on {logits.device}, got {tuple(weight.shape)} "
            f"{weight.dtype} on {weight.device}"
        )
    else:
        weight = weight.contiguous()
    if not is_soft(target):
        return weight, 0
    if (
        target.shape != logits.shape
        or target.dtype != logits.dtype
        or target.device != logits.device
        or (n and v > 1 and target.stride(1) != 1)
    ):
        raise ValueError(
            f"{op}: probability targets must be {tuple(logits.shape)} {logits.dtype} on {logits.device} with a "
            f"dense last dimension, got {tuple(target.shape)} {target.dtype} on {target.device} with strides "
            f"{target.stride()}"
        )
    return weight, _row_stride(target)


def _cap(hyperparameters: CrossEntropyLossHyperparameters) -> float:
    """The soft cap c, 1 (unused) without one."""
    return 1.0 if hyperparameters.softcap is None else hyperparameters.softcap


def _row_stride(tensor: torch.Tensor) -> int:
    return tensor.stride(0) if tensor.shape[0] > 1 else tensor.shape[1]


@register("cross_entropy", "triton")
class TritonCrossEntropy:
    """The Triton kernels; the contract is :class:`curvkern.families.LossKernels`."""

    VARIANTS: frozenset[str] = frozenset(
        {"z_loss", "softcap", "weight", "weight with label smoothing", "probability targets"}
    )

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, hyperparameters: CrossEntropyLossHyperparameters):
        refuse_variants("triton", TritonCrossEntropy.VARIANTS, hyperparameters, target)
        weight, target_row_stride = _variant_inputs("curvkern.ce triton forward", logits, target, hyperparameters)
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        n, v = logits.shape
        loss = torch.empty(n, dtype=accumulation_dtype(logits.dtype), device=logits.device)
        lse = torch.empty_like(loss)
        if n:
            grid, rows, block_v = _launch_shape(n, v)
            _forward_kernel[grid](
                logits,
                _row_stride(logits),
                target,
                target_row_stride,
                weight,
                loss,
                lse,
                n,
                v,
                ignore_index,
                *_split(label_smoothing),
                *_split(hyperparameters.z_loss),
                *_split(_cap(hyperparameters)),
                ACC=_accumulator(logits.dtype),
                SMOOTHING=label_smoothing != 0,
                Z_LOSS=hyperparameters.z_loss != 0,
                CAP=hyperparameters.softcap is not None,
                WEIGHTED=hyperparameters.weight is not None,
                SOFT=is_soft(target),
                ROWS=rows,
                BLOCK_V=block_v,
            )
        return loss, lse

    @staticmethod
    def backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        hyperparameters: CrossEntropyLossHyperparameters,
    ):
        refuse_variants("triton", TritonCrossEntropy.VARIANTS, hyperparameters, target)
        weight, target_row_stride = _variant_inputs("curvkern.ce triton backward", logits, target, hyperparameters)
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        n, v = logits.shape
        grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
        if n:
            grid, rows, block_v = _launch_shape(n, v)
            _backward_kernel[grid](
                logits,
                _row_stride(logits),
                target,
                target_row_stride,
                weight,
                lse,
                grad_scale,
                0 if grad_scale.dim() == 0 else grad_scale.stride(0),
                grad,
                n,
                v,
                0,
                v,
                ignore_index,
                *_split(label_smoothing),
                *_split(hyperparameters.z_loss),
                *_split(_cap(hyperparameters)),
                ACC=_accumulator(logits.dtype),
                SMOOTHING=label_smoothing != 0,
                Z_LOSS=hyperparameters.z_loss != 0,
                CAP=hyperparameters.softcap is not None,
                WEIGHTED=hyperparameters.weight is not None,
                SOFT=is_soft(target),
                ROWS=rows,
                BLOCK_V=block_v,
            )
        return grad

    @staticmethod
    def hvp(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor,
        scale: torch.Tensor,
        hyperparameters: CrossEntropyLossHyperparameters,
        shift_period: int,
        out: torch.Tensor,
        out_is_callers: bool = False,
    ):
        refuse_variants("triton", TritonCrossEntropy.VARIANTS, hyperparameters, target)
        tangents = check_hvp_tangents("curvkern.ce triton hvp", logits, u, out)
        weight, target_row_stride = _variant_inputs("curvkern.ce triton hvp", logits, target, hyperparameters)
        if shift_period and is_soft(target):
            raise NotImplementedError("the causal shift takes class indices, not probability targets")
        ignore_index, label_smoothing = hyperparameters.ignore_index, hyperparameters.label_smoothing
        n, v = logits.shape
        dot = torch.empty(u.shape[:-1], dtype=accumulation_dtype(logits.dtype), device=logits.device)
        if n and tangents:
            padded = triton.next_power_of_2(tangents)
            grid, rows, block_v = _launch_shape(n, v, padded)
            _hvp_kernel[grid](
                logits,
                _row_stride(logits),
                target,
                target_row_stride,
                weight,
                u,
                u.stride(0) if u.dim() == 3 else 0,
                u.stride(-2),
                scale,
                0 if scale.dim() == 0 else scale.stride(0),
                out,
                out.stride(0) if out.dim() == 3 else 0,
                out.stride(-2) if n > 1 else v,
                dot,
                tangents,
                n,
                v,
                ignore_index,
                *_split(label_smoothing),
                *_split(hyperparameters.z_loss),
                *_split(_cap(hyperparameters)),
                shift_period,
                SHIFTED=shift_period != 0,
                ACC=_accumulator(logits.dtype),
                SMOOTHING=label_smoothing != 0,
                Z_LOSS=hyperparameters.z_loss != 0,
                CAP=hyperparameters.softcap is not None,
                WEIGHTED=hyperparameters.weight is not None,
                SOFT=is_soft(target),
                ROWS=rows,
                BLOCK_V=block_v,
                TANGENTS=padded,
            )
        return dot

    @staticmethod
    def partial_stats(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor | None,
        class_offset: int,
        num_classes: int,
        hyperparameters: CrossEntropyLossHyperparameters,
    ):
        check_shard_inputs("partial_stats", logits, target, class_offset, num_classes, {"u": u}, {})
        n, v = logits.shape
        stats = torch.empty((n, 5), dtype=accumulation_dtype(logits.dtype), device=logits.device)
        if n:
            grid, rows, block_v = _launch_shape(n, v)
            _stats_kernel[grid](
                logits,
                _row_stride(logits),
                target,
                logits if u is None else u,
                _row_stride(logits if u is None else u),
                stats,
                n,
                v,
                class_offset,
                num_classes,
                hyperparameters.ignore_index,
                ACC=_accumulator(logits.dtype),
                WITH_U=u is not None,
                SMOOTHING=hyperparameters.label_smoothing != 0,
                ROWS=rows,
                BLOCK_V=block_v,
            )
        return stats

    @staticmethod
    def shard_backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        class_offset: int,
        num_classes: int,
        hyperparameters: CrossEntropyLossHyperparameters,
    ):
        check_shard_inputs(
            "shard_backward", logits, target, class_offset, num_classes, {}, {"lse": lse, "grad_scale": grad_scale}
        )
        n, v = logits.shape
        grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
        if n:
            grid, rows, block_v = _launch_shape(n, v)
            _backward_kernel[grid](
                logits,
                _row_stride(logits),
                target,
                0,
                logits,  # no class weights on a shard (weight_ptr unread)
                lse,
                grad_scale,
                0 if grad_scale.dim() == 0 else grad_scale.stride(0),
                grad,
                n,
                v,
                class_offset,
                num_classes,
                hyperparameters.ignore_index,
                *_split(hyperparameters.label_smoothing),
                0.0,
                0.0,
                1.0,
                0.0,
                ACC=_accumulator(logits.dtype),
                SMOOTHING=hyperparameters.label_smoothing != 0,
                Z_LOSS=False,
                CAP=False,
                WEIGHTED=False,
                SOFT=False,
                ROWS=rows,
                BLOCK_V=block_v,
            )
        return grad

    @staticmethod
    def shard_hvp(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor,
        lse: torch.Tensor,
        p_dot_u: torch.Tensor,
        scale: torch.Tensor,
        num_classes: int,
        hyperparameters: CrossEntropyLossHyperparameters,
        out: torch.Tensor,
    ):
        check_shard_inputs(
            "shard_hvp",
            logits,
            target,
            0,
            num_classes,
            {"u": u, "out": out},
            {"lse": lse, "p_dot_u": p_dot_u, "scale": scale},
        )
        n, v = logits.shape
        if n:
            grid, rows, block_v = _launch_shape(n, v)
            _shard_hvp_kernel[grid](
                logits,
                _row_stride(logits),
                target,
                u,
                u.stride(0),
                lse,
                p_dot_u,
                scale,
                0 if scale.dim() == 0 else scale.stride(0),
                out,
                _row_stride(out),
                n,
                v,
                num_classes,
                hyperparameters.ignore_index,
                ACC=_accumulator(logits.dtype),
                ROWS=rows,
                BLOCK_V=block_v,
            )
