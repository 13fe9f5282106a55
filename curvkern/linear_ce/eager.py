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


def _subtract_target(tile: torch.Tensor, target, valid, columns: slice, label_smoothing: float) -> torch.Tensor:
    """``tile − q`` for a probability tile, q = (1 − α)·e_y + α/V the smoothed target (in place)."""
    local, inside = _target_in_tile(target, valid, columns)
    tile.scatter_add_(1, local, inside.to(tile.dtype) * (label_smoothing - 1.0))
    return tile


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
        ignore_index, alpha = hyperparameters.ignore_index, hyperparameters.label_smoothing
        num_classes = weight.shape[0]
        loss = hidden.new_empty(hidden.shape[0], dtype=acc)
        lse = hidden.new_empty(hidden.shape[0], dtype=acc)
        for rows in _tiles(hidden.shape[0], N_TILE):
            hidden_tile, target_tile = hidden[rows].to(acc), target[rows]
            valid = target_tile != ignore_index
            row_lse = torch.full_like(lse[rows], -torch.inf)
            target_logit = torch.zeros_like(row_lse)
            logit_sum = torch.zeros_like(row_lse)
            for columns in _tiles(num_classes, V_TILE):
                z = _logits_tile(hidden_tile, weight[columns].to(acc), None if bias is None else bias[columns].to(acc))
                row_lse = torch.logaddexp(row_lse, torch.logsumexp(z, dim=1))
                local, inside = _target_in_tile(target_tile, valid, columns)
                target_logit += torch.where(inside, z.gather(1, local), 0.0)[:, 0]
                if alpha:
                    logit_sum += z.sum(dim=1)
            row_loss = row_lse - (1 - alpha) * target_logit
            if alpha:
                row_loss -= alpha / num_classes * logit_sum
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
        ignore_index, alpha = hyperparameters.ignore_index, hyperparameters.label_smoothing
        num_classes = weight.shape[0]
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
        for rows in _tiles(hidden.shape[0], N_TILE):
            hidden_tile, target_tile = hidden[rows].to(acc), target[rows]
            valid = target_tile != ignore_index
            scale = _row_scale(grad_scale, valid, rows)
            for columns in _tiles(num_classes, V_TILE):
                weight_tile = weight[columns].to(acc)
                z = _logits_tile(hidden_tile, weight_tile, None if bias is None else bias[columns].to(acc))
                grad_z = torch.exp(z - lse[rows, None]) - alpha / num_classes
                grad_z = _subtract_target(grad_z, target_tile, valid, columns, alpha) * scale
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
        ignore_index, alpha = hyperparameters.ignore_index, hyperparameters.label_smoothing
        num_classes = weight.shape[0]
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

            p_dot_u = torch.zeros_like(lse[rows])
            q_dot_u = torch.zeros_like(p_dot_u)
            for columns in _tiles(num_classes, V_TILE):
                _, z, u = _logits_and_tangent_tile(hidden_tile, weight, bias, columns, *tangent_tiles)
                p, u = torch.exp(z - lse[rows, None]), u[0]
                p_dot_u += (p * u).sum(dim=1)
                local, inside = _target_in_tile(target_tile, valid, columns)
                q_dot_u += (1 - alpha) * torch.where(inside, u.gather(1, local), 0.0)[:, 0]
                if alpha:
                    q_dot_u += alpha / num_classes * u.sum(dim=1)
            dot[rows] = torch.where(valid, p_dot_u - q_dot_u, 0.0)

            for columns in _tiles(num_classes, V_TILE):
                weight_tile, z, u = _logits_and_tangent_tile(hidden_tile, weight, bias, columns, *tangent_tiles)
                p, u = torch.exp(z - lse[rows, None]), u[0]
                hessian_u = p * (u - p_dot_u[:, None]) * scale
                grad_hidden[rows].addmm_(hessian_u, weight_tile)
                grad_weight[columns].addmm_(hessian_u.T, hidden_tile)
                if grad_bias is not None:
                    grad_bias[columns] += hessian_u.sum(dim=0)
                if v_weight is None and v_hidden_tile is None:
                    continue
                # The cross terms: g_z depends on h and W only through z, but Φ also holds h and W
                # outside g_z (g_z·W and g_zᵀ·h), which the Gauss-Newton product drops.
                grad_z = _subtract_target(p - alpha / num_classes, target_tile, valid, columns, alpha) * scale
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

        for rows in _tiles(hidden.shape[0], N_TILE):
            hidden_tile = hidden[rows].to(acc)
            d_hidden_tile = d_hidden[:, rows].to(acc)
            row_scale = _row_scale(scale, target[rows] != hyperparameters.ignore_index, rows)

            running_max = torch.full((hidden_tile.shape[0],), -torch.inf, dtype=acc, device=hidden.device)
            exp_sum = torch.zeros_like(running_max)
            exp_dot_u = torch.zeros((tangents, hidden_tile.shape[0]), dtype=acc, device=hidden.device)
            for columns in _tiles(num_classes, V_TILE):
                _, z, u = _logits_and_tangent_tile(hidden_tile, weight, bias, columns, d_hidden_tile, d_weight, d_bias)
                new_max = torch.maximum(running_max, z.amax(dim=1))
                rescale = torch.exp(running_max - new_max)
                e = torch.exp(z - new_max[:, None])
                exp_sum = exp_sum * rescale + e.sum(dim=1)
                exp_dot_u = exp_dot_u * rescale + (e * u).sum(dim=2)
                running_max = new_max
            lse = running_max + torch.log(exp_sum)
            p_dot_u = exp_dot_u / exp_sum

            for columns in _tiles(num_classes, V_TILE):
                weight_tile, z, u = _logits_and_tangent_tile(
                    hidden_tile, weight, bias, columns, d_hidden_tile, d_weight, d_bias
                )
                p = torch.exp(z - lse[:, None])
                hessian_u = p * (u - p_dot_u[:, :, None]) * row_scale
                prod_hidden[:, rows] += torch.matmul(hessian_u, weight_tile)
                prod_weight[:, columns] += torch.matmul(hessian_u.transpose(1, 2), hidden_tile)
                if prod_bias is not None:
                    prod_bias[:, columns] += hessian_u.sum(dim=1)
        return (
            prod_hidden.to(hidden.dtype),
            prod_weight.to(weight.dtype),
            None if prod_bias is None else prod_bias.to(bias.dtype),
        )
