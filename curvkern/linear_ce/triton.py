"""The Triton linear cross-entropy kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``), with the eager
reference's signatures (:class:`curvkern.families.LinearLossKernels`, docs/linear_cross_entropy.md).

Logits exist only as (:data:`BLOCK_N` × :data:`BLOCK_V`) register tiles, each the sum over d chunks of
:data:`BLOCK_D` of one ``tl.dot`` (fp32 ``input_precision="ieee"`` for fp32 and bf16 inputs, the inputs
converted to fp32 first, so bf16 products are exact; fp64 for fp64 inputs, which compiles to the f64
``mma.sync`` on sm_80+). Nothing of N·V elements is allocated.

Two kinds of program, so that every result is written by the one program that owns it, without atomics,
and two runs give the same bits:

- **row programs** (``_forward_kernel``, ``_rows_kernel``) own a row tile. They sweep the V tiles with the
  online softmax statistics (running max, Σ exp, the label's logit, Σ z, ⟨p, u⟩) and accumulate the
  products to hidden (g_z·W, (H u)·W + g_z·v_W), read-modify-writing only their own rows of the
  accumulation-dtype result.
- **column programs** (``_columns_kernel``) own a V tile of the weight (and bias) results. They sweep the
  row tiles in order, recompute the logits tile from the row statistics the row programs stored (lse,
  ⟨p, u⟩), and accumulate g_zᵀ·h (+ g_zᵀ·v_h) and Σ_r g_z into their own rows of dW and db.

The price of the deterministic scheme is that each logits tile is computed twice per backward (once per
kind of program), and three times in the HVP and the Gauss-Newton product (statistics, to-hidden
products, to-weight products); no (N, V) buffer and no atomics. K tangents are a loop inside the
programs over one logits tile: each logits tile is computed once per sweep for all K.

Results accumulate in the accumulation dtype (fp64 for fp64 inputs, fp32 otherwise) and are rounded to
the inputs' dtype once, by torch, at the end. Offsets are 64-bit (row and column indices are int64
before they meet a stride), any strides are accepted, and the reduction scale is read from a device
tensor: no host synchronization. Every input is checked on the host before a launch.

The loss variants (z-loss, soft cap, class weights; docs/linear_cross_entropy.md, "Loss variants") are
constexpr flags of every kernel (HAS_ZLOSS, HAS_SOFTCAP, HAS_WEIGHT), so the plain kernels carry none of
their code; their formulas live once, in the ``@triton.jit`` helpers the kernels share (``_gradient_tile``,
``_hessian_tile``, ``_row_factors``), with the cross-entropy kernels' tanh (:mod:`curvkern.ce.triton`).
"""

from __future__ import annotations

import importlib.util
import struct

import torch

from curvkern._dispatch import register
from curvkern.hyperparameters import CrossEntropyHyperparameters
from curvkern.linear_ce.eager import accumulation_dtype
from curvkern.linear_ce.variants import refuse_missing_variants

# Tile sizes: module constants read at every call, so tests can make them small. tl.dot needs at least 16
# in every dimension when compiled; the interpreter takes smaller tiles (the tests use 4 × 8 × 4).
BLOCK_N = 64
BLOCK_V = 64
BLOCK_D = 32

# Modes of the shared row and column kernels.
_BACKWARD, _HVP, _GGN = 0, 1, 2

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from curvkern.ce.triton import _exact_scalar, _label_weight, _tanh

    @triton.jit
    def _dot_tile(
        acc,
        a_ptr,
        a_s0,
        a_s1,
        a_idx,
        a_mask,
        b_ptr,
        b_s0,
        b_s1,
        b_idx,
        b_mask,
        D,
        ACC: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """``acc + a[a_idx, :D] · b[b_idx, :D]ᵀ``, over d chunks of BLOCK_D, the tiles converted to ACC."""
        ks = tl.arange(0, BLOCK_D)
        for start in range(0, D, BLOCK_D):
            k = (start + ks).to(tl.int64)
            k_mask = k < D
            a = tl.load(
                a_ptr + a_idx[:, None] * a_s0 + k[None, :] * a_s1, mask=a_mask[:, None] & k_mask[None, :], other=0.0
            )
            b = tl.load(
                b_ptr + b_idx[:, None] * b_s0 + k[None, :] * b_s1, mask=b_mask[:, None] & k_mask[None, :], other=0.0
            )
            acc = tl.dot(a.to(ACC), tl.trans(b.to(ACC)), acc, input_precision="ieee", out_dtype=ACC)
        return acc

    @triton.jit
    def _logits_tile(
        h_ptr,
        h_s0,
        h_s1,
        w_ptr,
        w_s0,
        w_s1,
        b_ptr,
        b_s0,
        rows,
        row_mask,
        cols,
        col_mask,
        D,
        HAS_BIAS: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """z = h[rows]·W[cols]ᵀ + b[cols], a (BLOCK_N, BLOCK_V) tile in ACC; 0 + b outside the masks."""
        z = tl.zeros([BLOCK_N, BLOCK_V], ACC)
        z = _dot_tile(z, h_ptr, h_s0, h_s1, rows, row_mask, w_ptr, w_s0, w_s1, cols, col_mask, D, ACC, BLOCK_D)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols * b_s0, mask=col_mask, other=0.0).to(ACC)[None, :]
        return z

    @triton.jit
    def _tangent_tile(
        k,
        h_ptr,
        h_s0,
        h_s1,
        w_ptr,
        w_s0,
        w_s1,
        vh_ptr,
        vh_sk,
        vh_s0,
        vh_s1,
        vw_ptr,
        vw_sk,
        vw_s0,
        vw_s1,
        vb_ptr,
        vb_sk,
        vb_s0,
        rows,
        row_mask,
        cols,
        col_mask,
        D,
        HAS_VH: tl.constexpr,
        HAS_VW: tl.constexpr,
        HAS_VB: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """The k-th tangent of the logits tile, u = v_h[k]·Wᵀ + h·v_W[k]ᵀ + v_b[k] (absent parts 0)."""
        u = tl.zeros([BLOCK_N, BLOCK_V], ACC)
        k = k + tl.zeros([], tl.int64)  # 64-bit before it meets a stride (k may be a literal 0)
        if HAS_VH:
            u = _dot_tile(
                u, vh_ptr + k * vh_sk, vh_s0, vh_s1, rows, row_mask, w_ptr, w_s0, w_s1, cols, col_mask, D, ACC, BLOCK_D
            )
        if HAS_VW:
            u = _dot_tile(
                u, h_ptr, h_s0, h_s1, rows, row_mask, vw_ptr + k * vw_sk, vw_s0, vw_s1, cols, col_mask, D, ACC, BLOCK_D
            )
        if HAS_VB:
            u += tl.load(vb_ptr + k * vb_sk + cols * vb_s0, mask=col_mask, other=0.0).to(ACC)[None, :]
        return u

    @triton.jit
    def _row_labels(target_ptr, rows, row_mask, V, ignore_index):
        label = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
        live = row_mask & (label != ignore_index)
        in_range = (label >= 0) & (label < V)
        return label, live, in_range

    @triton.jit
    def _row_weight(scale_ptr, scale_stride, rows, live, in_range, ACC: tl.constexpr):
        """s_r: the scale on live rows (NaN for a label outside [0, V)), exactly 0 on ignored rows (an infinite
        mean scale over zero valid rows is selected away, never multiplied)."""
        scale = tl.load(scale_ptr + rows * scale_stride, mask=live, other=0.0).to(ACC)
        return tl.where(live, tl.where(in_range, scale, float("nan")), 0.0)

    # --- The loss variants (docs/linear_cross_entropy.md, "Loss variants") -----------------------------------
    # Each helper takes its variant's constexpr flag and, with the flag off, returns its input or emits the
    # plain operations in the plain order: the plain kernels compute what they did before, bit for bit.
    # One return statement each: the compiler requires every return of a function to have one type.

    @triton.jit
    def _variant_scalars(smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, cap_hi, cap_lo, ACC: tl.constexpr):
        """α, λ and c, each rebuilt in ACC from the two fp32 halves the host split it into."""
        alpha = _exact_scalar(smoothing_hi, smoothing_lo, ACC)
        return alpha, _exact_scalar(z_loss_hi, z_loss_lo, ACC), _exact_scalar(cap_hi, cap_lo, ACC)

    @triton.jit
    def _capped(z, cap, HAS_SOFTCAP: tl.constexpr):
        """``(z', J)``: the logits the loss sees, c·tanh(z/c), and the cap's derivative 1 − tanh²; (z, 1)
        without a cap."""
        jacobian = 1.0
        if HAS_SOFTCAP:
            t = _tanh(z / cap)
            z = cap * t
            jacobian = 1.0 - t * t
        return z, jacobian

    @triton.jit
    def _class_weighted(values, cw_ptr, cols, col_mask, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr):
        """``values`` ⊙ w over a class tile (w = 0 outside it); ``values`` without class weights."""
        if HAS_WEIGHT:
            values = values * tl.load(cw_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        return values

    @triton.jit
    def _row_factors(
        cw_ptr,
        cw_sum_ptr,
        label,
        live,
        in_range,
        lse,
        alpha,
        z_loss,
        V,
        ACC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_ZLOSS: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
    ):
        """``(w_y, a)`` per row: the class weight of the label, and a = W + 2λ·lse, the factor of p in the
        gradient to z', where W = (1 − α)·w_y + (α/V)·Σ_j w_j is the total weight of the row's smoothed target
        (1 without class weights; ``cw_sum_ptr`` holds Σ_j w_j)."""
        w_y = _label_weight(cw_ptr, label, live, in_range, ACC, BLOCK_N, HAS_WEIGHT)
        total = w_y
        if HAS_WEIGHT:
            total = (1.0 - alpha) * w_y + alpha / V * tl.load(cw_sum_ptr).to(ACC)
        if HAS_ZLOSS:
            total = total + 2.0 * z_loss * lse
        return w_y, total

    @triton.jit
    def _gradient_tile(
        z,
        lse,
        scale,
        a,
        w_y,
        label,
        cols,
        col_mask,
        live,
        cw_ptr,
        alpha,
        V,
        cap,
        ACC: tl.constexpr,
        HAS_ZLOSS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
    ):
        """Over one tile of the logits z: ``(p, J, g_z, s·g' ⊙ z'')``. p = softmax(z') (0 outside the live rows
        and the columns), J the cap's derivative, g' = a·p − q̃ the gradient to z' with q̃ = (1 − α)·w_y·e_y +
        (α/V)·w the weighted smoothed target, g_z = s·J ⊙ g' the gradient to z (the plain s·(p − q) without
        variants), and the cap's curvature term with z'' = −(2z'/c²)·J (0 without a cap)."""
        valid = live[:, None] & col_mask[None, :]
        z, jacobian = _capped(z, cap, HAS_SOFTCAP)
        p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
        target_part = tl.where(cols[None, :] == label[:, None], 1.0 - alpha, 0.0)
        if HAS_WEIGHT:
            target_part = target_part * w_y[:, None]
        scaled_p = p
        if HAS_ZLOSS or HAS_WEIGHT:
            scaled_p = a[:, None] * p
        grad_capped = scaled_p - _class_weighted(alpha / V, cw_ptr, cols, col_mask, ACC, HAS_WEIGHT) - target_part
        curvature = 0.0
        if HAS_SOFTCAP:
            curvature = scale[:, None] * grad_capped * (-2.0 / (cap * cap)) * z * jacobian
            grad_capped = jacobian * grad_capped
        return p, jacobian, tl.where(valid, scale[:, None] * grad_capped, 0.0), curvature

    @triton.jit
    def _hessian_tile(
        u,
        p,
        p_dot_u,
        scale,
        a,
        z_loss,
        jacobian,
        curvature,
        valid,
        HAS_ZLOSS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
    ):
        """s·(H_z u) over one tile, from ``p_dot_u`` = ⟨p, J⊙u⟩ and :func:`_gradient_tile`'s p, J and curvature:
        J ⊙ s·[a·p ⊙ (J⊙u − ⟨p, J⊙u⟩) + 2λ·p·⟨p, J⊙u⟩] + s·g' ⊙ z'' ⊙ u; the plain s·p ⊙ (u − ⟨p, u⟩) without
        variants. 0 outside ``valid``."""
        v = u
        if HAS_SOFTCAP:
            v = jacobian * u
        difference = v - p_dot_u[:, None]
        if HAS_ZLOSS or HAS_WEIGHT:
            difference = a[:, None] * difference
        if HAS_ZLOSS:
            difference += 2.0 * z_loss * p_dot_u[:, None]
        hessian_u = scale[:, None] * p * difference
        if HAS_SOFTCAP:
            hessian_u = jacobian * hessian_u + curvature * u
        return tl.where(valid, hessian_u, 0.0)

    @triton.jit
    def _forward_kernel(
        h_ptr,
        h_s0,
        h_s1,
        w_ptr,
        w_s0,
        w_s1,
        b_ptr,
        b_s0,
        target_ptr,
        loss_ptr,
        lse_ptr,
        N,
        V,
        D,
        ignore_index,
        smoothing_hi,
        smoothing_lo,
        cw_ptr,
        cw_sum_ptr,
        z_loss_hi,
        z_loss_lo,
        cap_hi,
        cap_lo,
        HAS_BIAS: tl.constexpr,
        SMOOTHING: tl.constexpr,
        HAS_ZLOSS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Row program: one sweep over the V tiles of z', online max and Σ exp, the label's z' and Σ w ⊙ z';
        ℓ = W·lse − ⟨q̃, z'⟩ + λ·lse²."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        label, live, in_range = _row_labels(target_ptr, rows, row_mask, V, ignore_index)
        alpha, z_loss, cap = _variant_scalars(smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, cap_hi, cap_lo, ACC)
        running_max = tl.full([BLOCK_N], float("-inf"), ACC)
        sum_exp = tl.zeros([BLOCK_N], ACC)
        label_logit = tl.zeros([BLOCK_N], ACC)
        sum_z = tl.zeros([BLOCK_N], ACC)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < V
            z = _logits_tile(
                h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, b_ptr, b_s0, rows, row_mask, cols, col_mask, D,
                HAS_BIAS, ACC, BLOCK_N, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            z, _ = _capped(z, cap, HAS_SOFTCAP)
            if SMOOTHING:  # before the -inf padding, which a weight of 0 would turn into NaN
                weighted = _class_weighted(z, cw_ptr, cols, col_mask, ACC, HAS_WEIGHT)
                sum_z += tl.sum(tl.where(col_mask[None, :], weighted, 0.0), axis=1)
            z = tl.where(col_mask[None, :], z, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            sum_exp = sum_exp * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
            running_max = new_max
            label_logit += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        lse = running_max + tl.log(sum_exp)
        loss = lse
        if HAS_WEIGHT:
            w_y, total = _row_factors(
                cw_ptr, cw_sum_ptr, label, live, in_range, lse, alpha, z_loss, V, ACC, BLOCK_N, False, HAS_WEIGHT
            )
            loss = total * lse
            label_logit = w_y * label_logit
        loss = loss - (1.0 - alpha) * label_logit
        if SMOOTHING:
            loss -= alpha / V * sum_z
        if HAS_ZLOSS:
            loss += z_loss * lse * lse
        loss = tl.where(live, tl.where(in_range, loss, float("nan")), 0.0)
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        tl.store(lse_ptr + rows, lse, mask=row_mask)

    @triton.jit
    def _rows_kernel(
        h_ptr,
        h_s0,
        h_s1,
        w_ptr,
        w_s0,
        w_s1,
        b_ptr,
        b_s0,
        vh_ptr,
        vh_sk,
        vh_s0,
        vh_s1,
        vw_ptr,
        vw_sk,
        vw_s0,
        vw_s1,
        vb_ptr,
        vb_sk,
        vb_s0,
        target_ptr,
        lse_ptr,
        scale_ptr,
        scale_stride,
        p_dot_u_ptr,
        dot_ptr,
        out_ptr,
        N,
        V,
        D,
        K,
        ignore_index,
        smoothing_hi,
        smoothing_lo,
        cw_ptr,
        cw_sum_ptr,
        z_loss_hi,
        z_loss_lo,
        cap_hi,
        cap_lo,
        MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_VH: tl.constexpr,
        HAS_VW: tl.constexpr,
        HAS_VB: tl.constexpr,
        HAS_ZLOSS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Row program of the backward (MODE 0), HVP (1) and Gauss-Newton product (2): the products to hidden.

        ``out`` is (K, N, D) contiguous in ACC, zero on entry; ``p_dot_u`` (K, N) in ACC, zero on entry
        (MODE 1, 2), where this program stores ⟨p_r, J⊙u_kr⟩ for the column programs; MODE 2 also stores lse
        (found by an online sweep), MODE 1 ⟨J⊙(a·p_r − q̃_r), u_r⟩ into ``dot``."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        label, live, in_range = _row_labels(target_ptr, rows, row_mask, V, ignore_index)
        weight = _row_weight(scale_ptr, scale_stride, rows, live, in_range, ACC)
        alpha, z_loss, cap = _variant_scalars(smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, cap_hi, cap_lo, ACC)

        # Sweep 1 (MODE 1, 2): the row statistics.
        if MODE == 2:
            running_max = tl.full([BLOCK_N], float("-inf"), ACC)
            sum_exp = tl.zeros([BLOCK_N], ACC)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
                col_mask = cols < V
                z = _logits_tile(
                    h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, b_ptr, b_s0, rows, row_mask, cols, col_mask, D,
                    HAS_BIAS, ACC, BLOCK_N, BLOCK_V, BLOCK_D,
                )  # fmt: skip
                z, jacobian = _capped(z, cap, HAS_SOFTCAP)
                z = tl.where(col_mask[None, :], z, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(z, axis=1))
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                rescale = tl.exp(running_max - shift)
                e = tl.exp(z - shift[:, None])
                sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
                running_max = new_max
                for k32 in range(0, K):
                    k = k32 + tl.zeros([], tl.int64)
                    u = _tangent_tile(
                        k, h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, vh_ptr, vh_sk, vh_s0, vh_s1, vw_ptr, vw_sk, vw_s0,
                        vw_s1, vb_ptr, vb_sk, vb_s0, rows, row_mask, cols, col_mask, D, HAS_VH, HAS_VW, HAS_VB,
                        ACC, BLOCK_N, BLOCK_V, BLOCK_D,
                    )  # fmt: skip
                    if HAS_SOFTCAP:
                        u = jacobian * u
                    stat_ptrs = p_dot_u_ptr + k * N + rows
                    acc = tl.load(stat_ptrs, mask=row_mask, other=0.0)
                    tl.store(stat_ptrs, acc * rescale + tl.sum(e * u, axis=1), mask=row_mask)
            lse = running_max + tl.log(sum_exp)
            tl.store(lse_ptr + rows, lse, mask=row_mask)
            for k32 in range(0, K):
                k = k32 + tl.zeros([], tl.int64)
                stat_ptrs = p_dot_u_ptr + k * N + rows
                tl.store(stat_ptrs, tl.load(stat_ptrs, mask=row_mask, other=0.0) / sum_exp, mask=row_mask)
        else:
            lse = tl.load(lse_ptr + rows, mask=live, other=0.0).to(ACC)
        w_y, a = _row_factors(
            cw_ptr, cw_sum_ptr, label, live, in_range, lse, alpha, z_loss, V, ACC, BLOCK_N, HAS_ZLOSS, HAS_WEIGHT
        )
        if MODE == 1:
            p_dot_u = tl.zeros([BLOCK_N], ACC)
            u_label = tl.zeros([BLOCK_N], ACC)
            sum_u = tl.zeros([BLOCK_N], ACC)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
                col_mask = cols < V
                z = _logits_tile(
                    h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, b_ptr, b_s0, rows, row_mask, cols, col_mask, D,
                    HAS_BIAS, ACC, BLOCK_N, BLOCK_V, BLOCK_D,
                )  # fmt: skip
                z, jacobian = _capped(z, cap, HAS_SOFTCAP)
                p = tl.where(live[:, None] & col_mask[None, :], tl.exp(z - lse[:, None]), 0.0)
                u = _tangent_tile(
                    0, h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, vh_ptr, vh_sk, vh_s0, vh_s1, vw_ptr, vw_sk, vw_s0,
                    vw_s1, vb_ptr, vb_sk, vb_s0, rows, row_mask, cols, col_mask, D, HAS_VH, HAS_VW, HAS_VB,
                    ACC, BLOCK_N, BLOCK_V, BLOCK_D,
                )  # fmt: skip
                if HAS_SOFTCAP:
                    u = jacobian * u
                p_dot_u += tl.sum(p * u, axis=1)
                u_label += tl.sum(tl.where(cols[None, :] == label[:, None], u, 0.0), axis=1)
                sum_u += tl.sum(_class_weighted(u, cw_ptr, cols, col_mask, ACC, HAS_WEIGHT), axis=1)
            # ⟨J⊙g', u⟩ = a·⟨p, J⊙u⟩ − ⟨q̃, J⊙u⟩
            dot = p_dot_u
            if HAS_ZLOSS or HAS_WEIGHT:
                dot = a * p_dot_u
            if HAS_WEIGHT:
                u_label = w_y * u_label
            dot = dot - (1.0 - alpha) * u_label - alpha / V * sum_u
            dot = tl.where(live, tl.where(in_range, dot, float("nan")), 0.0)
            tl.store(dot_ptr + rows, dot, mask=row_mask)
            tl.store(p_dot_u_ptr + rows, p_dot_u, mask=row_mask)

        # Sweep 2: the products to hidden, accumulated into this program's rows of ``out``.
        ds = tl.arange(0, BLOCK_D)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < V
            z = _logits_tile(
                h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, b_ptr, b_s0, rows, row_mask, cols, col_mask, D,
                HAS_BIAS, ACC, BLOCK_N, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            valid = live[:, None] & col_mask[None, :]
            p, jacobian, grad_z, curvature = _gradient_tile(
                z, lse, weight, a, w_y, label, cols, col_mask, live, cw_ptr, alpha, V, cap,
                ACC, HAS_ZLOSS, HAS_SOFTCAP, HAS_WEIGHT,
            )  # fmt: skip
            for k32 in range(0, K):
                k = k32 + tl.zeros([], tl.int64)
                if MODE == 0:
                    coefficient = grad_z
                else:
                    u = _tangent_tile(
                        k, h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, vh_ptr, vh_sk, vh_s0, vh_s1, vw_ptr, vw_sk, vw_s0,
                        vw_s1, vb_ptr, vb_sk, vb_s0, rows, row_mask, cols, col_mask, D, HAS_VH, HAS_VW, HAS_VB,
                        ACC, BLOCK_N, BLOCK_V, BLOCK_D,
                    )  # fmt: skip
                    p_dot_u_k = tl.load(p_dot_u_ptr + k * N + rows, mask=row_mask, other=0.0)
                    coefficient = _hessian_tile(
                        u, p, p_dot_u_k, weight, a, z_loss, jacobian, curvature, valid,
                        HAS_ZLOSS, HAS_SOFTCAP, HAS_WEIGHT,
                    )  # fmt: skip
                for d_start in range(0, D, BLOCK_D):
                    d = (d_start + ds).to(tl.int64)
                    d_mask = d < D
                    w_tile = tl.load(
                        w_ptr + cols[:, None] * w_s0 + d[None, :] * w_s1,
                        mask=col_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    ).to(ACC)
                    out_ptrs = out_ptr + (k * N + rows)[:, None] * D + d[None, :]
                    out_mask = row_mask[:, None] & d_mask[None, :]
                    acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
                    acc = tl.dot(coefficient, w_tile, acc, input_precision="ieee", out_dtype=ACC)
                    if MODE == 1 and HAS_VW:
                        vw_tile = tl.load(
                            vw_ptr + cols[:, None] * vw_s0 + d[None, :] * vw_s1,
                            mask=col_mask[:, None] & d_mask[None, :],
                            other=0.0,
                        ).to(ACC)
                        acc = tl.dot(grad_z, vw_tile, acc, input_precision="ieee", out_dtype=ACC)
                    tl.store(out_ptrs, acc, mask=out_mask)

    @triton.jit
    def _columns_kernel(
        h_ptr,
        h_s0,
        h_s1,
        w_ptr,
        w_s0,
        w_s1,
        b_ptr,
        b_s0,
        vh_ptr,
        vh_sk,
        vh_s0,
        vh_s1,
        vw_ptr,
        vw_sk,
        vw_s0,
        vw_s1,
        vb_ptr,
        vb_sk,
        vb_s0,
        target_ptr,
        lse_ptr,
        scale_ptr,
        scale_stride,
        p_dot_u_ptr,
        out_w_ptr,
        out_b_ptr,
        N,
        V,
        D,
        K,
        ignore_index,
        smoothing_hi,
        smoothing_lo,
        cw_ptr,
        cw_sum_ptr,
        z_loss_hi,
        z_loss_lo,
        cap_hi,
        cap_lo,
        MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_VH: tl.constexpr,
        HAS_VW: tl.constexpr,
        HAS_VB: tl.constexpr,
        HAS_ZLOSS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Column program: owns a V tile of ``out_w`` (K, V, D) and ``out_b`` (K, V), contiguous in ACC and
        zero on entry, and sweeps the row tiles in order: g_zᵀ·h (+ g_zᵀ·v_h in MODE 1) or (H u_k)ᵀ·h, and
        the column sums, from the lse and ⟨p, J⊙u_k⟩ the row programs stored."""
        cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        alpha, z_loss, cap = _variant_scalars(smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, cap_hi, cap_lo, ACC)
        ds = tl.arange(0, BLOCK_D)
        for row_start in range(0, N, BLOCK_N):
            rows = row_start + tl.arange(0, BLOCK_N).to(tl.int64)
            row_mask = rows < N
            label, live, in_range = _row_labels(target_ptr, rows, row_mask, V, ignore_index)
            weight = _row_weight(scale_ptr, scale_stride, rows, live, in_range, ACC)
            lse = tl.load(lse_ptr + rows, mask=live, other=0.0).to(ACC)
            w_y, a = _row_factors(
                cw_ptr, cw_sum_ptr, label, live, in_range, lse, alpha, z_loss, V, ACC, BLOCK_N, HAS_ZLOSS, HAS_WEIGHT
            )
            z = _logits_tile(
                h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, b_ptr, b_s0, rows, row_mask, cols, col_mask, D,
                HAS_BIAS, ACC, BLOCK_N, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            valid = live[:, None] & col_mask[None, :]
            p, jacobian, grad_z, curvature = _gradient_tile(
                z, lse, weight, a, w_y, label, cols, col_mask, live, cw_ptr, alpha, V, cap,
                ACC, HAS_ZLOSS, HAS_SOFTCAP, HAS_WEIGHT,
            )  # fmt: skip
            for k32 in range(0, K):
                k = k32 + tl.zeros([], tl.int64)
                if MODE == 0:
                    coefficient = grad_z
                else:
                    u = _tangent_tile(
                        k, h_ptr, h_s0, h_s1, w_ptr, w_s0, w_s1, vh_ptr, vh_sk, vh_s0, vh_s1, vw_ptr, vw_sk, vw_s0,
                        vw_s1, vb_ptr, vb_sk, vb_s0, rows, row_mask, cols, col_mask, D, HAS_VH, HAS_VW, HAS_VB,
                        ACC, BLOCK_N, BLOCK_V, BLOCK_D,
                    )  # fmt: skip
                    p_dot_u_k = tl.load(p_dot_u_ptr + k * N + rows, mask=row_mask, other=0.0)
                    coefficient = _hessian_tile(
                        u, p, p_dot_u_k, weight, a, z_loss, jacobian, curvature, valid,
                        HAS_ZLOSS, HAS_SOFTCAP, HAS_WEIGHT,
                    )  # fmt: skip
                if HAS_BIAS:
                    bias_ptrs = out_b_ptr + k * V + cols
                    tl.store(bias_ptrs, tl.load(bias_ptrs, mask=col_mask) + tl.sum(coefficient, axis=0), mask=col_mask)
                for d_start in range(0, D, BLOCK_D):
                    d = (d_start + ds).to(tl.int64)
                    d_mask = d < D
                    h_tile = tl.load(
                        h_ptr + rows[:, None] * h_s0 + d[None, :] * h_s1,
                        mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    ).to(ACC)
                    out_ptrs = out_w_ptr + (k * V + cols)[:, None] * D + d[None, :]
                    out_mask = col_mask[:, None] & d_mask[None, :]
                    acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
                    acc = tl.dot(tl.trans(coefficient), h_tile, acc, input_precision="ieee", out_dtype=ACC)
                    if MODE == 1 and HAS_VH:
                        vh_tile = tl.load(
                            vh_ptr + rows[:, None] * vh_s0 + d[None, :] * vh_s1,
                            mask=row_mask[:, None] & d_mask[None, :],
                            other=0.0,
                        ).to(ACC)
                        acc = tl.dot(tl.trans(grad_z), vh_tile, acc, input_precision="ieee", out_dtype=ACC)
                    tl.store(out_ptrs, acc, mask=out_mask)


_INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CLASS_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(method: str, message: str) -> RuntimeError:
    return RuntimeError(f"curvkern.linear_ce.triton.{method}: {message}")


def _check(method, hidden, weight, bias, target, hyperparameters, acc_tensors=(), tangents=(), tangent_count=None):
    """Every input checked before a launch: dims, shapes, dtypes, one device, and the class weights of
    ``hyperparameters`` (a (V,) fp16, bf16, fp32 or fp64 tensor; any strides, :func:`_variant_arguments`
    makes them contiguous). ``acc_tensors``: (name, tensor, allowed shapes) in the accumulation dtype;
    ``tangents``: (name, tensor, expected shape) in the inputs' dtype. Raises RuntimeError naming the argument
    (the public functions have checked the user's call; this guards direct calls of the kernels)."""
    if hidden.dim() != 2:
        raise _fail(method, f"hidden must be 2-D (N, d), got {tuple(hidden.shape)}")
    if hidden.dtype not in _INPUT_DTYPES:
        raise _fail(method, f"hidden must be float32, float64 or bfloat16, got {hidden.dtype}")
    n, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise _fail(method, f"weight must have shape (V, {d}), got {tuple(weight.shape)}")
    v = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise _fail(method, f"bias must have shape ({v},), got {tuple(bias.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != (n,):
        raise _fail(method, f"target must be an int64 tensor of shape ({n},), got {target.dtype} {tuple(target.shape)}")
    if not target.is_contiguous():
        raise _fail(method, "target must be contiguous")
    device = hidden.device
    acc = accumulation_dtype(hidden.dtype)
    for name, tensor in (("weight", weight), ("bias", bias), *((t[0], t[1]) for t in tangents)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise _fail(method, f"{name} must have hidden's dtype {hidden.dtype}, got {tensor.dtype}")
    for name, tensor, shape in tangents:
        if tensor is not None and tuple(tensor.shape) != shape:
            raise _fail(method, f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    for name, tensor, shapes in acc_tensors:
        if tensor.dtype != acc:
            raise _fail(method, f"{name} must be {acc} for {hidden.dtype} inputs, got {tensor.dtype}")
        if tuple(tensor.shape) not in shapes:
            raise _fail(method, f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(tensor.shape)}")
    everything = [weight, bias, target, *(t[1] for t in tangents), *(t[1] for t in acc_tensors)]
    for tensor in everything:
        if tensor is not None and tensor.device != device:
            raise _fail(method, f"every tensor must be on hidden's device {device}, got one on {tensor.device}")
    if tangent_count is not None and tangent_count < 1:
        raise _fail(method, "at least one tangent is needed")
    class_weight = getattr(hyperparameters, "class_weight", None)
    if class_weight is not None:
        if not isinstance(class_weight, torch.Tensor) or tuple(class_weight.shape) != (v,):
            got = tuple(class_weight.shape) if isinstance(class_weight, torch.Tensor) else type(class_weight)
            raise _fail(method, f"class_weight must be a tensor of shape ({v},), got {got}")
        if class_weight.dtype not in _CLASS_WEIGHT_DTYPES:
            raise _fail(method, f"class_weight must be float16, bfloat16, float32 or float64, got {class_weight.dtype}")
        if class_weight.device != device:
            raise _fail(method, f"class_weight must be on hidden's device {device}, got {class_weight.device}")
    return n, d, v, acc


def _split(value: float) -> tuple[float, float]:
    """``value`` as fp32 high and low parts whose sum is ``value`` to about 2^-48 (Triton passes floats as fp32)."""
    (high,) = struct.unpack("f", struct.pack("f", value))
    return high, value - high


def _accumulator(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def _strides(tensor: torch.Tensor | None, count: int) -> tuple[int, ...]:
    return (0,) * count if tensor is None else tuple(tensor.stride())


def _operands(hidden, weight, bias, tangents=(None, None, None)):
    """The pointer and stride arguments common to the row and column kernels; an absent tensor is passed as
    hidden with zero strides (never read: its constexpr flag is off)."""
    v_hidden, v_weight, v_bias = tangents
    return (
        hidden,
        *hidden.stride(),
        weight,
        *weight.stride(),
        hidden if bias is None else bias,
        *_strides(bias, 1),
        hidden if v_hidden is None else v_hidden,
        *_strides(v_hidden, 3),
        hidden if v_weight is None else v_weight,
        *_strides(v_weight, 3),
        hidden if v_bias is None else v_bias,
        *_strides(v_bias, 2),
    )


def _flags(bias, tangents, acc_dtype):
    v_hidden, v_weight, v_bias = tangents
    return dict(
        HAS_BIAS=bias is not None,
        HAS_VH=v_hidden is not None,
        HAS_VW=v_weight is not None,
        HAS_VB=v_bias is not None,
        ACC=acc_dtype,
        BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V,
        BLOCK_D=BLOCK_D,
    )


def _scale_stride(scale: torch.Tensor) -> int:
    return 0 if scale.dim() == 0 else scale.stride(0)


def _variant_arguments(hyperparameters: CrossEntropyHyperparameters, hidden: torch.Tensor):
    """The loss variants as the kernels take them (after :func:`_check`): ``(arguments, flags)``, the arguments
    the class weights (contiguous, in the accumulation dtype) and their sum Σ_j w_j as a device tensor (no host
    sync), or hidden twice (never read), then λ and c (1 without a cap) as fp32 halves; the flags the
    constexprs HAS_ZLOSS, HAS_SOFTCAP and HAS_WEIGHT, off for a plain record."""
    z_loss = float(getattr(hyperparameters, "z_loss", 0.0))
    softcap = getattr(hyperparameters, "softcap", None)
    class_weight = getattr(hyperparameters, "class_weight", None)
    weights = (hidden, hidden)
    if class_weight is not None:
        contiguous = class_weight.to(accumulation_dtype(hidden.dtype)).contiguous()
        weights = (contiguous, contiguous.sum())
    arguments = (*weights, *_split(z_loss), *_split(1.0 if softcap is None else float(softcap)))
    flags = dict(HAS_ZLOSS=z_loss != 0, HAS_SOFTCAP=softcap is not None, HAS_WEIGHT=class_weight is not None)
    return arguments, flags


def _launch_products(mode, hidden, weight, bias, target, lse, scale, tangents, tangent_count, h, p_dot_u, dot):
    """The row programs (products to hidden, and the statistics) then the column programs (to weight and
    bias). Returns the (K, N, d), (K, V, d) and (K, V) accumulators in the accumulation dtype."""
    n, d = hidden.shape
    v = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    out_hidden = torch.zeros((tangent_count, n, d), dtype=acc, device=hidden.device)
    out_weight = torch.zeros((tangent_count, v, d), dtype=acc, device=hidden.device)
    out_bias = torch.zeros((tangent_count, v if bias is not None else 0), dtype=acc, device=hidden.device)
    if n == 0 or v == 0:
        return out_hidden, out_weight, out_bias
    operands = _operands(hidden, weight, bias, tangents)
    variants, variant_flags = _variant_arguments(h, hidden)
    flags = dict(_flags(bias, tangents, _accumulator(hidden.dtype)), **variant_flags)
    common = (n, v, d, tangent_count, h.ignore_index, *_split(h.label_smoothing), *variants)
    _rows_kernel[(triton.cdiv(n, BLOCK_N),)](
        *operands, target, lse, scale, _scale_stride(scale), p_dot_u, dot, out_hidden, *common, MODE=mode, **flags
    )
    _columns_kernel[(triton.cdiv(v, BLOCK_V),)](
        *operands, target, lse, scale, _scale_stride(scale), p_dot_u, out_weight, out_bias, *common, MODE=mode, **flags
    )
    return out_hidden, out_weight, out_bias


def _to_input_dtype(out_hidden, out_weight, out_bias, hidden, bias):
    return out_hidden.to(hidden.dtype), out_weight.to(hidden.dtype), None if bias is None else out_bias.to(bias.dtype)


@register("linear_cross_entropy", "triton")
class TritonLinearCrossEntropy:
    """The Triton kernels; the contract is :class:`curvkern.families.LinearLossKernels`."""

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        refuse_missing_variants(hyperparameters, "triton")
        n, d, v, acc = _check("forward", hidden, weight, bias, target, hyperparameters)
        loss = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty_like(loss)
        if n == 0:
            return loss, lse
        if v == 0:
            raise _fail("forward", "weight has no classes (V = 0)")
        alpha = float(hyperparameters.label_smoothing)
        variants, variant_flags = _variant_arguments(hyperparameters, hidden)
        _forward_kernel[(triton.cdiv(n, BLOCK_N),)](
            hidden,
            *hidden.stride(),
            weight,
            *weight.stride(),
            hidden if bias is None else bias,
            *_strides(bias, 1),
            target,
            loss,
            lse,
            n,
            v,
            d,
            hyperparameters.ignore_index,
            *_split(alpha),
            *variants,
            HAS_BIAS=bias is not None,
            SMOOTHING=alpha != 0,
            **variant_flags,
            ACC=_accumulator(hidden.dtype),
            BLOCK_N=BLOCK_N,
            BLOCK_V=BLOCK_V,
            BLOCK_D=BLOCK_D,
        )
        return loss, lse

    @staticmethod
    def backward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        refuse_missing_variants(hyperparameters, "triton")
        n = hidden.shape[0] if hidden.dim() == 2 else -1
        _check(
            "backward",
            hidden,
            weight,
            bias,
            target,
            hyperparameters,
            [("lse", lse, [(n,)]), ("grad_scale", grad_scale, [(), (n,)])],
        )
        products = _launch_products(
            _BACKWARD, hidden, weight, bias, target, lse, grad_scale, (None, None, None), 1, hyperparameters, lse, lse
        )
        return _to_input_dtype(*(x[0] for x in products), hidden, bias)

    @staticmethod
    def hvp(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        v_hidden: torch.Tensor | None,
        v_weight: torch.Tensor | None,
        v_bias: torch.Tensor | None,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        refuse_missing_variants(hyperparameters, "triton")
        if v_bias is not None and bias is None:
            raise _fail("hvp", "v_bias was given but bias is None")
        n = hidden.shape[0] if hidden.dim() == 2 else -1
        tangents = [
            ("v_hidden", v_hidden, tuple(hidden.shape)),
            ("v_weight", v_weight, tuple(weight.shape)),
            ("v_bias", v_bias, tuple(weight.shape[:1])),
        ]
        _, _, _, acc = _check(
            "hvp",
            hidden,
            weight,
            bias,
            target,
            hyperparameters,
            [("lse", lse, [(n,)]), ("grad_scale", grad_scale, [(), (n,)])],
            tangents,
        )
        p_dot_u = torch.zeros(n, dtype=acc, device=hidden.device)
        dot = torch.zeros(n, dtype=acc, device=hidden.device)
        # The kernels index a tangent as (K, ...): a leading K = 1 of stride 0.
        batched = tuple(None if t is None else t[None] for t in (v_hidden, v_weight, v_bias))
        products = _launch_products(
            _HVP, hidden, weight, bias, target, lse, grad_scale, batched, 1, hyperparameters, p_dot_u, dot
        )
        return (*_to_input_dtype(*(x[0] for x in products), hidden, bias), dot)

    @staticmethod
    def ggn_vp(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        scale: torch.Tensor,
        d_hidden: torch.Tensor,
        d_weight: torch.Tensor | None,
        d_bias: torch.Tensor | None,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        refuse_missing_variants(hyperparameters, "triton")
        if d_bias is not None and bias is None:
            raise _fail("ggn_vp", "d_bias was given but bias is None")
        if d_hidden.dim() != 3:
            raise _fail("ggn_vp", f"d_hidden must be 3-D (K, N, d), got {tuple(d_hidden.shape)}")
        k = d_hidden.shape[0]
        n = hidden.shape[0] if hidden.dim() == 2 else -1
        tangents = [
            ("d_hidden", d_hidden, (k, *hidden.shape)),
            ("d_weight", d_weight, (k, *weight.shape)),
            ("d_bias", d_bias, (k, *weight.shape[:1])),
        ]
        _, _, _, acc = _check(
            "ggn_vp",
            hidden,
            weight,
            bias,
            target,
            hyperparameters,
            [("scale", scale, [(), (n,)])],
            tangents,
            tangent_count=k,
        )
        lse = torch.zeros(n, dtype=acc, device=hidden.device)
        p_dot_u = torch.zeros((k, n), dtype=acc, device=hidden.device)
        products = _launch_products(
            _GGN,
            hidden,
            weight,
            bias,
            target,
            lse,
            scale,
            (d_hidden, d_weight, d_bias),
            k,
            hyperparameters,
            p_dot_u,
            lse,
        )
        return _to_input_dtype(*products, hidden, bias)
