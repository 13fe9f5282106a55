"""Vocabulary-parallel cross-entropy: DTensor logits sharded on the class dimension (docs/cross_entropy.md,
"Vocabulary-parallel logits").

Each rank holds a slice of every row's classes. A row's softmax needs the whole row's max, Σ e^{z − max} and
label logit, and the HVP's ⟨p, u⟩ as well; the kernels' shard entry points compute this rank's part of them
(``partial_stats``), one ``all_gather`` over the mesh dimension's process group brings every rank's part,
and every rank combines them in rank order, so all ranks hold the same bits whatever order the messages
came in. Then each rank writes its own shard of the gradient (``shard_backward``, given the saved global
lse: no communication) or of the HVP (``shard_hvp``, given the global lse and ⟨p, u⟩).

:class:`ShardedKernels` wraps a backend's kernels behind the whole-row interface (``forward``, ``backward``,
``hvp``) that :mod:`curvkern.ce.function`'s autograd functions call, so the double backward, the
third-derivative guard and ``ce_hvp`` run the same code as for plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from curvkern.hyperparameters import CrossEntropyHyperparameters

# Columns of partial_stats (curvkern.families.LossKernels.partial_stats).
_MAX, _SUM_EXP, _SUM_EXP_U, _AT_LABEL, _TOTAL = range(5)


@dataclass(frozen=True)
class ClassShard:
    """This rank's slice of the class dimension: columns ``offset`` to ``offset + V_local`` of
    ``num_classes``, the slices of the ranks of ``group`` (in rank order) making up the row."""

    group: dist.ProcessGroup
    offset: int
    num_classes: int


@dataclass(frozen=True)
class Layout:
    """How DTensor logits are laid out: the mesh, its placements, and the class shard (None when every
    placement is Replicate: each rank then holds whole rows and computes locally)."""

    mesh: object
    placements: tuple
    shard: ClassShard | None


def _describe(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def layout_of(logits, class_dim: int, who: str) -> Layout:
    """The :class:`Layout` of DTensor ``logits`` whose classes are in dimension ``class_dim``.

    Supported: every mesh dimension Replicate, or one of them ``Shard(class_dim)`` and the others
    Replicate. Raises NotImplementedError naming the placements for anything else: ``Partial`` (the
    logits are not summed yet), a Shard of another dimension (the rows would be split too, and the mean's
    count with them), the class dimension sharded over several mesh dimensions.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = logits.device_mesh, tuple(logits.placements)
    class_dims = []
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        # type() rather than isinstance: _StridedShard (FSDP + TP) derives from Shard.
        if type(placement) is Shard and placement.dim == class_dim:
            class_dims.append(mesh_dim)
            continue
        raise NotImplementedError(
            f"{who}: logits with placements {_describe(placements)} are not supported ({placement!r} on mesh "
            f"dimension {mesh_dim}); supported are Shard({class_dim}) (the class dimension) on one mesh "
            "dimension and Replicate on the others"
        )
    if len(class_dims) > 1:
        raise NotImplementedError(
            f"{who}: logits with placements {_describe(placements)} shard the class dimension over mesh "
            f"dimensions {class_dims}; supported is Shard({class_dim}) on one mesh dimension"
        )
    if not class_dims:
        return Layout(mesh, placements, None)
    _, global_offset = compute_local_shape_and_global_offset(logits.shape, mesh, placements)
    shard = ClassShard(mesh.get_group(class_dims[0]), int(global_offset[class_dim]), int(logits.shape[class_dim]))
    return Layout(mesh, placements, shard)


def check_same_layout(name: str, tensor, logits, who: str) -> None:
    """``tensor`` (``u``, ``out``) must be a DTensor on the logits' mesh with the logits' placements:
    ValueError otherwise (its local shard would not line up with the logits')."""
    from curvkern._dispatch import is_dtensor

    if not is_dtensor(tensor):
        raise ValueError(
            f"{who}: {name} must be a DTensor with the logits' placements {_describe(logits.placements)}, got a "
            f"{type(tensor).__name__}"
        )
    if tensor.device_mesh != logits.device_mesh or tuple(tensor.placements) != tuple(logits.placements):
        raise ValueError(
            f"{who}: {name} has placements {_describe(tensor.placements)} on {tensor.device_mesh}, the logits "
            f"{_describe(logits.placements)} on {logits.device_mesh}: they must match"
        )


def local_target(target, logits, who: str) -> torch.Tensor:
    """The whole target on this rank: a plain tensor as it is, a DTensor on the logits' mesh only when
    every placement is Replicate (each rank needs every row's label); NotImplementedError otherwise."""
    from torch.distributed.tensor import Replicate

    from curvkern._dispatch import is_dtensor

    if not is_dtensor(target):
        return target
    if target.device_mesh != logits.device_mesh or not all(isinstance(p, Replicate) for p in target.placements):
        raise NotImplementedError(
            f"{who}: a DTensor target must be replicated on the logits' mesh, got placements "
            f"{_describe(target.placements)} on {target.device_mesh}"
        )
    return target.to_local()


def replicated(tensor: torch.Tensor, layout: Layout):
    """``tensor`` (the same on every rank) as a Replicate DTensor on the layout's mesh; differentiable."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(tensor, layout.mesh, [Replicate()] * layout.mesh.ndim, run_check=False)


def like_logits(local: torch.Tensor, logits):
    """This rank's shard ``local`` as a DTensor with the logits' mesh, placements, shape and stride."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, logits.device_mesh, logits.placements, run_check=False, shape=logits.shape, stride=logits.stride()
    )


def _gather(stats: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's (N, 5) statistics, in rank order: one all_gather."""
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats, group=group)
    return parts


def _combine(parts: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The whole rows' lse, ⟨p, u⟩, label entry and Σ from the shards' statistics, added in rank order.

    The max over the shards is exact; each shard's sums are rescaled by e^{m_k − M} onto the row's max M
    (shifted by 0 where M = −inf, as the kernels do, so an all −inf row stays NaN as in one process).
    """
    row_max = parts[0][:, _MAX]
    for part in parts[1:]:
        row_max = torch.maximum(row_max, part[:, _MAX])
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    sum_exp = sum_exp_u = at_label = total = 0.0
    for part in parts:
        rescale = torch.exp(part[:, _MAX] - shift)  # 0 for an empty shard (m_k = −inf, sums 0)
        sum_exp = sum_exp + part[:, _SUM_EXP] * rescale
        sum_exp_u = sum_exp_u + part[:, _SUM_EXP_U] * rescale
        at_label = at_label + part[:, _AT_LABEL]
        total = total + part[:, _TOTAL]
    return shift + torch.log(sum_exp), sum_exp_u / sum_exp, at_label, total


class ShardedKernels:
    """A backend's kernels on this rank's class shard, behind the whole-row ``forward``/``backward``/``hvp``
    of :class:`curvkern.families.LossKernels` (the reductions across the shards inside)."""

    def __init__(self, kernels, shard: ClassShard) -> None:
        self.kernels = kernels
        self.shard = shard

    def _stats(self, logits, target, u, hyperparameters: CrossEntropyHyperparameters):
        stats = self.kernels.partial_stats(
            logits, target, u, self.shard.offset, self.shard.num_classes, hyperparameters
        )
        if stats.shape[0] == 0:  # no rows anywhere (every rank holds the same rows): nothing to send
            zeros = stats[:, 0]
            return zeros, zeros, zeros, zeros
        return _combine(_gather(stats, self.shard.group))

    def _label_terms(self, at_label, total, hyperparameters):
        """(1 − α)·w_y + α/V·Σw, the label's part of the loss (w = z) or of ⟨u, q⟩ (w = u)."""
        alpha = hyperparameters.label_smoothing
        terms = (1 - alpha) * at_label
        return terms + alpha / self.shard.num_classes * total if alpha else terms

    def forward(self, logits, target, hyperparameters: CrossEntropyHyperparameters):
        lse, _, at_label, total = self._stats(logits, target, None, hyperparameters)
        valid = target != hyperparameters.ignore_index
        loss = lse - self._label_terms(at_label, total, hyperparameters)
        return torch.where(valid, loss, 0.0), torch.where(valid, lse, 0.0)

    def backward(self, logits, target, lse, grad_scale, hyperparameters: CrossEntropyHyperparameters):
        return self.kernels.shard_backward(
            logits, target, lse, grad_scale, self.shard.offset, self.shard.num_classes, hyperparameters
        )

    def hvp(self, logits, target, u, scale, hyperparameters, shift_period, out, out_is_callers=False):
        if shift_period:
            raise NotImplementedError("the vocabulary-parallel HVP has no causal shift")
        lse, p_dot_u, at_label, total = self._stats(logits, target, u, hyperparameters)
        valid = target != hyperparameters.ignore_index
        lse, p_dot_u = torch.where(valid, lse, 0.0), torch.where(valid, p_dot_u, 0.0)
        self.kernels.shard_hvp(logits, target, u, lse, p_dot_u, scale, self.shard.num_classes, hyperparameters, out)
        return torch.where(valid, p_dot_u - self._label_terms(at_label, total, hyperparameters), 0.0)
