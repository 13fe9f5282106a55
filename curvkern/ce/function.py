"""``cross_entropy`` and ``ce_hvp``: argument checks, the reduction scale on the device, and the two
autograd functions whose forward and backward are each one kernel of the selected backend.

The public functions take ``F.cross_entropy``'s shapes (classes in dim 1) and hand the kernels (N, C)
rows, classes last; the hessian-eigenthings objects enter below that, through
:func:`_cross_entropy_classes_last` and :func:`_hvp_into`, with (…, V) logits (classes last).

``_CrossEntropy`` saves the logits and the per-row log-sum-exp only. Its backward is
``_CrossEntropyBackward``, itself an autograd function whose backward is the fused Hessian-vector
product: double backward never materialises a softmax of shape (N, V), and also returns the
gradient with respect to the loss's incoming gradient (docs/cross_entropy.md, "Double backward").
"""

from __future__ import annotations

import math

import torch

from curvkern._dispatch import eager_for_missing_variants, is_dtensor, select
from curvkern.ce import vocab_parallel
from curvkern.ce.eager import accumulation_dtype
from curvkern.hyperparameters import CrossEntropyLossHyperparameters, loss_variants

FAMILY = "cross_entropy"
_DEFAULTS = CrossEntropyLossHyperparameters()
REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# F.cross_entropy's class-index dtypes; uint8 labels are widened to int64 for the kernels.
TARGET_DTYPES = (torch.int64, torch.uint8)
THIRD_DERIVATIVE_ERROR = (
    "curvkern.cross_entropy: third derivatives are not implemented; the Hessian-vector product of the "
    "double backward cannot be differentiated again"
)


def _check_not_dtensor(**tensors: torch.Tensor) -> None:
    """DTensor arguments raise where only plain tensors are taken (the hessian-eigenthings loss objects,
    the classes-last internal paths): their kernels would see one process's local rows as whole rows."""
    for name, tensor in tensors.items():
        if is_dtensor(tensor):
            raise NotImplementedError(
                f"curvkern.cross_entropy: {name} is a DTensor ({tensor.placements}); this entry point takes plain "
                "torch.Tensor arguments, which includes DistributedDataParallel (each rank passes its local batch). "
                "DTensor logits sharded on the class dimension (vocabulary-parallel) or replicated are taken by "
                "curvkern.cross_entropy and curvkern.ce_hvp"
            )


def _check_arguments(logits: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int) -> None:
    """Checks on classes-last arguments: (…, V) logits and (…) int64 targets."""
    _check_not_dtensor(logits=logits, target=target)
    _check_row_arguments(logits.shape, logits.dtype, logits.device, target, reduction, ignore_index)


def _check_row_arguments(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, target: torch.Tensor, reduction: str, ignore_index: int
) -> None:
    """:func:`_check_arguments` on the logits' (…, V) global shape, dtype and device (a DTensor's are
    its global shape and its local shard's dtype and device)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction; expected one of {REDUCTIONS}")
    if dtype not in LOGIT_DTYPES:
        raise TypeError(f"curvkern.cross_entropy: logits must be one of {LOGIT_DTYPES}, got {dtype}")
    if len(shape) == 0:
        raise ValueError("curvkern.cross_entropy: logits must have a class dimension, got a 0-dim tensor")
    soft = target.is_floating_point()
    if soft:
        if target.shape != shape or target.dtype != dtype:
            raise RuntimeError(
                f"probability targets must have the logits' shape and dtype {tuple(shape)} {dtype}, got "
                f"{tuple(target.shape)} {target.dtype}"
            )
    elif target.dtype != torch.int64:
        raise RuntimeError(f"expected target dtype to be Long (class indices), got {target.dtype}")
    elif target.shape != shape[:-1]:
        raise ValueError(
            f"Expected target size {tuple(shape[:-1])} for logits of shape {tuple(shape)} "
            f"(classes last), got {tuple(target.shape)}"
        )
    if target.device != device:
        raise RuntimeError(f"logits on {device} and target on {target.device}: expected one device")
    if shape[-1] == 0 and math.prod(shape[:-1]) > 0:
        raise ValueError("curvkern.cross_entropy: logits have no classes (C = 0)")
    if not soft:
        _check_target_range(target, shape[-1], ignore_index)


def _check_class_dim_arguments(logits: torch.Tensor, target: torch.Tensor) -> None:
    """F.cross_entropy's shape and dtype rules for (C), (N, C) or (N, C, d1, …, dk) logits, with its
    messages; a floating target shaped like the logits holds class probabilities. ``logits`` may be a DTensor
    (its global shape is checked)."""
    if logits.dim() == 0:
        raise ValueError(
            "curvkern.cross_entropy: logits must be (C), (N, C) or (N, C, d1, ..., dk), got a 0-dim tensor"
        )
    if target.is_floating_point() and target.shape == logits.shape:
        if target.dtype != logits.dtype:
            raise RuntimeError(f"probability targets must have the logits' dtype {logits.dtype}, got {target.dtype}")
        return
    if target.dtype not in TARGET_DTYPES:
        raise RuntimeError(f"expected target dtype to be Long or Byte (class indices), but got {target.dtype}")
    expected = logits.shape[:1] + logits.shape[2:] if logits.dim() >= 2 else torch.Size()
    if target.shape == expected:
        return
    mismatch = (
        f"target size {list(expected)} for logits of shape {list(logits.shape)} (classes in dim 1), "
        f"got {list(target.shape)}"
    )
    if logits.dim() == 2 and target.dim() == 1:
        raise ValueError(
            f"Expected input batch_size ({logits.shape[0]}) to match target batch_size "
            f"({target.shape[0]}): expected {mismatch}"
        )
    if logits.dim() == 1 and target.dim() == 1:  # PyTorch's ValueError here also takes a size-1 target
        raise ValueError(f"For 1D input, the target must be 0-dim: expected {mismatch}")
    raise RuntimeError(f"Expected {mismatch}")


def _classes_last(tensor: torch.Tensor, tangent_dims: int = 0) -> torch.Tensor:
    """(N, C, d1, …, dk) as an (N, d1, …, dk, C) view; (C) and (N, C) as they are. ``tangent_dims`` leading
    dimensions (1 for (K, N, C, …) tangents) are kept in front."""
    return tensor.movedim(1 + tangent_dims, -1) if tensor.dim() - tangent_dims > 2 else tensor


def _classes_first(tensor: torch.Tensor, tangent_dims: int = 0) -> torch.Tensor:
    """The inverse of :func:`_classes_last` on a tensor of the same number of dimensions."""
    return tensor.movedim(-1, 1 + tangent_dims) if tensor.dim() - tangent_dims > 2 else tensor


def _class_indices(target: torch.Tensor) -> torch.Tensor:
    """Class indices as the kernels read them: int64 (probability targets as they are)."""
    return target if target.dtype == torch.int64 or target.is_floating_point() else target.long()


def _flat_target(target: torch.Tensor) -> torch.Tensor:
    """The kernels' target: (N,) contiguous class indices, or (N, V) contiguous probabilities from a
    classes-last (…, V) floating target."""
    if target.is_floating_point():
        return target.reshape(-1, target.shape[-1] if target.dim() else 1).contiguous()
    return target.reshape(-1).contiguous()


def _row_count(target: torch.Tensor) -> int:
    return target.shape[0] if target.is_floating_point() else target.numel()


def _kernels_for(fused: str, device: torch.device, hyperparameters, soft: bool, who: str = "curvkern.cross_entropy"):
    """The selected backend's kernels. A loss variant the backend does not implement raises
    NotImplementedError naming it and the backend when ``fused`` names that backend; ``"auto"`` takes the
    eager reference for it instead (every variant is implemented there), with a one-time warning."""
    name, kernels = select(FAMILY, fused, device)
    missing = [v for v in loss_variants(hyperparameters, soft) if v not in getattr(kernels, "VARIANTS", frozenset())]
    if not missing:
        return kernels
    if fused == "auto":
        return eager_for_missing_variants(FAMILY, name, missing)
    raise NotImplementedError(
        f"{who}: the {name} backend (fused={fused!r}) does not implement {', '.join(missing)} yet; "
        "fused='eager' (or 'auto') does"
    )


def _loss_hyperparameters(
    ignore_index, label_smoothing, reduction, z_loss, softcap, weight, num_classes, dtype, device
):
    """The record of a call, its variants checked (ValueError naming the hyperparameter)."""
    hyperparameters = CrossEntropyLossHyperparameters(
        int(ignore_index),
        float(label_smoothing),
        reduction,
        z_loss=z_loss,
        softcap=softcap,
        weight=weight,
    )
    hyperparameters.check_weight(num_classes, dtype, device)
    return hyperparameters


def _check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Targets outside [0, V) other than ``ignore_index`` raise like PyTorch's, on CPU tensors.

    On a GPU the check would cost a host sync on every call; there the kernels write NaN for the
    row instead (the Triton kernel also asserts when TRITON_DEBUG is set), so a bad label is never
    a silent wrong number.
    """
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        raise IndexError(f"Target {target[bad][0].item()} is out of bounds.")


def _row_shape(tensor: torch.Tensor, tangent_dims: int = 0) -> tuple[int, ...]:
    """(N, V) for (…, V); (K, N, V) for (K, …, V) tangents (``tangent_dims`` 1)."""
    lead = tuple(tensor.shape[:tangent_dims])
    return (*lead, math.prod(tensor.shape[tangent_dims:-1]), tensor.shape[-1])


def _as_rows(tensor: torch.Tensor, tangent_dims: int = 0) -> torch.Tensor:
    """(…, V) as (N, V) (or (K, …, V) as (K, N, V)) with a dense last dimension and any other strides: a view
    where one exists."""
    rows = tensor.reshape(_row_shape(tensor, tangent_dims))
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def _writable_rows(tensor: torch.Tensor, tangent_dims: int = 0) -> torch.Tensor | None:
    """(…, V) as an (N, V) view (or (K, …, V) as (K, N, V)) with a dense last dimension, or None where no such
    view exists."""
    try:
        rows = tensor.view(_row_shape(tensor, tangent_dims))
    except RuntimeError:
        return None
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else None


def _mean_scale(valid_count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / n with n counted exactly (int64) on the device; n = 0 gives inf, so the loss is 0/0 = NaN."""
    return torch.reciprocal(valid_count.to(dtype))


def _reduction_scale(
    target: torch.Tensor, ignore_index: int, reduction: str, dtype: torch.dtype, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The reduction's weight c: 1 for ``sum`` and ``none``; for ``mean`` 1/n over the n valid rows, 1/N
    over all N rows for probability targets, 1/Σ w_{y_r} over the valid rows with class weights (class
    indices), as F.cross_entropy divides."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=target.device)
    if target.is_floating_point():
        return _mean_scale(torch.tensor(target.shape[0], device=target.device), dtype)
    valid = target != ignore_index
    if weight is None:
        return _mean_scale(valid.sum(), dtype)
    labels = torch.where(valid, target, 0).clamp(0, max(weight.shape[0] - 1, 0))
    return torch.reciprocal(torch.where(valid, weight.to(dtype)[labels], 0.0).sum())


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, kernels, hyperparameters):
        loss_rows, lse = kernels.forward(logits, target, hyperparameters)
        h = hyperparameters
        scale = _reduction_scale(target, h.ignore_index, h.reduction, lse.dtype, h.weight)
        ctx.save_for_backward(logits, target, lse, scale)
        ctx.config = (kernels, hyperparameters)
        if hyperparameters.reduction == "none":
            return loss_rows.to(logits.dtype)
        return (loss_rows.sum() * scale).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse, scale = ctx.saved_tensors
        grad_logits = _CrossEntropyBackward.apply(logits, grad_loss, target, lse, scale, *ctx.config)
        return grad_logits, None, None, None


class _CrossEntropyBackward(torch.autograd.Function):
    """grad_logits = grad_loss · c_r (p_r − q_r); its own backward is the fused HVP kernel."""

    @staticmethod
    def forward(ctx, logits, grad_loss, target, lse, scale, kernels, hyperparameters):
        grad_scale = grad_loss.to(scale.dtype) * scale
        ctx.save_for_backward(logits, target, grad_scale, scale)
        ctx.config = (kernels, hyperparameters, grad_loss.dtype)
        return kernels.backward(logits, target, lse, grad_scale, hyperparameters)

    @staticmethod
    def backward(ctx, u):
        with torch.no_grad():
            outputs = _CrossEntropyBackward._hvp(ctx, u)
        if torch.is_grad_enabled() and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or u.requires_grad):
            # create_graph=True over logits that require grad: a third derivative would run through these
            # outputs. torch's @once_differentiable checks only u, so an HVP taken with create_graph=True
            # would come back detached and a loss built on it would silently add nothing to the gradient.
            # Instead the outputs carry a node that raises if anything differentiates them.
            error = torch._C._functions.DelayedError(THIRD_DERIVATIVE_ERROR.encode(), 2)
            return (*error(*(x.detach().requires_grad_() for x in outputs[:2])), *outputs[2:])
        return outputs

    @staticmethod
    def _hvp(ctx, u):
        logits, target, grad_scale, scale = ctx.saved_tensors
        kernels, hyperparameters, grad_loss_dtype = ctx.config
        hvp = torch.empty_like(logits, memory_format=torch.contiguous_format)
        dot = kernels.hvp(logits, target, _as_rows(u.to(logits.dtype)), grad_scale, hyperparameters, 0, hvp)
        # d/d(grad_loss) of ⟨u, grad_loss · c (p − q)⟩ = c ⟨u, p − q⟩, per row for reduction="none".
        grad_grad_loss = dot * scale if hyperparameters.reduction == "none" else dot.sum() * scale
        return hvp, grad_grad_loss.to(grad_loss_dtype), None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    ignore_index: int = _DEFAULTS.ignore_index,
    reduction: str = _DEFAULTS.reduction,
    label_smoothing: float = _DEFAULTS.label_smoothing,
    z_loss: float = _DEFAULTS.z_loss,
    softcap: float | None = _DEFAULTS.softcap,
    fused: str = "auto",
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy``, differentiable twice through kernels, with the loss variants
    language-model training uses.

    Shapes are F.cross_entropy's: ``logits`` (C), (N, C) or (N, C, d1, …, dk), classes in dim 1; ``target``
    (), (N) or (N, d1, …, dk) of class indices in [0, C) or ``ignore_index``, int64 (uint8 accepted, as
    PyTorch does). Logits are fp32, fp64, bf16 or fp16; the kernels accumulate in fp64 for fp64 logits and
    fp32 otherwise, and the loss has the logits' dtype.

    Per element, with α = ``label_smoothing`` and p = softmax of the element's C logits:
    ℓ = logsumexp(z) − ⟨(1 − α) e_y + α / C, z⟩, and 0 where the target is ``ignore_index``.
    ``reduction``: ``"none"`` returns ℓ in the target's shape; ``"sum"`` Σ ℓ; ``"mean"`` Σ ℓ / n with n
    the number of non-ignored targets (NaN when n = 0, as PyTorch). The gradient is c (p − q) with c the
    reduction's weight (1/n, 1 or the incoming per-element gradient, 0 where ignored), q the smoothed
    target; the backward is one kernel and the backward of the backward the fused Hessian-vector product
    of :func:`ce_hvp`. With d1…dk present the kernels read (N·d1⋯dk, C) rows: a view where the classes
    are already the dense dimension, one copy otherwise; results come back in the logits' shape.
    Conventions and formulas: docs/cross_entropy.md.

    Loss variants (docs/cross_entropy.md, "Loss variants"; each enters the gradient and the HVP):
    ``weight`` (C,) per-class weights in the logits' dtype (the weighted mean divides by Σ w_y over the valid
    targets, as F.cross_entropy); ``target`` of class probabilities, a floating tensor of the logits' shape and
    dtype (``ignore_index`` does not apply; the mean divides by the number of elements N·d1⋯dk); ``z_loss`` λ ≥ 0
    adds λ·logsumexp(z)² to each valid element's loss; ``softcap`` c > 0 replaces the logits by c·tanh(z/c)
    first. The eager backend implements them all; a backend that lacks one raises NotImplementedError naming
    it when ``fused`` names that backend, and ``"auto"`` takes the eager one for it.

    ``fused`` picks the backend (``"auto"``, ``"eager"``, ``"cpp"``, ``"triton"``; see
    :mod:`curvkern._dispatch`).

    Raises, before any kernel runs: ``ValueError`` for a bad ``reduction``, 0-dim logits or, on (N, C)
    logits, a target of another batch size; ``RuntimeError`` for another target shape, a target that is
    not int64/uint8, ``label_smoothing`` outside [0, 1] or tensors on two devices; ``TypeError`` for
    logits of another dtype; ``IndexError`` for a target outside [0, C) on CPU tensors (on a GPU that
    element's loss is NaN instead: the check would cost a host sync); ``ValueError`` naming ``z_loss``,
    ``softcap`` or ``weight`` for a value outside its range (a weight not (C,), not in the logits' dtype or
    device, or not finite on the CPU); ``NotImplementedError`` for a loss variant the selected backend (or
    DTensor logits) does not implement.

    DTensor logits (vocabulary parallelism; docs/cross_entropy.md, "Vocabulary-parallel logits"): sharded
    on the class dimension (``Shard(1)``, ``Shard(0)`` for (C) logits) on one mesh dimension and Replicate on
    the others, or replicated; ``target`` a plain tensor or a replicated DTensor holding every row's label.
    The row statistics are reduced over the class shards with one ``all_gather`` on that mesh dimension's
    process group (every rank of it must call); the loss is a DTensor with Replicate placements, and its
    gradient (and the double backward's HVP) a DTensor with the logits' placements, each rank writing its
    shard. Other layouts (``Partial``, a Shard of another dimension, the class dimension sharded over
    several mesh dimensions, a sharded target) raise ``NotImplementedError`` naming the placements.
    """
    variants = dict(z_loss=z_loss, softcap=softcap, weight=weight)
    if is_dtensor(logits) or is_dtensor(target):
        _refuse_dtensor_variants("curvkern.cross_entropy", target, **variants)
        return _dtensor_cross_entropy(
            logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, fused=fused
        )
    _check_class_dim_arguments(logits, target)
    return _cross_entropy_classes_last(
        _classes_last(logits),
        _classes_last(target) if target.is_floating_point() else _class_indices(target),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        fused=fused,
        **variants,
    )


def _refuse_dtensor_variants(who: str, target, *, z_loss, softcap, weight) -> None:
    """The vocabulary-parallel path implements no loss variant yet: NotImplementedError naming them."""
    used = {
        "z_loss": bool(z_loss),
        "softcap": softcap is not None,
        "weight": weight is not None,
        "probability targets": target.is_floating_point(),
    }
    names = [name for name, in_use in used.items() if in_use]
    if names:
        raise NotImplementedError(
            f"{who}: {', '.join(names)} on DTensor logits (vocabulary-parallel) is not implemented; pass plain tensors"
        )


def _cross_entropy_classes_last(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    fused: str,
    z_loss: float = _DEFAULTS.z_loss,
    softcap: float | None = _DEFAULTS.softcap,
    weight: torch.Tensor | None = _DEFAULTS.weight,
) -> torch.Tensor:
    """:func:`cross_entropy` on (…, V) logits (classes last) and (…) int64 targets or (…, V) probabilities."""
    _check_arguments(logits, target, reduction, ignore_index)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    hyperparameters = _loss_hyperparameters(
        ignore_index, label_smoothing, reduction, z_loss, softcap, weight, logits.shape[-1], logits.dtype, logits.device
    )
    soft = target.is_floating_point()
    kernels = _kernels_for(fused, logits.device, hyperparameters, soft)
    rows = _as_rows(logits)
    loss = _CrossEntropy.apply(rows, _flat_target(target), kernels, hyperparameters)
    return loss.view(logits.shape[:-1]) if reduction == "none" else loss


def ce_hvp(
    logits: torch.Tensor,
    target: torch.Tensor,
    u: torch.Tensor,
    *,
    ignore_index: int = _DEFAULTS.ignore_index,
    reduction: str = _DEFAULTS.reduction,
    weight: torch.Tensor | None = _DEFAULTS.weight,
    label_smoothing: float = _DEFAULTS.label_smoothing,
    z_loss: float = _DEFAULTS.z_loss,
    softcap: float | None = _DEFAULTS.softcap,
    out: torch.Tensor | None = None,
    fused: str = "auto",
) -> torch.Tensor:
    """The Hessian of :func:`cross_entropy`'s loss with respect to the logits, times ``u``: one kernel.

    ``logits``, ``target``, ``ignore_index`` and ``reduction`` as in :func:`cross_entropy` (classes in
    dim 1); ``u`` and ``out`` have the logits' shape, dtype and device, or ``(K, *logits.shape)`` for K
    tangents at once (block Lanczos, Hutch++): each row's softmax statistics are then computed once for all
    K, and ``out[k]`` equals ``ce_hvp(logits, target, u[k])`` up to the rounding of its row sums. For each
    element (the C logits along dim 1), with p their softmax: ``H u = c (p ⊙ u − p ⟨p, u⟩)``, with c the
    reduction's weight
    (1/n over the n non-ignored targets for ``mean``, 1 for ``sum`` and ``none``, 0 where ignored).
    This is the double backward of ``F.cross_entropy`` with an incoming gradient of ones; label
    smoothing does not enter the Hessian (docs/cross_entropy.md). ``weight``, probability targets,
    ``z_loss`` and ``softcap`` as in :func:`cross_entropy`: with them the Hessian is the one of
    docs/cross_entropy.md, "Loss variants" (``label_smoothing`` enters it through the class weights, and
    through the gradient term of the soft cap). fp64 logits accumulate in fp64,
    fp32/bf16/fp16 in fp32; the result has the logits' dtype and is written into ``out`` when given.
    Not differentiable.

    DTensor logits as in :func:`cross_entropy`; ``u`` and ``out`` are then DTensors with the logits' mesh
    and placements, and the result is one too (one tangent per call).

    Raises as :func:`cross_entropy` does, ``ValueError`` when ``u`` or ``out`` does not match the logits
    (for DTensor logits: is not a DTensor with their placements), and ``NotImplementedError`` for K tangents
    of DTensor logits.
    """
    if any(is_dtensor(tensor) for tensor in (logits, target, u, out)):
        if u.dim() != logits.dim():
            raise NotImplementedError(
                f"curvkern.ce_hvp: K tangents ({tuple(u.shape)}) of DTensor logits are not implemented; pass one "
                "tangent of the logits' shape per call"
            )
        _refuse_dtensor_variants("curvkern.ce_hvp", target, z_loss=z_loss, softcap=softcap, weight=weight)
        if label_smoothing:
            raise NotImplementedError("curvkern.ce_hvp: label_smoothing on DTensor logits is not implemented")
        return _dtensor_ce_hvp(logits, target, u, ignore_index=ignore_index, reduction=reduction, out=out, fused=fused)
    _check_class_dim_arguments(logits, target)
    _check_hvp_tensors(logits, u, out)
    target = _class_indices(target)
    rows_target = _classes_last(target) if target.is_floating_point() else target
    _check_arguments(_classes_last(logits), rows_target, reduction, ignore_index)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    num_classes = logits.shape[_class_dim(logits)]
    hyperparameters = _loss_hyperparameters(
        ignore_index, label_smoothing, reduction, z_loss, softcap, weight, num_classes, logits.dtype, logits.device
    )
    kernels = _kernels_for(fused, logits.device, hyperparameters, target.is_floating_point(), "curvkern.ce_hvp")
    return _class_dim_hvp(kernels, logits, target, u, hyperparameters=hyperparameters, out=out)


def _check_hvp_tensors(logits: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None) -> None:
    """``u`` must have the logits' (global) shape or ``(K, *logits.shape)`` (K tangents), their dtype and
    device, and ``out`` u's shape, dtype and device: ValueError otherwise."""
    tangents = u.dim() == logits.dim() + 1 and u.shape[1:] == logits.shape
    if (u.shape != logits.shape and not tangents) or u.dtype != logits.dtype or u.device != logits.device:
        raise ValueError(
            f"u must have the logits' shape {tuple(logits.shape)} (or (K, *logits.shape) for K tangents), dtype "
            f"and device: got {tuple(u.shape)} {u.dtype} on {u.device} for logits {logits.dtype} on {logits.device}"
        )
    if out is not None and (out.shape != u.shape or out.dtype != u.dtype or out.device != u.device):
        raise ValueError(
            f"out must match u's shape {tuple(u.shape)}, dtype {u.dtype} and device, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )


def _class_dim_hvp(kernels, logits, target, u, *, hyperparameters, out):
    """:func:`ce_hvp` on checked plain tensors (classes in dim 1), int64 targets or probabilities; ``u`` and
    ``out`` of the logits' shape or (K, *logits.shape)."""
    tangent_dims = u.dim() - logits.dim()
    result = _hvp_into(
        kernels,
        _classes_last(logits),
        _flat_target(_classes_last(target) if target.is_floating_point() else target),
        _classes_last(u, tangent_dims),
        hyperparameters,
        None if out is None else _classes_last(out, tangent_dims),
        shift_period=0,
        valid_count=None,
    )
    return out if out is not None else _classes_first(result, tangent_dims)


def _hvp_into(kernels, logits, flat_target, u, hyperparameters, out, shift_period, valid_count):
    """Run the HVP kernel on (…, V) tensors (classes last; ``u`` (…, V) or (K, …, V) for K tangents; ``out``,
    when given, checked by the caller to match ``u``), writing into ``out`` (allocated when None) without
    copies where the rows are already strided views; returns ``out``. Label smoothing does not enter the
    Hessian: ``out`` is the same for any ``hyperparameters.label_smoothing``."""
    ignore_index, reduction = hyperparameters.ignore_index, hyperparameters.reduction
    tangent_dims = u.dim() - logits.dim()
    out_given = out is not None
    if not out_given:
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
    acc = accumulation_dtype(logits.dtype)
    if reduction == "mean" and valid_count is not None:  # the caller counted (the causal shift)
        scale = _mean_scale(valid_count, acc)
    else:
        scale = _reduction_scale(flat_target, ignore_index, reduction, acc, hyperparameters.weight)
    out_rows = _writable_rows(out, tangent_dims)
    out_is_callers = out_given and out_rows is not None
    with torch.no_grad():
        result_rows = (
            out_rows
            if out_rows is not None
            else torch.empty(_row_shape(out, tangent_dims), dtype=out.dtype, device=out.device)
        )
        kernels.hvp(
            _as_rows(logits),
            flat_target,
            _as_rows(u, tangent_dims),
            scale,
            hyperparameters,
            shift_period,
            result_rows,
            out_is_callers,
        )
        if out_rows is None:  # an ``out`` no (N, V) view can write, e.g. a transposed one
            out.copy_(result_rows.view(out.shape))
    return out


def _class_dim(logits) -> int:
    return 0 if logits.dim() == 1 else 1


def _global_rows_shape(logits) -> torch.Size:
    """The (…, V) classes-last shape of (C), (N, C) or (N, C, d1, …, dk) logits, from their global shape."""
    shape = list(logits.shape)
    return torch.Size(shape[:1] + shape[2:] + shape[1:2] if len(shape) > 2 else shape)


def _dtensor_kernels(logits, target, reduction: str, ignore_index: int, fused: str, who: str):
    """For DTensor ``logits``: their layout, the whole target on this rank (int64, checked against the
    global shape) and the kernels, wrapped to reduce over the class shards when the classes are sharded."""
    if not is_dtensor(logits):
        raise NotImplementedError(
            f"{who}: DTensor arguments need DTensor logits (sharded on the class dimension or replicated); "
            "got plain logits"
        )
    if logits.dim() == 0:
        raise ValueError(f"{who}: logits must be (C), (N, C) or (N, C, d1, ..., dk), got a 0-dim tensor")
    layout = vocab_parallel.layout_of(logits, _class_dim(logits), who)
    target = vocab_parallel.local_target(target, logits, who)
    _check_class_dim_arguments(logits, target)
    target = _class_indices(target)
    device = logits.device  # a DTensor's: its local shard's device
    _check_row_arguments(_global_rows_shape(logits), logits.dtype, device, target, reduction, ignore_index)
    _, kernels = select(FAMILY, fused, device)
    if layout.shard is not None:
        kernels = vocab_parallel.ShardedKernels(kernels, layout.shard)
    return layout, target, kernels


def _dtensor_cross_entropy(logits, target, *, ignore_index, reduction, label_smoothing, fused):
    """:func:`cross_entropy` on DTensor logits: the same autograd functions on this rank's shard, with the
    kernels reducing over the class shards; a Replicate loss, gradients with the logits' placements."""
    layout, target, kernels = _dtensor_kernels(logits, target, reduction, ignore_index, fused, "curvkern.cross_entropy")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    hyperparameters = CrossEntropyLossHyperparameters(int(ignore_index), float(label_smoothing), reduction)
    # to_local() is differentiable: the gradient of the shard comes back as a DTensor with the placements.
    rows = _as_rows(_classes_last(logits.to_local()))
    loss = _CrossEntropy.apply(rows, target.reshape(-1).contiguous(), kernels, hyperparameters)
    return vocab_parallel.replicated(loss.view(target.shape) if reduction == "none" else loss, layout)


def _dtensor_ce_hvp(logits, target, u, *, ignore_index, reduction, out, fused):
    """:func:`ce_hvp` on DTensor logits, ``u`` and ``out`` with the logits' placements."""
    who = "curvkern.ce_hvp"
    _, target, kernels = _dtensor_kernels(logits, target, reduction, ignore_index, fused, who)
    vocab_parallel.check_same_layout("u", u, logits, who)
    if out is not None:
        vocab_parallel.check_same_layout("out", out, logits, who)
    _check_hvp_tensors(logits, u, out)
    with torch.no_grad():
        result = _class_dim_hvp(
            kernels,
            logits.to_local(),
            target,
            u.to_local(),
            hyperparameters=CrossEntropyLossHyperparameters(ignore_index=int(ignore_index), reduction=reduction),
            out=None if out is None else out.to_local(),
        )
    return out if out is not None else vocab_parallel.like_logits(result, logits)
