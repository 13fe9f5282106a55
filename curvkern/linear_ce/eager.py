"""The eager reference of the fused linear + cross-entropy kernels: plain PyTorch looping over tiles, the
semantics later backends are tested against (docs/linear_cross_entropy.md).

Every kernel works on rows: ``hidden`` (N, d), ``weight`` (V, d), ``bias`` (V) or None, ``target`` (N)
int64, all on one device, hidden, weight and bias of one dtype (fp32, fp64 or bf16). The logits
z = hidden · weightᵀ + bias exist only as tiles of at most (:data:`N_TILE`, :data:`V_TILE`), each
computed by one ``torch.addmm`` in the accumulation dtype (fp64 for fp64 inputs, fp32 otherwise) and
dropped after use; no tensor of N·V elements is ever allocated. Sums over rows and over tiles
accumulate in that dtype; results are rounded to the inputs' dtype once, at the end.

Scales are device tensors (0-dim, or (N,) for ``reduction="none"``) in the accumulation dtype, so no
kernel reads a number back to the host; a row whose target is ``ignore_index`` gets scale 0 (by
``torch.where``, so an infinite mean scale over zero valid rows gives 0 there, not NaN).

- ``forward`` -> ``(loss_rows, lse)``: one sweep over the V tiles of each row tile.
- ``backward`` -> ``(grad_hidden, grad_weight, grad_bias)``: one sweep, the logits recomputed from lse.
- ``hvp`` -> the double backward (exact Hessian-vector product, cross terms included): two sweeps.
- ``ggn_vp`` -> the Gauss-Newton product Jᵀ H_z J for K tangents at once: two sweeps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from curvkern._dispatch import register
from curvkern.hyperparameters import CrossEntropyHyperparameters

# Rows and classes per logits tile. Module constants read at every call, so tests can make them small.
N_TILE = 1024
V_TILE = 4096


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(length: int, size: int) -> Iterator[slice]:
    return (slice(start, min(start + size, length)) for start in range(0, length, size))


def _logits_tile(hidden_tile: torch.Tensor, weight_tile: torch.Tensor, bias_tile: torch.Tensor | None) -> torch.Tensor:
    """(n, v) logits in the accumulation dtype of the (already converted) tiles."""
    if bias_tile is None:
        return torch.mm(hidden_tile, weight_tile.T)
    return torch.addmm(bias_tile, hidden_tile, weight_tile.T)


def _tangent_tile(hidden_tile, weight_tile, d_hidden_tile, d_weight_tile, d_bias_tile) -> torch.Tensor:
    """(K, n, v) tangent of the logits tile, J·v = dh·Wᵀ + h·dWᵀ + db, for K tangents; a None part is 0.

    ``d_hidden_tile`` (K, n, d), ``d_weight_tile`` (K, v, d), ``d_bias_tile`` (K, v), all in the
    accumulation dtype."""
    parts = []
    if d_hidden_tile is not None:
        parts.append(torch.matmul(d_hidden_tile, weight_tile.T))
    if d_weight_tile is not None:
        parts.append(torch.matmul(hidden_tile, d_weight_tile.transpose(1, 2)))
    if not parts:
        reference = d_bias_tile if d_bias_tile is not None else hidden_tile
        k = 1 if d_bias_tile is None else d_bias_tile.shape[0]
        parts.append(reference.new_zeros(k, hidden_tile.shape[0], weight_tile.shape[0]))
    tangent = parts[0]
    for part in parts[1:]:
        tangent = tangent + part
    if d_bias_tile is not None:
        tangent = tangent + d_bias_tile[:, None, :]
    return tangent


def _logits_and_tangent_tile(hidden_tile, weight, bias, columns, d_hidden_tile, d_weight, d_bias):
    """``(weight_tile, z, u)`` of one class tile: the weight rows and the (n, v) logits in the accumulation
    dtype of ``hidden_tile``, and the (K, n, v) tangent of the logits for ``d_hidden_tile`` (K, n, d, already
    converted), ``d_weight`` (K, V, d) and ``d_bias`` (K, V) (None parts 0)."""
    acc = hidden_tile.dtype
    weight_tile = weight[columns].to(acc)
    z = _logits_tile(hidden_tile, weight_tile, None if bias is None else bias[columns].to(acc))
    u = _tangent_tile(
        hidden_tile,
        weight_tile,
        d_hidden_tile,
        None if d_weight is None else d_weight[:, columns].to(acc),
        None if d_bias is None else d_bias[:, columns].to(acc),
    )
    return weight_tile, z, u


def _row_scale(scale: torch.Tensor, valid: torch.Tensor, rows: slice) -> torch.Tensor:
    """(n, 1) per-row scale of a row tile, exactly 0 on ignored rows."""
    scale_rows = scale if scale.dim() == 0 else scale[rows]
    return torch.where(valid, scale_rows, 0.0)[:, None]


def _target_in_tile(target: torch.Tensor, valid: torch.Tensor, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1) column of each row's label within the class tile (0 where outside) and (n, 1) whether it is inside."""
    inside = valid & (target >= columns.start) & (target < columns.stop)
    return torch.where(inside, target - columns.start, 0)[:, None], inside[:, None]


# --- The loss variants (docs/linear_cross_entropy.md, "Loss variants") ---------------------------------------
# A plain CrossEntropyHyperparameters record has none; each helper keeps the plain operations, in the plain
# order, when its variant is off, so that the defaults give the plain loss bit for bit.


class _Variants:
    """λ (``z_loss``), c (``softcap``, or None) and the class weights in the accumulation dtype (or None)."""

    def __init__(self, hyperparameters: CrossEntropyHyperparameters, acc: torch.dtype, num_classes: int):
        self.alpha = hyperparameters.label_smoothing
        self.num_classes = num_classes
        self.z_loss = float(getattr(hyperparameters, "z_loss", 0.0))
        self.softcap = getattr(hyperparameters, "softcap", None)
        class_weight = getattr(hyperparameters, "class_weight", None)
        self.class_weight = None if class_weight is None else class_weight.to(acc)

    def rows(self, target_tile: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(w_y, W)`` (n,) of a row tile: each row's target weight (0 on ignored rows) and the total weight
        of its target distribution, W = (1 − α)·w_y + (α/V)·Σ_j w_j; both None (1) without class weights."""
        if self.class_weight is None:
            return None, None
        safe = torch.where(valid, target_tile, 0).clamp(0, max(self.num_classes - 1, 0))
        w_y = torch.where(valid, self.class_weight[safe], 0.0)
        return w_y, (1 - self.alpha) * w_y + self.alpha / self.num_classes * self.class_weight.sum()

    def lse_factor(self, total: torch.Tensor | None, lse: torch.Tensor) -> torch.Tensor | None:
        """a = W + 2λ·lse (n,), the factor of p in the gradient to the capped logits; None when it is 1."""
        if not self.z_loss:
            return total
        return (1.0 if total is None else total) + 2 * self.z_loss * lse

    def cap(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z', J)``: the logits the loss sees, c·tanh(z/c), and the cap's derivative 1 − tanh²; (z, None)
        without a cap."""
        if self.softcap is None:
            return z, None
        t = torch.tanh(z / self.softcap)
        return self.softcap * t, 1 - t * t

    def cap_second(self, capped: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        """d²z'/dz² = −(2/c)·t·(1 − t²) = −(2z'/c²)·J."""
        return -2 / self.softcap**2 * capped * slope

    def target_dot(self, values, target_tile, valid, columns: slice, w_y) -> torch.Tensor:
        """(n,) ⟨q̃, values⟩ over one class tile, q̃ = (1 − α)·w_y·e_y + (α/V)·w the weighted smoothed target;
        the target part and the smoothing part accumulated separately as ``(target, smooth)`` sums."""
        local, inside = _target_in_tile(target_tile, valid, columns)
        at_target = torch.where(inside, values.gather(1, local), 0.0)[:, 0]
        if w_y is not None:
            at_target = at_target * w_y
        if not self.alpha:
            return (1 - self.alpha) * at_target
        spread = values if self.class_weight is None else values * self.class_weight[columns]
        return (1 - self.alpha) * at_target + self.alpha / self.num_classes * spread.sum(dim=1)

    def minus_target(self, tile: torch.Tensor, target_tile, valid, columns: slice, w_y) -> torch.Tensor:
        """A new tensor ``tile − q̃`` over one class tile."""
        spread = 1.0 if self.class_weight is None else self.class_weight[columns]
        out = tile - self.alpha / self.num_classes * spread
        local, inside = _target_in_tile(target_tile, valid, columns)
        at_target = inside.to(out.dtype) if w_y is None else inside.to(out.dtype) * w_y[:, None]
        return out.scatter_add_(1, local, at_target * (self.alpha - 1.0))

    def hessian(self, p, v, p_dot_v, factor, grad_capped, capped, slope, u) -> torch.Tensor:
        """Unscaled (H u) over one class tile: J ⊙ H_z'(J ⊙ u) + g' ⊙ z'' ⊙ u, with v = J ⊙ u, p_dot_v = ⟨p, v⟩
        (broadcastable), H_z' v = a·p ⊙ (v − ⟨p, v⟩) + 2λ·p·⟨p, v⟩ and g' = a·p − q̃ (``grad_capped``)."""
        result = p * (v - p_dot_v)
        if factor is not None:
            result = result * factor
        if self.z_loss:
            result = result + 2 * self.z_loss * p * p_dot_v
        if slope is not None:
            result = result * slope + grad_capped * self.cap_second(capped, slope) * u
        return result


@register("linear_cross_entropy", "eager")
class EagerLinearCrossEntropy:
    """The reference kernels of ``curvkern.linear_cross_entropy`` and ``curvkern.linear_ce_ggn_vp``; the
    contract is :class:`curvkern.families.LinearLossKernels`."""

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        hyperparameters: CrossEntropyHyperparameters,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_rows, lse)``, both (N,) in the accumulation dtype: ℓ_r (0 on ignored rows, NaN for a label
        outside [0, V)) and log Σ_j exp z_rj."""
        acc = accumulation_dtype(hidden.dtype)
        ignore_index = hyperparameters.ignore_index
        num_classes = weight.shape[0]
        variants = _Variants(hyperparameters, acc, num_classes)
        loss = hidden.new_empty(hidden.shape[0], dtype=acc)
        lse = hidden.new_empty(hidden.shape[0], dtype=acc)
        for rows in _tiles(hidden.shape[0], N_TILE):
            hidden_tile, target_tile = hidden[rows].to(acc), target[rows]
            valid = target_tile != ignore_index
            w_y, total = variants.rows(target_tile, valid)
            row_lse = torch.full_like(lse[rows], -torch.inf)
            target_dot = torch.zeros_like(row_lse)
            for columns in _tiles(num_classes, V_TILE):
                z = _logits_tile(hidden_tile, weight[columns].to(acc), None if bias is None else bias[columns].to(acc))
                z, _ = variants.cap(z)
                row_lse = torch.logaddexp(row_lse, torch.logsumexp(z, dim=1))
                target_dot += variants.target_dot(z, target_tile, valid, columns, w_y)
            # ℓ_r = W·lse − ⟨q̃, z'⟩ + λ·lse²
            row_loss = (row_lse if total is None else total * row_lse) - target_dot
            if variants.z_loss:
                row_loss = row_loss + variants.z_loss * row_lse * row_lse
            in_range = (target_tile >= 0) & (target_tile < num_classes)
            loss[rows] = torch.where(valid, torch.where(in_range, row_loss, torch.nan), 0.0)
            lse[rows] = row_lse
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
        """With g_z = s_r·(p_r − q_r) per row (s = ``grad_scale``, 0 on ignored rows): ``(g_z·W, g_zᵀ·h,
        Σ_r g_z)`` of the shapes and dtype of hidden, weight and bias (None when bias is None)."""
        acc = lse.dtype
        ignore_index = hyperparameters.ignore_index
        num_classes = weight.shape[0]
        variants = _Variants(hyperparameters, acc, num_classes)
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
        for rows in _tiles(hidden.shape[0], N_TILE):
            hidden_tile, target_tile = hidden[rows].to(acc), target[rows]
            valid = target_tile != ignore_index
            scale = _row_scale(grad_scale, valid, rows)
            w_y, total = variants.rows(target_tile, valid)
            factor = variants.lse_factor(total, lse[rows])
            for columns in _tiles(num_classes, V_TILE):
                weight_tile = weight[columns].to(acc)
                z = _logits_tile(hidden_tile, weight_tile, None if bias is None else bias[columns].to(acc))
                z, slope = variants.cap(z)
                grad_z = torch.exp(z - lse[rows, None])
                if factor is not None:
                    grad_z = grad_z * factor[:, None]
                grad_z = variants.minus_target(grad_z, target_tile, valid, columns, w_y)
                if slope is not None:
                    grad_z = grad_z * slope
                grad_z = grad_z * scale
                grad_hidden[rows].addmm_(grad_z, weight_tile)
                grad_weight[columns].addmm_(grad_z.T, hidden_tile)
                if grad_bias is not None:
                    grad_bias[columns] += grad_z.sum(dim=0)
        return (
            grad_hidden.to(hidden.dtype),
            grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )

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
        """The double backward: the gradient of Φ = ⟨v_h, g_z·W⟩ + ⟨v_W, g_zᵀ·h⟩ + ⟨v_b, Σ_r g_z⟩.

        With u = v_h·Wᵀ + h·v_Wᵀ + v_b (the logits' tangent, None parts 0) and
        (H u)_r = s_r·p_r ⊙ (u_r − ⟨p_r, u_r⟩), returns

        - to hidden: (H u)·W + g_z·v_W, to weight: (H u)ᵀ·h + g_zᵀ·v_h, to bias: Σ_r (H u)_r (None without
          bias), in the inputs' dtype;
        - ``dot`` (N,) in the accumulation dtype: ⟨p_r − q_r, u_r⟩, 0 on ignored rows, from which the caller
          forms the gradient to the loss's incoming gradient.

        Two sweeps over the class tiles of each row tile: (1) ⟨p, u⟩, (2) the products.
        """
        acc = lse.dtype
        ignore_index = hyperparameters.ignore_index
        num_classes = weight.shape[0]
        variants = _Variants(hyperparameters, acc, num_classes)
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
        dot = torch.zeros_like(lse)

        def as_acc(tensor, part):
            return None if tensor is None else tensor[part].to(acc)

        # The tangents with a leading K = 1, as the tile helper takes them.
        v_weight_k, v_bias_k = (None if v is None else v[None] for v in (v_weight, v_bias))

        for rows in _tiles(hidden.shape[0], N_TILE):
            hidden_tile, target_tile, v_hidden_tile = hidden[rows].to(acc), target[rows], as_acc(v_hidden, rows)
            tangent_tiles = (None if v_hidden_tile is None else v_hidden_tile[None], v_weight_k, v_bias_k)
            valid = target_tile != ignore_index
            scale = _row_scale(grad_scale, valid, rows)
            w_y, total = variants.rows(target_tile, valid)
            factor = variants.lse_factor(total, lse[rows])

            # (1) ⟨p, J⊙u⟩ and dot = ⟨J⊙(a·p − q̃), u⟩ = a·⟨p, J⊙u⟩ − ⟨q̃, J⊙u⟩.
            p_dot_u = torch.zeros_like(lse[rows])
            q_dot_u = torch.zeros_like(p_dot_u)
            for columns in _tiles(num_classes, V_TILE):
                _, z, u = _logits_and_tangent_tile(hidden_tile, weight, bias, columns, *tangent_tiles)
                z, slope = variants.cap(z)
                p, u = torch.exp(z - lse[rows, None]), u[0]
                if slope is not None:
                    u = slope * u
                p_dot_u += (p * u).sum(dim=1)
                q_dot_u += variants.target_dot(u, target_tile, valid, columns, w_y)
            dot[rows] = torch.where(valid, (p_dot_u if factor is None else factor * p_dot_u) - q_dot_u, 0.0)

            for columns in _tiles(num_classes, V_TILE):
                weight_tile, z, u = _logits_and_tangent_tile(hidden_tile, weight, bias, columns, *tangent_tiles)
                z, slope = variants.cap(z)
                p, u = torch.exp(z - lse[rows, None]), u[0]
                # g' = a·p − q̃, the gradient to the capped logits; g_z = J ⊙ g' to the logits.
                grad_capped = variants.minus_target(
                    p if factor is None else p * factor[:, None], target_tile, valid, columns, w_y
                )
                hessian_u = variants.hessian(
                    p,
                    u if slope is None else slope * u,
                    p_dot_u[:, None],
                    None if factor is None else factor[:, None],
                    grad_capped,
                    z,
                    slope,
                    u,
                )
                hessian_u = hessian_u * scale
                grad_hidden[rows].addmm_(hessian_u, weight_tile)
                grad_weight[columns].addmm_(hessian_u.T, hidden_tile)
                if grad_bias is not None:
                    grad_bias[columns] += hessian_u.sum(dim=0)
                if v_weight is None and v_hidden_tile is None:
                    continue
                # The cross terms: g_z depends on h and W only through z, but Φ also holds h and W
                # outside g_z (g_z·W and g_zᵀ·h), which the Gauss-Newton product drops.
                grad_z = (grad_capped if slope is None else grad_capped * slope) * scale
                if v_weight is not None:
                    grad_hidden[rows].addmm_(grad_z, v_weight[columns].to(acc))
                if v_hidden_tile is not None:
                    grad_weight[columns].addmm_(grad_z.T, v_hidden_tile)
        return (
            grad_hidden.to(hidden.dtype),
            grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            dot,
        )

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
        """Jᵀ H_z J for K tangents: ``d_hidden`` (K, N, d), ``d_weight`` (K, V, d) or None, ``d_bias`` (K, V)
        or None, in the inputs' dtype. With u_k = J·v_k and (H u)_r = s_r·p_r ⊙ (u_r − ⟨p_r, u_r⟩), returns
        ((H u)·W (K, N, d), (H u)ᵀ·h (K, V, d), Σ_r (H u)_r (K, V) or None without bias), inputs' dtype.

        Two sweeps over the class tiles of each row tile, each logits tile computed once for all K:
        (1) an online max, Σ e and Σ e·u_k with e = exp(z − max), giving lse and ⟨p, u_k⟩; (2) the products.
        """
        acc = accumulation_dtype(hidden.dtype)
        num_classes, tangents = weight.shape[0], d_hidden.shape[0]
        prod_hidden = torch.zeros(d_hidden.shape, dtype=acc, device=hidden.device)
        prod_weight = torch.zeros((tangents, *weight.shape), dtype=acc, device=weight.device)
        prod_bias = None if bias is None else torch.zeros((tangents, num_classes), dtype=acc, device=weight.device)

        variants = _Variants(hyperparameters, acc, num_classes)
        for rows in _tiles(hidden.shape[0], N_TILE):
            hidden_tile, target_tile = hidden[rows].to(acc), target[rows]
            d_hidden_tile = d_hidden[:, rows].to(acc)
            valid = target_tile != hyperparameters.ignore_index
            row_scale = _row_scale(scale, valid, rows)
            w_y, total = variants.rows(target_tile, valid)

            running_max = torch.full((hidden_tile.shape[0],), -torch.inf, dtype=acc, device=hidden.device)
            exp_sum = torch.zeros_like(running_max)
            exp_dot_u = torch.zeros((tangents, hidden_tile.shape[0]), dtype=acc, device=hidden.device)
            for columns in _tiles(num_classes, V_TILE):
                _, z, u = _logits_and_tangent_tile(hidden_tile, weight, bias, columns, d_hidden_tile, d_weight, d_bias)
                z, slope = variants.cap(z)
                if slope is not None:
                    u = slope * u
                new_max = torch.maximum(running_max, z.amax(dim=1))
                rescale = torch.exp(running_max - new_max)
                e = torch.exp(z - new_max[:, None])
                exp_sum = exp_sum * rescale + e.sum(dim=1)
                exp_dot_u = exp_dot_u * rescale + (e * u).sum(dim=2)
                running_max = new_max
            lse = running_max + torch.log(exp_sum)
            p_dot_u = exp_dot_u / exp_sum
            factor = variants.lse_factor(total, lse)

            for columns in _tiles(num_classes, V_TILE):
                weight_tile, z, u = _logits_and_tangent_tile(
                    hidden_tile, weight, bias, columns, d_hidden_tile, d_weight, d_bias
                )
                z, slope = variants.cap(z)
                p = torch.exp(z - lse[:, None])
                grad_capped = None
                if slope is not None:
                    grad_capped = variants.minus_target(
                        p if factor is None else p * factor[:, None], target_tile, valid, columns, w_y
                    )
                hessian_u = variants.hessian(
                    p,
                    u if slope is None else slope * u,
                    p_dot_u[:, :, None],
                    None if factor is None else factor[:, None],
                    grad_capped,
                    z,
                    slope,
                    u,
                )
                hessian_u = hessian_u * row_scale
                prod_hidden[:, rows] += torch.matmul(hessian_u, weight_tile)
                prod_weight[:, columns] += torch.matmul(hessian_u.transpose(1, 2), hidden_tile)
                if prod_bias is not None:
                    prod_bias[:, columns] += hessian_u.sum(dim=1)
        return (
            prod_hidden.to(hidden.dtype),
            prod_weight.to(weight.dtype),
            None if prod_bias is None else prod_bias.to(bias.dtype),
        )
