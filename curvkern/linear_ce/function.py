"""``linear_cross_entropy`` and ``linear_ce_ggn_vp``: argument checks, the reduction scale on the device, the
backend choice (:func:`curvkern._dispatch.select`, family ``"linear_cross_entropy"``), and the two autograd
functions whose forward and backward are each one tiled kernel.

``_LinearCrossEntropy`` saves hidden, weight, bias, the targets and the per-row log-sum-exp (N numbers),
never the logits. Its backward is ``_LinearCrossEntropyBackward``, itself an autograd function whose
backward is the tiled Hessian-vector product with the cross terms (docs/linear_cross_entropy.md,
"Double backward").
"""

from __future__ import annotations

import torch

from curvkern._dispatch import eager_for_missing_variants, is_dtensor, select
from curvkern.hyperparameters import CrossEntropyHyperparameters
from curvkern.linear_ce.eager import accumulation_dtype
from curvkern.linear_ce.variants import LinearCrossEntropyHyperparameters, missing_variants, refuse_missing_variants

FAMILY = "linear_cross_entropy"
_DEFAULTS = CrossEntropyHyperparameters()
REDUCTIONS = ("mean", "sum", "none")
INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
THIRD_DERIVATIVE_ERROR = (
    "curvkern.linear_cross_entropy: third derivatives are not implemented; the Hessian-vector product of the "
    "double backward cannot be differentiated again"
)


def _check_not_dtensor(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if is_dtensor(tensor):
            raise NotImplementedError(
                f"curvkern.linear_cross_entropy: {name} is a DTensor ({tensor.placements}); supported are plain "
                "torch.Tensor arguments (DistributedDataParallel included: each rank passes its local batch). "
                "Tensor- or vocabulary-parallel weights are not supported yet; gather them with .full_tensor() first"
            )


def _check_arguments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
) -> None:
    _check_not_dtensor(hidden=hidden, weight=weight, target=target, bias=bias)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction; expected one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if hidden.dtype not in INPUT_DTYPES:
        raise TypeError(f"curvkern.linear_cross_entropy: hidden must be one of {INPUT_DTYPES}, got {hidden.dtype}")
    if hidden.dim() == 0:
        raise ValueError("curvkern.linear_cross_entropy: hidden must be (..., d), got a 0-dim tensor")
    features = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != features:
        raise ValueError(
            f"curvkern.linear_cross_entropy: weight must be (V, d) = (V, {features}) like nn.Linear.weight "
            f"for hidden of shape {tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    num_classes = weight.shape[0]
    if bias is not None and bias.shape != (num_classes,):
        raise ValueError(
            f"curvkern.linear_cross_entropy: bias must be (V,) = ({num_classes},), got {tuple(bias.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(
                f"curvkern.linear_cross_entropy: {name} is {tensor.dtype}, hidden {hidden.dtype}: expected one dtype"
            )
    if target.is_floating_point():
        raise NotImplementedError(
            "curvkern.linear_cross_entropy: probability (soft) targets are not supported: they would be an (N, V) "
            "tensor, the size of the logits this function exists not to hold. Pass int64 class indices, or use "
            "curvkern.cross_entropy (which takes probability targets) on materialised logits"
        )
    if target.dtype != torch.int64:
        raise RuntimeError(f"expected target dtype to be Long (class indices), got {target.dtype}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"curvkern.linear_cross_entropy: expected target of shape {tuple(hidden.shape[:-1])} for hidden of "
            f"shape {tuple(hidden.shape)}, got {tuple(target.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias), ("target", target)):
        if tensor is not None and tensor.device != hidden.device:
            raise RuntimeError(f"hidden on {hidden.device} and {name} on {tensor.device}: expected one device")
    if num_classes == 0 and target.numel() > 0:
        raise ValueError("curvkern.linear_cross_entropy: weight has no classes (V = 0)")
    _check_target_range(target, num_classes, ignore_index)


def _check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Targets outside [0, V) other than ``ignore_index`` raise on CPU tensors; on a GPU the check would cost
    a host sync, and the kernels give NaN for that row's loss instead."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        raise IndexError(f"Target {target[bad][0].item()} is out of bounds.")


def _reduction_scale(
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    dtype: torch.dtype,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """c of the reduction as a 0-dim device tensor: 1/n over the n non-ignored rows for ``mean`` (n counted
    exactly as an int64; n = 0 gives inf and the loss 0·inf = NaN, as PyTorch), 1/Σ_valid w_{y_r} with class
    weights (F.cross_entropy's weighted mean), 1 otherwise."""
    if reduction == "mean" and class_weight is not None:
        valid = target != ignore_index
        safe = torch.where(valid, target, 0).clamp(0, max(class_weight.shape[0] - 1, 0))
        return torch.reciprocal(torch.where(valid, class_weight.to(dtype)[safe], 0.0).sum())
    if reduction == "mean":
        return torch.reciprocal((target != ignore_index).sum().to(dtype))
    return torch.ones((), dtype=dtype, device=target.device)


def _hyperparameters(
    device, num_classes, ignore_index, label_smoothing, reduction, z_loss, softcap, class_weight
) -> LinearCrossEntropyHyperparameters:
    """The checked record of the hyperparameters (ValueError naming a bad z_loss, softcap or class_weight)."""
    _check_not_dtensor(class_weight=class_weight)
    hyperparameters = LinearCrossEntropyHyperparameters(
        int(ignore_index), float(label_smoothing), reduction, z_loss, softcap, class_weight
    )
    hyperparameters.check_class_weight(num_classes, device)
    return hyperparameters


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, kernels, hyperparameters):
        loss_rows, lse = kernels.forward(hidden, weight, bias, target, hyperparameters)
        h = hyperparameters
        scale = _reduction_scale(target, h.ignore_index, h.reduction, lse.dtype, h.class_weight)
        ctx.save_for_backward(hidden, weight, bias, target, lse, scale)
        ctx.config = (kernels, hyperparameters)
        if hyperparameters.reduction == "none":
            return loss_rows.to(hidden.dtype)
        return (loss_rows.sum() * scale).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, lse, scale = ctx.saved_tensors
        grads = _LinearCrossEntropyBackward.apply(hidden, weight, bias, grad_loss, target, lse, scale, *ctx.config)
        return *grads, None, None, None


class _LinearCrossEntropyBackward(torch.autograd.Function):
    """(g_z·W, g_zᵀ·h, Σ_r g_z) with g_z = grad_loss·c_r·(p_r − q_r); its backward is the tiled HVP."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, grad_loss, target, lse, scale, kernels, hyperparameters):
        grad_scale = grad_loss.to(scale.dtype) * scale
        ctx.save_for_backward(hidden, weight, bias, target, lse, grad_scale, scale)
        ctx.config = (kernels, hyperparameters, grad_loss.dtype)
        return kernels.backward(hidden, weight, bias, target, lse, grad_scale, hyperparameters)

    @staticmethod
    def backward(ctx, v_hidden, v_weight, v_bias):
        with torch.no_grad():
            outputs = _LinearCrossEntropyBackward._hvp(ctx, v_hidden, v_weight, v_bias)
        tangents_need_grad = any(v is not None and v.requires_grad for v in (v_hidden, v_weight, v_bias))
        if torch.is_grad_enabled() and (any(ctx.needs_input_grad[:4]) or tangents_need_grad):
            # create_graph=True: a third derivative would run through these outputs. Rather than return them
            # detached (a loss built on them would silently add nothing), they carry a node that raises.
            differentiable = [x for x in outputs if x is not None]
            error = torch._C._functions.DelayedError(THIRD_DERIVATIVE_ERROR.encode(), len(differentiable))
            wrapped = iter(error(*(x.detach().requires_grad_() for x in differentiable)))
            outputs = tuple(None if x is None else next(wrapped) for x in outputs)
        return outputs

    @staticmethod
    def _hvp(ctx, v_hidden, v_weight, v_bias):
        hidden, weight, bias, target, lse, grad_scale, scale = ctx.saved_tensors
        kernels, hyperparameters, grad_loss_dtype = ctx.config
        grad_hidden, grad_weight, grad_bias, dot = kernels.hvp(
            hidden, weight, bias, target, lse, grad_scale, v_hidden, v_weight, v_bias, hyperparameters
        )
        # d/d(grad_loss) of Φ: the loss is linear in grad_loss, so c·⟨p − q, u⟩ (per row for "none").
        grad_grad_loss = dot * scale if hyperparameters.reduction == "none" else dot.sum() * scale
        return grad_hidden, grad_weight, grad_bias, grad_grad_loss.to(grad_loss_dtype), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = _DEFAULTS.ignore_index,
    reduction: str = _DEFAULTS.reduction,
    label_smoothing: float = _DEFAULTS.label_smoothing,
    z_loss: float = 0.0,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    fused: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` without ever allocating them, twice differentiable.

    Equal to ``F.cross_entropy((hidden @ weight.T + bias).reshape(-1, V), target.reshape(-1), ...)``, with
    the ``reduction="none"`` result in ``target``'s shape.

    - ``hidden``: (…, d), fp32, fp64 or bf16; ``weight``: (V, d) as ``nn.Linear.weight``; ``bias``: (V) or
      None; all three of one dtype and device. ``target``: (…) = ``hidden.shape[:-1]``, int64 class
      indices in [0, V) or ``ignore_index``.
    - ``reduction``: ``"mean"`` over the non-ignored rows (NaN when there is none, as PyTorch),
      ``"sum"`` or ``"none"``; ``label_smoothing`` α in [0, 1] as F.cross_entropy defines it.
    - The result has hidden's dtype. Products and sums accumulate in fp64 for fp64 inputs, in fp32 for
      fp32 and bf16.
    - Loss variants (docs/linear_cross_entropy.md, "Loss variants"; every backend: the eager reference, the C++
      and the Triton kernels): ``z_loss`` λ ≥ 0 adds λ·lse(z')² per valid row; ``softcap`` c > 0 makes the loss
      see z' = c·tanh(z/c); ``class_weight`` (V,) is ``F.cross_entropy``'s ``weight=``. A backend listed without
      one in ``curvkern.linear_ce.variants.IMPLEMENTED`` raises NotImplementedError naming it (``"auto"`` runs
      the eager reference instead, with a warning); probability targets raise NotImplementedError.

    The forward, the backward (gradients to hidden, weight and bias) and the double backward (the exact
    Hessian-vector product, cross terms included) each sweep over tiles of at most (N_TILE, V_TILE)
    logits (:mod:`curvkern.linear_ce.eager`, :mod:`curvkern.linear_ce.cpp`, :mod:`curvkern.linear_ce.triton`);
    saved for the backward are the inputs and one log-sum-exp per row. Math, tiling and memory:
    docs/linear_cross_entropy.md. First-order method after Liger-Kernel's FusedLinearCrossEntropy and Apple's
    Cut Cross-Entropy (Wijmans et al., 2025);
    the double backward is Pearlmutter's R-operator (1994).

    ``fused``: chosen by curvkern's one dispatch point (:mod:`curvkern._dispatch`, family
    ``"linear_cross_entropy"``): ``"eager"`` runs the reference, ``"cpp"`` the C++/OpenMP kernels (CPU
    tensors), ``"triton"`` the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``);
    ``"auto"`` the backend the registry prefers on the device (C++ on CPU, Triton on CUDA), or the eager
    reference with a one-time RuntimeWarning saying why where that one cannot run; an explicit backend that
    cannot run raises (never a silent fallback).

    Raises, before any work: ``ValueError`` for a bad ``reduction``, 0-dim hidden, a weight, bias or target
    of the wrong shape, or V = 0 with rows; ``TypeError`` for a dtype other than fp32/fp64/bf16 or
    mixed dtypes; ``RuntimeError`` for a non-int64 target, ``label_smoothing`` outside [0, 1] or tensors
    on two devices; ``IndexError`` for a target outside [0, V) on CPU (on a GPU that row's loss is NaN
    instead: the check would cost a host sync); ``NotImplementedError`` for DTensor arguments,
    ``RuntimeError`` for a backend that cannot run on
    these tensors (``"cpp"`` off the CPU, ``"triton"`` without CUDA or Triton); a third derivative raises
    RuntimeError when attempted.
    """
    _check_arguments(hidden, weight, target, bias, reduction, ignore_index, label_smoothing)
    hyperparameters = _hyperparameters(
        hidden.device, weight.shape[0], ignore_index, label_smoothing, reduction, z_loss, softcap, class_weight
    )
    kernels = _kernels_for(fused, hidden.device, hyperparameters)
    rows = hidden.reshape(-1, hidden.shape[-1])
    loss = _LinearCrossEntropy.apply(rows, weight, bias, target.reshape(-1), kernels, hyperparameters)
    return loss.view(target.shape) if reduction == "none" else loss


def _kernels_for(fused: str, device: torch.device, hyperparameters):
    """The selected backend's kernels. One that lacks a loss variant the call asks for raises NotImplementedError
    naming both when ``fused`` names it; ``"auto"`` takes the eager reference instead, with a one-time warning."""
    backend, kernels = select(FAMILY, fused, device)
    missing = missing_variants(hyperparameters, backend)
    if not missing:
        return kernels
    if fused == "auto":
        return eager_for_missing_variants(FAMILY, backend, missing)
    refuse_missing_variants(hyperparameters, backend)


def _check_tangent(name: str, tangent: torch.Tensor | None, like: torch.Tensor, batched: bool) -> None:
    _check_not_dtensor(**{name: tangent})
    if tangent is None:
        return
    expected = ((tangent.shape[0],) if batched and tangent.dim() > 0 else ()) + tuple(like.shape)
    if tuple(tangent.shape) != expected or tangent.dtype != like.dtype or tangent.device != like.device:
        kind = "(K, *shape)" if batched else "shape"
        raise ValueError(
            f"curvkern.linear_ce_ggn_vp: {name} must have the {kind} {tuple(like.shape)}, dtype and device of the "
            f"tensor it perturbs ({like.dtype} on {like.device}), got {tuple(tangent.shape)} {tangent.dtype} on "
            f"{tangent.device}"
        )


def linear_ce_ggn_vp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    d_hidden: torch.Tensor,
    d_weight: torch.Tensor | None = None,
    d_bias: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = _DEFAULTS.ignore_index,
    reduction: str = _DEFAULTS.reduction,
    label_smoothing: float = _DEFAULTS.label_smoothing,
    z_loss: float = 0.0,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    fused: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The generalised Gauss-Newton product Jᵀ H_z J v of :func:`linear_cross_entropy`'s loss, the logits never
    allocated (Schraudolph 2002).

    J is the Jacobian of the logits z = hidden·weightᵀ + bias with respect to (hidden, weight, bias), H_z
    the Hessian of the loss with respect to z (block diagonal, c_r·(diag p_r − p_r p_rᵀ) per row, c_r the
    reduction's weight: 1/n for ``mean``, 1 for ``sum`` and ``none``, 0 on ignored rows; label smoothing
    does not enter it without variants). With ``z_loss``, ``softcap`` or ``class_weight`` the loss of z
    includes them, the cap's curvature term included (docs/linear_cross_entropy.md, "Loss variants").
    The tangent of the logits is Jv = d_hidden·weightᵀ + hidden·d_weightᵀ + d_bias
    (an absent part is 0). Returns ``(prod_hidden, prod_weight, prod_bias)`` = ((H Jv)·weight,
    (H Jv)ᵀ·hidden, Σ_rows H Jv), of hidden's, weight's and bias's shapes, dtype and device; ``prod_bias``
    is None when ``bias`` is None.

    K tangents at once: ``d_hidden`` of shape (K, …, d) (one dimension more than hidden), with
    ``d_weight`` (K, V, d) and ``d_bias`` (K, V) when given; every result then has the leading K, and
    each logits tile is computed once for all K. Equal to K separate calls.

    Arguments as :func:`linear_cross_entropy`; tangents of their tensor's dtype and device. Two sweeps over
    the logits tiles (row statistics lse and ⟨p, Jv⟩, then the products); not differentiable. Raises as
    :func:`linear_cross_entropy` does, and ``ValueError`` for a tangent of the wrong shape, dtype or device
    or a ``d_bias`` without ``bias``.
    """
    _check_arguments(hidden, weight, target, bias, reduction, ignore_index, label_smoothing)
    batched = d_hidden.dim() == hidden.dim() + 1
    _check_tangent("d_hidden", d_hidden, hidden, batched)
    _check_tangent("d_weight", d_weight, weight, batched)
    if d_bias is not None and bias is None:
        raise ValueError("curvkern.linear_ce_ggn_vp: d_bias was given but bias is None")
    _check_tangent("d_bias", d_bias, bias, batched)
    tangents = d_hidden.shape[0] if batched else 1
    for name, tangent in (("d_weight", d_weight), ("d_bias", d_bias)):
        if tangent is not None and batched and tangent.shape[0] != tangents:
            raise ValueError(
                f"curvkern.linear_ce_ggn_vp: {name} holds {tangent.shape[0]} tangents, d_hidden {tangents}"
            )
    hyperparameters = _hyperparameters(
        hidden.device, weight.shape[0], ignore_index, label_smoothing, reduction, z_loss, softcap, class_weight
    )
    kernels = _kernels_for(fused, hidden.device, hyperparameters)
    features = hidden.shape[-1]
    flat_target = target.reshape(-1)
    acc = accumulation_dtype(hidden.dtype)
    scale = _reduction_scale(flat_target, hyperparameters.ignore_index, reduction, acc, class_weight)

    def with_tangent_dim(tangent):
        return None if tangent is None else tangent[None]

    with torch.no_grad():
        prod_hidden, prod_weight, prod_bias = kernels.ggn_vp(
            hidden.reshape(-1, features),
            weight,
            bias,
            flat_target,
            scale,
            (d_hidden if batched else d_hidden[None]).reshape(tangents, -1, features),
            d_weight if batched else with_tangent_dim(d_weight),
            d_bias if batched else with_tangent_dim(d_bias),
            hyperparameters,
        )
    prod_hidden = prod_hidden.view(tangents, *hidden.shape)
    if batched:
        return prod_hidden, prod_weight, prod_bias
    return prod_hidden[0], prod_weight[0], None if prod_bias is None else prod_bias[0]
