"""The loss variants of curvkern.cross_entropy and ce_hvp (docs/cross_entropy.md, "Loss variants"): z-loss,
logit soft-capping, class weights and probability targets, alone and combined, against PyTorch's double
backward in fp64 on every backend that implements them; the others must raise naming the variant.

The oracle is ``F.cross_entropy`` on ``c·tanh(z/c)`` plus λ·logsumexp² per valid row, divided like the
cross-entropy for ``mean`` (by the valid rows, Σ w_y with class weights, all rows for probability targets).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_cross_entropy import CE_OPS
from tolerance import TRANSCENDENTAL_OPS, assert_relative_error, truth_bound, unit_roundoff

import curvkern
from curvkern import _dispatch
from curvkern.families import get_family

FAMILY = get_family("cross_entropy")
EAGER = _dispatch._REGISTRY[("cross_entropy", "eager")]
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")
REDUCTIONS = ["mean", "sum", "none"]
FP64 = dict(rtol=1e-12, atol=1e-14)
VARIANTS = ("z_loss", "softcap", "weight", "soft")
# Every subset of the variants, each alone first.
COMBINATIONS = [c for k in range(1, len(VARIANTS) + 1) for c in itertools.combinations(VARIANTS, k)]


def torch_loss(x, target, *, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    loss = F.cross_entropy(z, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    if not z_loss:
        return loss
    lse = torch.logsumexp(z, dim=1)
    if target.is_floating_point():
        valid = torch.ones_like(lse, dtype=torch.bool)
        count = valid.sum()
    else:
        valid = target != -100
        count = weight[target.clamp(min=0)][valid].sum() if weight is not None else valid.sum()
    rows = torch.where(valid, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return loss + rows
    return loss + rows.sum() / (count if reduction == "mean" else 1)


def problem(device, combination, *, n=4, c=6, d=3, seed=0, ignored=((1, 0), (2, 2))):
    """(n, c, d) fp64 logits, u, the target (class indices with some ignored, or probabilities that do not
    sum to 1) and the variants' keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, c, d, generator=gen, dtype=torch.float64)
    u = torch.randn(n, c, d, generator=gen, dtype=torch.float64)
    if "soft" in combination:
        target = 1.3 * torch.softmax(torch.randn(n, c, d, generator=gen, dtype=torch.float64), dim=1)
    else:
        target = torch.randint(0, c, (n, d), generator=gen)
        for row in ignored:
            target[row] = -100
    kwargs = {}
    if "z_loss" in combination:
        kwargs["z_loss"] = 0.03
    if "softcap" in combination:
        kwargs["softcap"] = 4.0
    if "weight" in combination:
        kwargs["weight"] = (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)).to(device)
    return logits.to(device), target.to(device), u.to(device), kwargs


def loss_grad_hvp(loss_fn, logits, target, u, **kwargs):
    """Loss, gradient, the double backward's two results, with a non-uniform incoming gradient."""
    z = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(z, target, **kwargs)
    grad_loss = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    grad_loss.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss, z, grad_loss, create_graph=True)
    hvp, grad_grad_loss = torch.autograd.grad(grad, (z, grad_loss), u)
    return [loss.detach(), grad.detach(), hvp, grad_grad_loss]


def implements(backend, combination, label_smoothing=0.0) -> bool:
    kernels = curvkern._dispatch._REGISTRY[("cross_entropy", backend)]
    names = {"soft": "probability targets"}
    required = [names.get(v, v) for v in combination]
    if "weight" in combination and label_smoothing:
        required.append("weight with label smoothing")
    return all(name in kernels.VARIANTS for name in required)


def interpreted_subset(backend, device, combination, label_smoothing) -> bool:
    """Whether a combination runs under Triton's interpreter (Triton on CPU tensors, slow): those using
    probability targets or class weights with label smoothing only alone and with every variant (each reduction),
    the others all. Every other backend and device runs every combination."""
    if backend != "triton" or device != "cpu":
        return True
    uses_new = "soft" in combination or ("weight" in combination and label_smoothing)
    return not uses_new or len(combination) == 1 or combination == VARIANTS


def ours(backend):
    return lambda z, y, **kw: curvkern.cross_entropy(z, y, fused=backend, **kw)


def relative_errors(actual, expected):
    return [((a - e).norm() / e.norm().clamp_min(1e-300)).item() for a, e in zip(actual, expected, strict=True)]


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("combination", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_matches_torch_double_backward_fp64(backend, device, combination, reduction, label_smoothing):
    if not interpreted_subset(backend, device, combination, label_smoothing):
        pytest.skip("Triton's interpreter runs a subset (interpreted_subset)")
    logits, target, u, kwargs = problem(device, combination)
    kwargs |= dict(reduction=reduction, label_smoothing=label_smoothing)
    if not implements(backend, combination, label_smoothing):
        with pytest.raises(NotImplementedError, match=backend) as raised:
            curvkern.cross_entropy(logits, target, fused=backend, **kwargs)
        assert any(v in str(raised.value) for v in ("z_loss", "softcap", "weight", "probability targets"))
        with pytest.raises(NotImplementedError, match=backend):
            curvkern.ce_hvp(logits, target, u, fused=backend, **kwargs)
        return
    expected = loss_grad_hvp(torch_loss, logits, target, u, **kwargs)
    actual = loss_grad_hvp(ours(backend), logits, target, u, **kwargs)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **FP64)
    # ce_hvp: the Hessian of the loss alone, an incoming gradient of ones.
    hvp = curvkern.ce_hvp(logits, target, u, fused=backend, **kwargs)
    torch.testing.assert_close(hvp, _torch_hvp(logits, target, u, **kwargs), **FP64)
    if "soft" not in combination:  # ignored rows: exactly zero
        for row in ((1, slice(None), 0), (2, slice(None), 2)):
            assert torch.count_nonzero(actual[1][row]) == 0 and torch.count_nonzero(actual[2][row]) == 0


def _torch_hvp(logits, target, u, **kwargs):
    z = logits.detach().clone().requires_grad_(True)
    loss = torch_loss(z, target, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), z, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, z, u)
    return hvp


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("combination", [(v,) for v in VARIANTS] + [VARIANTS], ids=[*VARIANTS, "all"])
def test_gradcheck_and_gradgradcheck(backend, device, combination, reduction):
    if not implements(backend, combination, 0.2):
        pytest.skip(
            f"{backend} does not implement {combination} (test_matches_torch_double_backward_fp64 checks it raises)"
        )
    logits, target, _, kwargs = problem(device, combination, n=3, c=5, d=2, ignored=((1, 0),))
    z = logits.requires_grad_(True)
    # Under Triton's interpreter a random projection of each Jacobian (a tenth of the time): the fp64 test
    # above compares every entry with PyTorch's.
    fast_mode = backend == "triton" and device == "cpu"

    def fn(z):
        return curvkern.cross_entropy(z, target, reduction=reduction, label_smoothing=0.2, fused=backend, **kwargs)

    assert torch.autograd.gradcheck(fn, (z,), fast_mode=fast_mode)
    assert torch.autograd.gradgradcheck(fn, (z,), fast_mode=fast_mode)


def test_every_row_ignored_with_weights_and_z_loss(backend, device):
    """mean over no valid row: NaN loss (0/0), zero gradient and HVP, as F.cross_entropy with weights."""
    combination = ("z_loss", "weight")
    if not implements(backend, combination):
        pytest.skip(f"{backend} does not implement {combination}")
    logits, target, u, kwargs = problem(device, combination)
    target.fill_(-100)
    for reduction in REDUCTIONS:
        actual = loss_grad_hvp(ours(backend), logits, target, u, reduction=reduction, **kwargs)
        expected = loss_grad_hvp(torch_loss, logits, target, u, reduction=reduction, **kwargs)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, equal_nan=True, **FP64)
        assert torch.count_nonzero(actual[1]) == 0 and torch.count_nonzero(actual[2]) == 0


def test_the_defaults_of_the_variants_change_nothing(backend, device):
    """z_loss=0, softcap=None, weight=None are the plain cross-entropy, bit for bit (the default fast path)."""
    logits, target, u, _ = problem(device, ())
    plain = loss_grad_hvp(ours(backend), logits, target, u)
    explicit = loss_grad_hvp(ours(backend), logits, target, u, z_loss=0.0, softcap=None, weight=None)
    assert all(torch.equal(a, b) for a, b in zip(plain, explicit, strict=True))


def test_a_large_cap_tends_to_the_uncapped_loss(backend, device):
    if not implements(backend, ("softcap",)):
        pytest.skip(f"{backend} does not implement softcap")
    logits, target, u, _ = problem(device, ())
    capped = loss_grad_hvp(ours(backend), logits, target, u, softcap=1e6)
    plain = loss_grad_hvp(ours(backend), logits, target, u)
    for a, b in zip(capped, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _without_variant(monkeypatch, backend: str, missing: str):
    """Takes ``missing`` out of the backend's VARIANTS for this test (a backend that has not implemented it
    yet); skips where the backend is not available."""
    if backend not in _dispatch.available_backends("cross_entropy", "cpu"):
        pytest.skip(f"the {backend} backend is not available")
    kernels = _dispatch._REGISTRY[("cross_entropy", backend)]
    monkeypatch.setattr(kernels, "VARIANTS", kernels.VARIANTS - {missing})
    return kernels


@pytest.mark.parametrize(
    "combination, label_smoothing, missing",
    [(("weight",), 0.3, "weight with label smoothing"), (("soft", "z_loss"), 0.0, "probability targets")],
    ids=["weight-with-label-smoothing", "probability-targets"],
)
def test_a_backend_refuses_a_variant_it_lacks(monkeypatch, combination, label_smoothing, missing):
    """A backend whose VARIANTS lacks a variant raises NotImplementedError naming it and the backend, in the
    public functions and in its kernels themselves, and never computes something else (the C++ kernels,
    which implement every variant, with one taken away)."""
    kernels = _without_variant(monkeypatch, "cpp", missing)
    logits, target, u, kwargs = problem("cpu", combination)
    kwargs |= dict(label_smoothing=label_smoothing)
    with pytest.raises(NotImplementedError, match=rf"cpp .*{missing}"):
        curvkern.cross_entropy(logits, target, fused="cpp", **kwargs)
    with pytest.raises(NotImplementedError, match=rf"cpp .*{missing}"):
        curvkern.ce_hvp(logits, target, u, fused="cpp", **kwargs)
    rows, u_rows = logits[..., 0], u[..., 0]
    flat = target[..., 0].contiguous() if "soft" in combination else target[:, 0]
    h = curvkern.hyperparameters.CrossEntropyLossHyperparameters(
        label_smoothing=label_smoothing, z_loss=kwargs.get("z_loss", 0.0), weight=kwargs.get("weight")
    )
    scale = torch.ones((), dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=rf"cpp .*{missing}"):
        kernels.forward(rows, flat, h)
    with pytest.raises(NotImplementedError, match=rf"cpp .*{missing}"):
        kernels.backward(rows, flat, torch.zeros(rows.shape[0], dtype=torch.float64), scale, h)
    with pytest.raises(NotImplementedError, match=rf"cpp .*{missing}"):
        kernels.hvp(rows, flat, u_rows, scale, h, 0, torch.empty_like(u_rows))


def test_auto_takes_eager_for_a_variant_its_backend_lacks(monkeypatch):
    """With a one-time warning naming what the chosen backend lacks, as where a kernel is missing (the C++
    kernels without probability targets)."""
    _without_variant(monkeypatch, "cpp", "probability targets")
    logits, target, u, kwargs = problem("cpu", VARIANTS)
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="eager reference because its cpp kernels do not implement probability"):
        auto = loss_grad_hvp(ours("auto"), logits, target, u, **kwargs)
    eager = loss_grad_hvp(ours("eager"), logits, target, u, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(auto, eager, strict=True))


def test_argument_errors(backend, device):
    logits, target, u, _ = problem(device, ())

    def call(**kwargs):
        return curvkern.cross_entropy(logits, target, fused=backend, **kwargs)

    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="z_loss"):
            call(z_loss=bad)
        with pytest.raises(ValueError, match="z_loss"):
            curvkern.ce_hvp(logits, target, u, z_loss=bad, fused=backend)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            call(softcap=bad)
    ones = torch.ones(6, dtype=torch.float64, device=device)
    for bad in (ones[:5], ones.float(), ones[:, None], [1.0] * 6):
        with pytest.raises(ValueError, match="weight"):
            call(weight=bad)
        with pytest.raises(ValueError, match="weight"):
            curvkern.ce_hvp(logits, target, u, weight=bad, fused=backend)
    if device == "cpu":
        with pytest.raises(ValueError, match=r"weight.*finite"):
            call(weight=torch.tensor([1.0, float("nan"), 1, 1, 1, 1], dtype=torch.float64))
    soft = torch.softmax(logits, dim=1)
    with pytest.raises(RuntimeError, match="probability targets"):
        curvkern.cross_entropy(logits, soft.float(), fused=backend)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        curvkern.ce_hvp(logits, target, u, label_smoothing=2.0, fused=backend)


# Rounded operations per element beyond the plain cross-entropy's (tests/test_cross_entropy.py, CE_OPS): the
# cap's tanh (transcendental), x/c, c·t, J = 1 − t² (2), z'' = −(2/c)·t·J (3) and the chain rule's J⊙(·),
# g⊙z''⊙u and their sum (3); the z-loss's a = 1 + 2λ·lse (3), a·u, (a − 2λ)·⟨p, u⟩ (2) and λ·lse² (2).
VARIANT_OPS = TRANSCENDENTAL_OPS + 11 + 7
# A weighted or probability target: d = w⊙((1 − α)·t + α/V) (3), W = Σ d (1), d⊙z and d⊙u (2).
TARGET_OPS = 6
# Class weights (with the label smoothing of 0.1 below) and probability targets, alone and with everything.
LOW_PRECISION = [("z_loss",), ("softcap",), ("z_loss", "softcap"), ("weight",), ("soft",), VARIANTS]


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("combination", LOW_PRECISION, ids="+".join)
def test_low_precision_against_fp64_ground_truth(backend, device, combination, dtype):
    """Kind (b) of tests/tolerance.py: each result's ‖a − b‖/‖b‖ against fp64 on the same (rounded) inputs
    (the weights and probabilities rounded to ``dtype`` too)."""
    if not implements(backend, combination, 0.1):
        pytest.skip(f"{backend} does not implement {combination}")
    n, v = 16, 300
    logits64, target, u64, kwargs = problem(device, combination, n=n, c=v, d=1, ignored=((3, 0), (9, 0)))
    logits, u, target = logits64[..., 0].to(dtype), u64[..., 0].to(dtype), target[..., 0]
    kwargs |= dict(label_smoothing=0.1)
    truth_kwargs = dict(kwargs)
    if "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].to(dtype)
        truth_kwargs["weight"] = kwargs["weight"].double()
    truth_target = target
    if "soft" in combination:
        target = target.to(dtype)
        truth_target = target.double()
    truth = loss_grad_hvp(torch_loss, logits.double(), truth_target, u.double(), **truth_kwargs)
    actual = loss_grad_hvp(ours(backend), logits, target, u, **kwargs)
    ops = CE_OPS + VARIANT_OPS + (TARGET_OPS if {"weight", "soft"} & set(combination) else 0)
    bound = truth_bound(dtype, ops=ops, reduction_length=v)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        bound += unit_roundoff(dtype)  # Triton's interpreter truncates fp32 -> bf16: a whole ulp, not half
    for name, ours_result, truth_result in zip(["loss", "grad", "hvp", "grad_grad_loss"], actual, truth, strict=True):
        assert ours_result.dtype == dtype, name
        assert_relative_error(ours_result, truth_result, bound, label=name)
    standalone = curvkern.ce_hvp(logits, target, u, fused=backend, **kwargs)
    expected = _torch_hvp(logits.double(), truth_target, u.double(), **truth_kwargs)
    assert_relative_error(standalone, expected, bound, label="ce_hvp")


def test_triton_kernels_check_probabilities_and_weights_before_any_work(backend, device):
    """The Triton kernels' own checks, below the public function's: probability targets not (N, V) in the logits'
    dtype with a dense last dimension, or class weights not (V,) in the logits' dtype, are a ValueError before any
    launch; strided rows of probabilities and strided weights are read where they lie."""
    if backend != "triton":
        pytest.skip("the Triton kernels' checks")
    kernels = curvkern._dispatch._REGISTRY[("cross_entropy", backend)]
    hyperparameters = curvkern.hyperparameters.CrossEntropyLossHyperparameters
    logits, _, u, _ = problem(device, ("soft",))
    rows, u = logits[..., 0].contiguous(), u[..., 0].contiguous()
    n, v = rows.shape
    scale = torch.ones(n, dtype=torch.float64, device=device)
    wide = torch.rand(n, 2 * v, dtype=torch.float64, device=device)

    def calls(target, h):
        yield lambda: kernels.forward(rows, target, h)
        yield lambda: kernels.backward(rows, target, scale, scale, h)
        yield lambda: kernels.hvp(rows, target, u, scale, h, 0, torch.empty_like(u))

    bad_targets = [wide[:, :v].float(), wide[:, : v - 1], wide[:, ::2], wide[:, 0]]
    for target in bad_targets:
        for call in calls(target, hyperparameters()):
            with pytest.raises(ValueError, match="probability targets"):
                call()
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    for weight in (wide[0, : v - 1], wide[0, :v].float(), wide[:1, :v]):
        for call in calls(labels, hyperparameters(label_smoothing=0.1, weight=weight)):
            with pytest.raises(ValueError, match="weight"):
                call()
    with pytest.raises(NotImplementedError, match="causal shift"):
        kernels.hvp(rows, wide[:, :v], u, scale, hyperparameters(), v, torch.empty_like(u))
    h = hyperparameters(label_smoothing=0.1, weight=wide[1, ::2])
    for target in (wide[:, :v], labels):
        torch.testing.assert_close(
            kernels.forward(rows, target, h)[0], EAGER.forward(rows, target.contiguous(), h)[0], **FP64
        )
