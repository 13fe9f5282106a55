"""curvkern.linear_cross_entropy and linear_ce_ggn_vp, on every registered CPU backend (the eager reference and the
C++ kernels), against PyTorch on materialised logits.

Ground truth is ``F.cross_entropy(hidden @ weight.T + bias, ...)`` and its autograd double backward in fp64
(kind (a) of tests/tolerance.py: 1e-12), ``torch.func`` for the Gauss-Newton product, and an fp64 ground
truth on the same rounded inputs for fp32 and bf16 (kind (b)). Tiles are made small so that every sweep
runs over several row and class tiles, with V not a multiple of the class tile.
"""

import datetime
import functools
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiprocess_ranks import free_port
from tolerance import (
    FP64_FUSED_CAP,
    TRANSCENDENTAL_OPS,
    assert_relative_error,
    reduction_terms,
    relative_error,
    unit_roundoff,
)
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import curvkern
from curvkern import _dispatch
from curvkern.families import get_family
from curvkern.linear_ce import cpp, eager, triton as linear_ce_triton

FAMILY = get_family("linear_cross_entropy")
BACKENDS = _dispatch.available_backends(FAMILY.name, "cpu")
ON_EACH_BACKEND = pytest.mark.parametrize("backend", BACKENDS)
REDUCTIONS = ["mean", "sum", "none"]
SMALL_N_TILE, SMALL_V_TILE = 4, 8  # N = 10 rows: three row tiles; V = 13: two class tiles, the last partial
SMALL_D_CHUNK = 4  # the Triton kernels' d chunk: d = 6 is two chunks, the last partial


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    for module in (eager, cpp):
        monkeypatch.setattr(module, "N_TILE", SMALL_N_TILE)
        monkeypatch.setattr(module, "V_TILE", SMALL_V_TILE)
    # The interpreter runs tl.dot on tiles smaller than the 16 a compiled tl.dot needs.
    monkeypatch.setattr(linear_ce_triton, "BLOCK_N", SMALL_N_TILE)
    monkeypatch.setattr(linear_ce_triton, "BLOCK_V", SMALL_V_TILE)
    monkeypatch.setattr(linear_ce_triton, "BLOCK_D", SMALL_D_CHUNK)


def make_problem(leading=(10,), d=6, v=13, *, bias=True, ignore=(1, 7), dtype=torch.float64, seed=0):
    """hidden (*leading, d), weight (v, d), bias (v) or None, target (*leading) with ``ignore`` (flat row
    indices) set to the ignore index; logits of spread about 3."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*leading, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (3 / math.sqrt(d))
    bias_tensor = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    target = torch.randint(0, v, leading, generator=gen)
    target.view(-1)[list(ignore)] = -100
    cast = [x if x is None else x.to(dtype) for x in (hidden, weight, bias_tensor)]
    return (*cast, target)


def torch_loss(hidden, weight, target, bias=None, **kwargs):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), target.reshape(-1), **kwargs)
    return loss.view(target.shape) if kwargs.get("reduction") == "none" else loss


def ours(hidden, weight, target, bias=None, **kwargs):
    return curvkern.linear_cross_entropy(hidden, weight, target, bias, **kwargs)


def on(backend):
    """:func:`ours` on ``backend``."""
    return functools.partial(ours, fused=backend)


def derivatives(loss_fn, hidden, weight, target, bias, tangents, grad_loss, **kwargs):
    """Loss; gradients to (hidden, weight[, bias]); the double backward along ``tangents`` to those and to
    the incoming gradient ``grad_loss``."""
    inputs = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias) if x is not None]
    loss = loss_fn(*inputs[:2], target, inputs[2] if bias is not None else None, **kwargs)
    grad_loss = grad_loss.detach().clone().requires_grad_(True)
    grads = torch.autograd.grad(loss, inputs, grad_loss, create_graph=True)
    second = torch.autograd.grad(grads, [*inputs, grad_loss], tangents)
    return [loss.detach(), *(g.detach() for g in grads), *second]


def tangents_for(hidden, weight, bias, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
        for x in (hidden, weight, bias)
        if x is not None
    ]


def grad_loss_for(target, reduction, dtype=torch.float64):
    if reduction == "none":
        return torch.linspace(-1.5, 2.0, target.numel(), dtype=torch.float64).view(target.shape).to(dtype)
    return torch.tensor(0.7, dtype=dtype)


def assert_fp64_close(got, expected, labels):
    for a, b, label in zip(got, expected, labels, strict=True):
        assert a.shape == b.shape, (label, a.shape, b.shape)
        assert_relative_error(a, b, FP64_FUSED_CAP, label=label)


LABELS = ["loss", "grad hidden", "grad weight", "grad bias", "hvp hidden", "hvp weight", "hvp bias", "grad grad_loss"]


def labels_for(bias):
    return LABELS if bias is not None else [x for x in LABELS if "bias" not in x]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("leading", [(10,), (2, 5)], ids=["rows", "leading dims"])
@ON_EACH_BACKEND
def test_loss_gradients_and_hvp_match_pytorch_fp64(reduction, label_smoothing, with_bias, leading, backend):
    hidden, weight, bias, target = make_problem(leading, bias=with_bias)
    tangents = tangents_for(hidden, weight, bias)
    grad_loss = grad_loss_for(target, reduction)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    got = derivatives(on(backend), hidden, weight, target, bias, tangents, grad_loss, **kwargs)
    expected = derivatives(torch_loss, hidden, weight, target, bias, tangents, grad_loss, **kwargs)
    assert_fp64_close(got, expected, labels_for(bias))


@pytest.mark.parametrize("differentiated", ["hidden", "weight"])
@ON_EACH_BACKEND
def test_double_backward_of_one_gradient_includes_its_cross_term(differentiated, backend):
    """Differentiating only grad_hidden (or grad_weight) gives the double backward None tangents for the others;
    the result to the other input is then its cross term alone (plus the Gauss-Newton part through z)."""
    hidden, weight, bias, target = make_problem()
    results = []
    for loss_fn in (on(backend), torch_loss):
        inputs = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
        grads = torch.autograd.grad(loss_fn(inputs[0], inputs[1], target, inputs[2]), inputs, create_graph=True)
        chosen = grads[0] if differentiated == "hidden" else grads[1]
        tangent = torch.linspace(-1, 1, chosen.numel(), dtype=torch.float64).view_as(chosen)
        results.append(torch.autograd.grad(chosen, inputs, tangent))
    assert_fp64_close(results[0], results[1], ["to hidden", "to weight", "to bias"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["no rows", "every row ignored"])
@ON_EACH_BACKEND
def test_empty_and_fully_ignored_batches_match_pytorch(reduction, case, backend):
    """mean over zero valid rows is 0/0 = NaN, as in PyTorch; the gradients and HVP are 0 there."""
    if case == "no rows":
        hidden, weight, bias, target = make_problem((0,), ignore=())
    else:
        hidden, weight, bias, target = make_problem((6,), ignore=range(6))
    tangents = tangents_for(hidden, weight, bias)
    grad_loss = grad_loss_for(target, reduction)
    got = derivatives(on(backend), hidden, weight, target, bias, tangents, grad_loss, reduction=reduction)
    expected = derivatives(torch_loss, hidden, weight, target, bias, tangents, grad_loss, reduction=reduction)
    for a, b, label in zip(got, expected, LABELS, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0, msg=label)
    assert bool(got[0].isnan().any()) == (reduction == "mean")


@ON_EACH_BACKEND
def test_gradcheck_and_gradgradcheck(backend, monkeypatch):
    if backend == "triton":
        # The interpreter takes tens of milliseconds a launch: a smaller problem (21 inputs, not 51), on tiles
        # of 2 rows × 4 classes × 1 feature so that it still spans two tiles of each, or this takes minutes.
        for name, size in (("BLOCK_N", 2), ("BLOCK_V", 4), ("BLOCK_D", 1)):
            monkeypatch.setattr(linear_ce_triton, name, size)
        hidden, weight, bias, target = make_problem((3,), d=2, v=5, ignore=(1,))
    else:
        hidden, weight, bias, target = make_problem((5,), d=3, v=9, ignore=(2,))
    inputs = tuple(x.clone().requires_grad_(True) for x in (hidden, weight, bias))

    def loss(h, w, b):
        return curvkern.linear_cross_entropy(h, w, target, b, reduction="sum", label_smoothing=0.1, fused=backend)

    # Triton: torch's fast mode (a random projection, a few evaluations instead of one per input element);
    # its HVP is checked element by element against PyTorch's double backward in the fp64 tests.
    fast = backend == "triton"
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(loss, inputs, fast_mode=fast)


@ON_EACH_BACKEND
def test_a_third_derivative_raises(backend):
    hidden, weight, bias, target = make_problem()
    inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = ours(inputs[0], inputs[1], target, inputs[2], fused=backend)
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    hvp = torch.autograd.grad(grads, inputs, [torch.ones_like(g) for g in grads], create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives are not implemented"):
        sum((x * x).sum() for x in hvp).backward()
    plain = torch.autograd.grad(grads, inputs, [torch.ones_like(g) for g in grads], retain_graph=True)
    assert all(not x.requires_grad and torch.equal(x, y.detach()) for x, y in zip(plain, hvp))


# --- Gauss-Newton product ---------------------------------------------------------------------------------


def torch_ggn_vp(hidden, weight, target, d_hidden, d_weight, d_bias, bias, reduction):
    """Jᵀ H_z J v through materialised logits: jvp of the logits function, the cross-entropy's Hessian
    along it (forward-over-reverse), and the vjp of the logits function."""
    primals = (hidden, weight, bias if bias is not None else torch.zeros(weight.shape[0], dtype=hidden.dtype))
    zero_if_none = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, (d_hidden, d_weight, d_bias))]

    def logits_of(h, w, b):
        return h @ w.T + b

    def loss_of_logits(z):
        return F.cross_entropy(z.reshape(-1, weight.shape[0]), target.reshape(-1), reduction=reduction).sum()

    logits, tangent = torch.func.jvp(logits_of, primals, tuple(zero_if_none))
    _, hessian_tangent = torch.func.jvp(torch.func.grad(loss_of_logits), (logits,), (tangent,))
    _, pullback = torch.func.vjp(logits_of, *primals)
    prod_hidden, prod_weight, prod_bias = pullback(hessian_tangent)
    return prod_hidden, prod_weight, prod_bias if bias is not None else None


GGN_CASES = [
    ("hidden", True),
    ("hidden weight", True),
    ("hidden weight bias", True),
    ("hidden bias", True),
    ("hidden", False),
    ("hidden weight", False),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "parts,with_bias", GGN_CASES, ids=[f"{p} ({'bias' if b else 'no bias'})" for p, b in GGN_CASES]
)
@ON_EACH_BACKEND
def test_ggn_vp_matches_torch_func(reduction, parts, with_bias, backend):
    hidden, weight, bias, target = make_problem((2, 5), bias=with_bias)
    d_hidden, d_weight, d_bias = tangents_for(hidden, weight, bias if bias is not None else weight[:, 0])
    d_weight = d_weight if "weight" in parts else None
    d_bias = d_bias if "bias" in parts else None
    got = curvkern.linear_ce_ggn_vp(
        hidden,
        weight,
        target,
        d_hidden,
        d_weight,
        d_bias,
        bias=bias,
        reduction=reduction,
        label_smoothing=0.2,
        fused=backend,
    )
    expected = torch_ggn_vp(hidden, weight, target, d_hidden, d_weight, d_bias, bias, reduction)
    assert (got[2] is None) == (bias is None)
    assert_fp64_close(
        [x for x in got if x is not None],
        [x for x in expected if x is not None],
        ["hidden", "weight", "bias"][: 2 + (bias is not None)],
    )


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@ON_EACH_BACKEND
def test_k_tangents_at_once_equal_k_separate_calls(with_bias, backend):
    hidden, weight, bias, target = make_problem((2, 5), bias=with_bias)
    k = 3
    gen = torch.Generator().manual_seed(2)
    d_hidden = torch.randn(k, *hidden.shape, generator=gen, dtype=torch.float64)
    d_weight = torch.randn(k, *weight.shape, generator=gen, dtype=torch.float64)
    d_bias = torch.randn(k, weight.shape[0], generator=gen, dtype=torch.float64) if with_bias else None
    batched = curvkern.linear_ce_ggn_vp(hidden, weight, target, d_hidden, d_weight, d_bias, bias=bias, fused=backend)
    assert batched[0].shape == (k, *hidden.shape) and batched[1].shape == (k, *weight.shape)
    for index in range(k):
        single = curvkern.linear_ce_ggn_vp(
            hidden,
            weight,
            target,
            d_hidden[index],
            d_weight[index],
            None if d_bias is None else d_bias[index],
            bias=bias,
            fused=backend,
        )
        for a, b, label in zip(batched, single, ["hidden", "weight", "bias"]):
            if b is None:
                assert a is None
                continue
            assert_relative_error(a[index], b, FP64_FUSED_CAP, label=f"tangent {index} {label}")


def test_each_logits_tile_is_computed_once_for_all_k_tangents(monkeypatch):
    """Two sweeps over the tiles, whatever K: the logits matmuls counted for K = 1 and K = 4 are equal (the eager
    reference's; the C++ kernel has the same loop structure, csrc/linear_ce/linear_cross_entropy.cpp)."""
    hidden, weight, bias, target = make_problem()
    calls = []
    monkeypatch.setattr(eager, "_logits_tile", lambda *tiles: calls.append(1) or eager_logits_tile(*tiles))
    counts = []
    for k in (1, 4):
        calls.clear()
        d_hidden = torch.ones(k, *hidden.shape, dtype=hidden.dtype)
        curvkern.linear_ce_ggn_vp(hidden, weight, target, d_hidden, bias=bias, fused="eager")
        counts.append(len(calls))
    tiles = math.ceil(10 / SMALL_N_TILE) * math.ceil(13 / SMALL_V_TILE)
    assert counts == [2 * tiles, 2 * tiles]


eager_logits_tile = eager._logits_tile


# --- Memory: no (N, V) tensor -----------------------------------------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """Records the element count of every tensor any ATen op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


class LargestProfiledAllocation:
    """Records the largest allocation any ATen op makes while active, the ATen calls inside a C++ op included
    (which a dispatch mode does not see): the profiler's per-op memory net of its children, in fp64 elements.
    An op's temporary freed before it returns nets to 0 there; its allocation is still an op's of its own."""

    def __enter__(self):
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc_info):
        self.profiler.__exit__(*exc_info)
        largest_bytes = max((event.self_cpu_memory_usage for event in self.profiler.events()), default=0)
        self.largest = largest_bytes // torch.tensor([], dtype=torch.float64).element_size()


RECORDERS = {"dispatch mode": LargestAllocation, "profiler": LargestProfiledAllocation}
# A dispatch mode sees the tensors the eager reference's ATen ops create, but of a C++ op only its outputs.
MEMORY_CASES = [("dispatch mode", "eager")] + [("profiler", backend) for backend in BACKENDS]
ON_EACH_MEMORY_CASE = pytest.mark.parametrize(
    "recorder,backend", MEMORY_CASES, ids=[f"{r}-{b}" for r, b in MEMORY_CASES]
)


def largest_allocations(recorder, backend, n=48, d=4, v=40, k=2, **variants):
    """The largest tensor each phase creates on ``backend`` as ``recorder`` sees it: forward, backward, double
    backward, Gauss-Newton product. d < N and d < V, so that no input or result (N·d, V·d, K·V·d) reaches N·V
    elements."""
    hidden, weight, bias, target = make_problem((n,), d=d, v=v, ignore=(3,))
    inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    phases = {}
    with RECORDERS[recorder]() as mode:
        loss = ours(inputs[0], inputs[1], target, inputs[2], label_smoothing=0.1, fused=backend, **variants)
    phases["forward"] = mode.largest
    with RECORDERS[recorder]() as mode:
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
    phases["backward"] = mode.largest
    tangents = [torch.ones_like(g) for g in grads]
    with RECORDERS[recorder]() as mode:
        torch.autograd.grad(grads, inputs, tangents)
    phases["double backward"] = mode.largest
    d_hidden = torch.ones(k, n, d, dtype=hidden.dtype)
    with RECORDERS[recorder]() as mode:
        curvkern.linear_ce_ggn_vp(hidden, weight, target, d_hidden, bias=bias, fused=backend, **variants)
    phases["ggn_vp"] = mode.largest
    assert max(n * d, v * d * k) < n * v
    return phases, n * v


@ON_EACH_MEMORY_CASE
def test_no_tensor_of_n_times_v_elements_is_allocated(recorder, backend):
    phases, n_times_v = largest_allocations(recorder, backend)
    # The largest is a tile: K·N_TILE·V_TILE for the K-tangent Gauss-Newton tiles, N_TILE·V_TILE otherwise.
    assert all(0 < largest < n_times_v for largest in phases.values()), (phases, n_times_v)


@ON_EACH_MEMORY_CASE
def test_the_memory_test_sees_a_whole_logits_tile(monkeypatch, recorder, backend):
    """The check above can fail: with one tile covering all N·V logits, every phase allocates N·V elements.
    Not for the Triton kernels: their tiles live in registers (numpy arrays in the interpreter), never in an
    allocation either recorder sees, and nothing of theirs reaches N·V at any tile size."""
    if backend == "triton":
        pytest.skip("Triton tiles are registers: no allocation to see")
    for module in (eager, cpp):
        monkeypatch.setattr(module, "N_TILE", 1 << 20)
        monkeypatch.setattr(module, "V_TILE", 1 << 20)
    phases, n_times_v = largest_allocations(recorder, backend)
    assert all(largest >= n_times_v for largest in phases.values()), (phases, n_times_v)


# --- fp32 and bf16 against an fp64 ground truth -----------------------------------------------------------


def sum_of_products_bound(terms, length: int) -> float:
    """Normwise relative error bound of R = Σ_k A_k·B_k (materialised, fp64) whose factors A_k carry the
    absolute errors E_k elementwise and whose products sum ``length`` terms in fp32:
    (‖Σ E_k·|B_k|‖ + r(length)·u·‖Σ |A_k|·|B_k|‖) / ‖R‖."""
    result = sum(a @ b for _, a, b in terms).norm().item()
    propagated = sum(e @ b.abs() for e, _, b in terms).norm().item()
    rounding = (
        reduction_terms(length)
        * unit_roundoff(torch.float32)
        * sum(a.abs() @ b.abs() for _, a, b in terms).norm().item()
    )
    return (propagated + rounding) / result


def ground_truth_and_bounds(hidden, weight, bias, target, tangents, label_smoothing):
    """fp64 loss (mean), gradients and HVP from materialised logits, and kind (b)'s bound for each, from the
    eager reference's operations (fp32 math, one store into the result's dtype, added by the caller).

    A logit is a d-term dot product plus the bias: absolute error δz = (r(d) + 1)·u·a, a = max over the
    logits of Σ_i |h_i w_i| + |b|. exp turns δz into a relative error of p, and lse carries δz and the sum of
    V exps once more: p is good to ε_p = 2δz + (r(V) + 2·TRANSCENDENTAL_OPS + 4)·u relatively (the 4: the
    subtraction z − lse, −q, ×scale, the conversion). The loss rows are good to ε_p·max(1, |lse|) absolutely,
    then summed over N rows. g_z = s(p − q) carries |s|·(ε_p·p + u); the tangent of the logits
    u_z = v_h·Wᵀ + h·v_Wᵀ + v_b carries (r(d) + 1)·u·(|v_h||W|ᵀ + |h||v_W|ᵀ + |v_b|), ⟨p, u_z⟩ that and ε_p
    relatively plus r(V)·u, and H u_z = s·p ⊙ (u_z − ⟨p, u_z⟩) all of them. Each result is then a sum of
    products (:func:`sum_of_products_bound`).
    """
    u = unit_roundoff(torch.float32)
    n, d, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    v_hidden, v_weight, v_bias = tangents
    logits = hidden @ weight.T + bias
    delta_z = (reduction_terms(d) + 1) * u * (hidden.abs() @ weight.abs().T + bias.abs()).max().item()
    epsilon_p = 2 * delta_z + (reduction_terms(v) + 2 * TRANSCENDENTAL_OPS + 4) * u
    valid = target != -100
    scale = valid.double()[:, None] / valid.sum()
    p = torch.softmax(logits, dim=1)
    q = F.one_hot(target.clamp_min(0), v).double() * (1 - label_smoothing) + label_smoothing / v
    grad_z = scale * (p - q)
    tangent = v_hidden @ weight.T + hidden @ v_weight.T + v_bias
    tangent_error = (
        (reduction_terms(d) + 1)
        * u
        * (v_hidden.abs() @ weight.abs().T + hidden.abs() @ v_weight.abs().T + v_bias.abs())
    )
    p_dot_u = (p * tangent).sum(dim=1, keepdim=True)
    p_dot_u_error = (p * (epsilon_p * tangent.abs() + tangent_error)).sum(dim=1, keepdim=True) + reduction_terms(
        v
    ) * u * (p * tangent.abs()).sum(dim=1, keepdim=True)
    hessian_u = scale * p * (tangent - p_dot_u)
    hessian_u_error = scale * p * (epsilon_p * (tangent - p_dot_u).abs() + tangent_error + p_dot_u_error)
    grad_z_error = scale * (epsilon_p * p + u)
    ones = torch.ones(n, 1, dtype=torch.float64)

    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    row_error = epsilon_p * max(1.0, torch.logsumexp(logits, 1).abs().max().item(), logits.abs().max().item())
    loss_bound = (
        row_error * valid.sum().item() * scale.max().item() + reduction_terms(n) * u * loss.abs().item()
    ) / loss.abs().item()
    truth = {
        "loss": (loss, loss_bound),
        "grad hidden": (grad_z @ weight, sum_of_products_bound([(grad_z_error, grad_z, weight)], v)),
        "grad weight": (grad_z.T @ hidden, sum_of_products_bound([(grad_z_error.T, grad_z.T, hidden)], n)),
        "grad bias": (grad_z.sum(0), sum_of_products_bound([(grad_z_error.T, grad_z.T, ones)], n)),
        "hvp hidden": (
            hessian_u @ weight + grad_z @ v_weight,
            sum_of_products_bound([(hessian_u_error, hessian_u, weight), (grad_z_error, grad_z, v_weight)], v),
        ),
        "hvp weight": (
            hessian_u.T @ hidden + grad_z.T @ v_hidden,
            sum_of_products_bound([(hessian_u_error.T, hessian_u.T, hidden), (grad_z_error.T, grad_z.T, v_hidden)], n),
        ),
        "hvp bias": (hessian_u.sum(0), sum_of_products_bound([(hessian_u_error.T, hessian_u.T, ones)], n)),
    }
    return truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@ON_EACH_BACKEND
def test_low_precision_against_an_fp64_ground_truth(dtype, backend):
    hidden, weight, bias, target = make_problem(dtype=dtype)
    tangents = tangents_for(hidden, weight, bias)
    label_smoothing = 0.1
    got = derivatives(
        on(backend),
        hidden,
        weight,
        target,
        bias,
        tangents,
        torch.tensor(1.0, dtype=dtype),
        label_smoothing=label_smoothing,
    )
    as_fp64 = [x.double() for x in (hidden, weight, bias, target)]
    truth = ground_truth_and_bounds(*as_fp64[:3], target, [t.double() for t in tangents], label_smoothing)
    # The closed form above is checked against PyTorch first: it is the fp64 truth.
    expected = derivatives(
        torch_loss,
        *as_fp64[:2],
        target,
        as_fp64[2],
        [t.double() for t in tangents],
        torch.tensor(1.0, dtype=torch.float64),
        label_smoothing=label_smoothing,
    )
    for (label, (value, _)), torch_value in zip(truth.items(), expected):
        assert_relative_error(value, torch_value, FP64_FUSED_CAP, label=f"closed form {label}")
    errors = {}
    for (label, (value, bound)), result in zip(truth.items(), got):
        assert result.dtype == dtype, label
        errors[label] = relative_error(result, value)
        assert_relative_error(result, value, bound + unit_roundoff(dtype), label=f"{dtype} {label}")
    print(backend, dtype, {label: f"{e:.2e}" for label, e in errors.items()})


# --- Backends and input validation ------------------------------------------------------------------------


def test_fused_goes_through_the_one_dispatch_point_and_never_falls_back(monkeypatch):
    """``fused=`` is chosen by curvkern._dispatch.select like every family's: "auto" runs what the registry
    picks on the device, an explicit backend without a kernel raises NotImplementedError, one that cannot run
    here RuntimeError; none of them silently runs another backend."""
    hidden, weight, bias, target = make_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "auto" warns once where it runs the eager reference
        chosen, _ = _dispatch.select(FAMILY.name, "auto", hidden.device)
        assert torch.equal(
            ours(hidden, weight, target, bias, fused="auto"), ours(hidden, weight, target, bias, fused=chosen)
        )
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda device: None)
    for fused in [b for b in _dispatch.BACKENDS if b not in FAMILY.backends]:
        with pytest.raises(NotImplementedError, match=rf"linear_cross_entropy: fused='{fused}' has no kernel"):
            ours(hidden, weight, target, bias, fused=fused)
        with pytest.raises(NotImplementedError, match="has no kernel"):
            curvkern.linear_ce_ggn_vp(hidden, weight, target, hidden, bias=bias, fused=fused)
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda device: "Triton is not installed")
    with pytest.raises(RuntimeError, match="fused='triton' cannot run: Triton is not installed"):
        ours(hidden, weight, target, bias, fused="triton")
    meta = [x.to("meta") for x in (hidden, weight, bias, target)]
    with pytest.raises(RuntimeError, match="fused='cpp' runs on CPU tensors"):
        ours(meta[0], meta[1], meta[3], meta[2], fused="cpp")
    with pytest.raises(ValueError, match="fused must be one of"):
        ours(hidden, weight, target, bias, fused="cuda")


def bad_calls():
    hidden, weight, bias, target = make_problem()
    out_of_range = target.clone()
    out_of_range[0] = 13
    return [
        ("reduction", dict(reduction="avg"), ValueError, "not a valid value for reduction"),
        ("smoothing", dict(label_smoothing=1.5), RuntimeError, "label_smoothing must be between"),
        (
            "fp16",
            dict(hidden=hidden.half(), weight=weight.half(), bias=bias.half()),
            TypeError,
            "hidden must be one of",
        ),
        ("mixed dtypes", dict(weight=weight.float()), TypeError, "weight is torch.float32, hidden torch.float64"),
        ("bias dtype", dict(bias=bias.float()), TypeError, "bias is torch.float32"),
        ("0-dim hidden", dict(hidden=hidden[0, 0], target=target[0]), ValueError, "0-dim"),
        ("weight features", dict(weight=weight[:, :-1]), ValueError, r"weight must be \(V, d\) = \(V, 6\)"),
        ("weight 1-D", dict(weight=weight[:, 0]), ValueError, r"weight must be \(V, d\)"),
        ("bias shape", dict(bias=bias[:-1]), ValueError, r"bias must be \(V,\) = \(13,\)"),
        ("target dtype", dict(target=target.int()), RuntimeError, "expected target dtype to be Long"),
        ("target shape", dict(target=target[:-1]), ValueError, r"expected target of shape \(10,\)"),
        ("target range", dict(target=out_of_range), IndexError, "Target 13 is out of bounds"),
        ("no classes", dict(weight=weight[:0], bias=bias[:0]), ValueError, r"no classes \(V = 0\)"),
        ("device", dict(target=target.to("meta")), RuntimeError, "hidden on cpu and target on meta"),
    ]


@pytest.mark.parametrize("label,change,error,message", bad_calls(), ids=[c[0] for c in bad_calls()])
def test_bad_arguments_raise_naming_what_is_wrong(label, change, error, message):
    hidden, weight, bias, target = make_problem()
    arguments = dict(hidden=hidden, weight=weight, target=target, bias=bias) | change
    options = {key: arguments.pop(key) for key in ("reduction", "label_smoothing") if key in arguments}
    with pytest.raises(error, match=message):
        curvkern.linear_cross_entropy(**arguments, **options)
    with pytest.raises(error, match=message):
        curvkern.linear_ce_ggn_vp(
            arguments["hidden"],
            arguments["weight"],
            arguments["target"],
            arguments["hidden"],
            bias=arguments["bias"],
            **options,
        )


def test_bad_tangents_raise():
    hidden, weight, bias, target = make_problem()
    cases = [
        (dict(d_hidden=hidden[:, :-1]), r"d_hidden must have the shape \(10, 6\)"),
        (dict(d_hidden=hidden.float()), "d_hidden must have the shape"),
        (dict(d_weight=weight[None]), "d_weight must have the shape"),
        (dict(d_hidden=hidden[None].expand(2, -1, -1), d_weight=weight[None]), "d_weight holds 1 tangents, d_hidden 2"),
        (dict(d_bias=bias, bias=None), "d_bias was given but bias is None"),
        (dict(d_hidden=hidden[None], d_bias=bias), r"d_bias must have the \(K, \*shape\)"),
    ]
    for change, message in cases:
        arguments = dict(d_hidden=hidden, bias=bias) | change
        with pytest.raises(ValueError, match=message):
            curvkern.linear_ce_ggn_vp(hidden, weight, target, **arguments)


@pytest.fixture
def one_rank_mesh():
    """A 1-rank gloo process group on 127.0.0.1 and its CPU device mesh, destroyed afterwards."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_arguments_raise(one_rank_mesh):
    """A vocabulary-sharded weight would need a cross-rank reduction of the row statistics: not supported yet."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, weight, bias, target = make_problem()
    sharded_weight = distribute_tensor(weight, one_rank_mesh, [Shard(0)])
    replicated_hidden = distribute_tensor(hidden, one_rank_mesh, [Replicate()])
    message = r"DTensor.*supported.*DistributedDataParallel.*not supported yet"
    with pytest.raises(NotImplementedError, match=message):
        ours(hidden, sharded_weight, target, bias)
    with pytest.raises(NotImplementedError, match=message):
        ours(replicated_hidden, weight, target, bias)
    with pytest.raises(NotImplementedError, match=message):
        curvkern.linear_ce_ggn_vp(hidden, weight, target, replicated_hidden, bias=bias)


def cpp_bad_calls():
    """Calls of the C++ ops that must raise RuntimeError, never crash: (label, op, arguments, message)."""
    hidden, weight, bias, target = make_problem()
    lse, scale = torch.zeros(10, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    common = (-100, 0.0, 4, 8)
    forward, backward = "linear_cross_entropy_forward", "linear_cross_entropy_backward"
    hvp, ggn = "linear_cross_entropy_hvp", "linear_ce_ggn_vp"
    return [
        ("1-D hidden", forward, (hidden[0], weight, bias, target[:1], *common), "hidden must be 2-D"),
        ("fp16", forward, (hidden.half(), weight.half(), None, target, *common), "float32, float64 or bfloat16"),
        ("weight features", forward, (hidden, weight[:, :-1], bias, target, *common), "weight must have shape"),
        ("weight dtype", forward, (hidden, weight.float(), bias, target, *common), "weight must have hidden's dtype"),
        ("bias shape", forward, (hidden, weight, bias[:-1], target, *common), "bias must have shape"),
        ("target int32", forward, (hidden, weight, bias, target.int(), *common), "target must be an int64"),
        ("target rows", forward, (hidden, weight, bias, target[:-1], *common), r"target must be .* shape \(10\)"),
        ("tile 0", forward, (hidden, weight, bias, target, -100, 0.0, 0, 8), "n_tile and v_tile must be positive"),
        ("smoothing", forward, (hidden, weight, bias, target, -100, 2.0, 4, 8), r"label_smoothing must be in \[0, 1\]"),
        ("lse dtype", backward, (hidden, weight, bias, target, lse.float(), scale, *common), "lse must be a Double"),
        ("lse rows", backward, (hidden, weight, bias, target, lse[:-1], scale, *common), r"lse must have shape \(10\)"),
        ("scale shape", backward, (hidden, weight, bias, target, lse, lse[None], *common), "grad_scale must be 0-dim"),
        (
            "v_bias without bias",
            hvp,
            (hidden, weight, None, target, lse, scale, None, None, bias, *common),
            "v_bias was given but bias is None",
        ),
        (
            "v_weight shape",
            hvp,
            (hidden, weight, bias, target, lse, scale, None, weight.T, None, *common),
            "v_weight must have shape",
        ),
        ("2-D d_hidden", ggn, (hidden, weight, bias, target, scale, hidden, None, None, -100, 4, 8), "must be 3-D"),
        (
            "d_weight tangents",
            ggn,
            (hidden, weight, bias, target, scale, hidden[None], weight.expand(2, -1, -1), None, -100, 4, 8),
            "d_weight must have shape",
        ),
    ]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="curvkern._C is not built")
@pytest.mark.parametrize("label,op,arguments,message", cpp_bad_calls(), ids=[c[0] for c in cpp_bad_calls()])
def test_the_cpp_ops_check_their_inputs(label, op, arguments, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.curvkern, op)(*arguments)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="curvkern._C is not built")
def test_cpp_on_default_tiles_and_threads_matches_pytorch_fp64(monkeypatch):
    """Larger tiles than the fixture's (64 × 256), rows over several threads, V and N several tiles each."""
    monkeypatch.setattr(cpp, "N_TILE", 64)
    monkeypatch.setattr(cpp, "V_TILE", 256)
    hidden, weight, bias, target = make_problem((150,), d=16, v=600, ignore=(5, 99))
    tangents = tangents_for(hidden, weight, bias)
    grad_loss = grad_loss_for(target, "mean")
    kwargs = dict(label_smoothing=0.05)
    got = derivatives(on("cpp"), hidden, weight, target, bias, tangents, grad_loss, **kwargs)
    expected = derivatives(torch_loss, hidden, weight, target, bias, tangents, grad_loss, **kwargs)
    assert_fp64_close(got, expected, LABELS)


# --- the Triton kernels, compiled ---------------------------------------------------------------------------


def compile_for_sm90(dtype: str) -> dict:
    """Compile every Triton linear cross-entropy kernel, in every mode, for ``dtype`` inputs ahead of time for
    sm_90 (to PTX and through ptxas), at the default tile sizes; run in a process without TRITON_INTERPRET,
    where ``triton.jit`` gives compilable functions. Returns the matrix instructions of each kernel's PTX."""
    import re

    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tl = linear_ce_triton.tl
    accumulator = "*fp64" if dtype == "fp64" else "*fp32"
    inputs = {"h_ptr", "w_ptr", "b_ptr", "vh_ptr", "vw_ptr", "vb_ptr"}
    tiles = dict(
        ACC=tl.float64 if dtype == "fp64" else tl.float32,
        BLOCK_N=linear_ce_triton.BLOCK_N,
        BLOCK_V=linear_ce_triton.BLOCK_V,
        BLOCK_D=linear_ce_triton.BLOCK_D,
    )
    flags = dict(HAS_BIAS=True, HAS_VH=True, HAS_VW=True, HAS_VB=True)

    def argument_type(name):
        if name in inputs:
            return f"*{dtype}"
        if name == "target_ptr":
            return "*i64"
        if name.endswith("_ptr"):
            return accumulator
        return "fp32" if name.startswith("smoothing") else "i64"

    kernels = [("forward", linear_ce_triton._forward_kernel, dict(tiles, HAS_BIAS=True, SMOOTHING=True))]
    for mode in (0, 1, 2):
        kernels.append((f"rows mode {mode}", linear_ce_triton._rows_kernel, dict(tiles, **flags, MODE=mode)))
        kernels.append((f"columns mode {mode}", linear_ce_triton._columns_kernel, dict(tiles, **flags, MODE=mode)))
    report = {}
    for label, kernel, constants in kernels:
        signature = {name: "constexpr" if name in constants else argument_type(name) for name in kernel.arg_names}
        compiled = triton_compile(
            ASTSource(kernel, signature=signature, constexprs=constants), target=GPUTarget("cuda", 90, 32)
        )
        ptx = compiled.asm["ptx"]
        assert ".entry" in ptx, label
        report[label] = sorted(set(re.findall(r"\b((?:w?gmma|mma)\.[\w.]+)", ptx)))
    return report


# One compiler process per dtype: fp32 in every run, the others in the slow ones.
@pytest.mark.parametrize("dtype", ["fp32", *(pytest.param(d, marks=pytest.mark.slow) for d in ("bf16", "fp64"))])
def test_triton_kernels_compile_for_a_gpu_target(dtype):
    """The interpreter accepts code the Triton compiler rejects: without a GPU, compile every kernel for sm_90.
    fp32 and bf16 tiles are multiplied in fp32 with input_precision="ieee" (no TF32 tensor-core instruction);
    fp64 tiles through the f64 mma.sync of sm_80+."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # The child runs from tests/: put this checkout first, not whichever curvkern the environment installed.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    script = f"import json, test_linear_cross_entropy as t; print(json.dumps(t.compile_for_sm90({dtype!r})))"
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(report) == 7, report
    for label, instructions in report.items():
        if dtype == "fp64":
            assert instructions and all("f64" in x for x in instructions), (label, instructions)
        else:
            assert not any("tf32" in x for x in instructions), (label, instructions)


# --- Loss variants: z-loss, soft-capping, class weights (every backend that implements them) ---------------


def variant_backends():
    return [
        b
        for b in BACKENDS
        if set(("z_loss", "softcap", "class_weight")) <= curvkern.linear_ce.variants.IMPLEMENTED.get(b, frozenset())
    ]


def class_weights(v=13, seed=3):
    return torch.rand(v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 0.1


def variant_cases():
    return [
        ("z-loss", dict(z_loss=0.3)),
        ("softcap", dict(softcap=2.0)),
        ("class weights", dict(class_weight=class_weights())),
        ("z-loss softcap", dict(z_loss=0.3, softcap=2.0)),
        ("softcap class weights", dict(softcap=1.5, class_weight=class_weights())),
        ("all three", dict(z_loss=0.2, softcap=2.5, class_weight=class_weights())),
    ]


VARIANT_CASES = variant_cases()
ON_EACH_VARIANT = pytest.mark.parametrize("variants", [c[1] for c in VARIANT_CASES], ids=[c[0] for c in VARIANT_CASES])


def variant_loss_of_logits(logits, target, *, reduction="mean", label_smoothing=0.0, **variants):
    """The variant written out in plain torch on (R, V) logits: the cap c·tanh(z/c), F.cross_entropy with
    ``weight=``, plus λ·lse² per valid row reduced like the cross-entropy (divided by Σ w_y for a weighted
    mean, not multiplied by w_y)."""
    z_loss, softcap, class_weight = variants.get("z_loss", 0.0), variants.get("softcap"), variants.get("class_weight")
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, weight=class_weight, reduction=reduction, label_smoothing=label_smoothing)
    valid = target != -100
    z_term = torch.where(valid, z_loss * torch.logsumexp(logits, dim=1) ** 2, 0.0)
    if reduction == "none":
        return loss + z_term
    if reduction == "sum":
        return loss + z_term.sum()
    weights = torch.ones_like(z_term) if class_weight is None else class_weight[target.clamp(min=0)]
    return loss + z_term.sum() / torch.where(valid, weights, 0.0).sum()


def torch_variant_loss(hidden, weight, target, bias=None, **kwargs):
    logits = F.linear(hidden, weight, bias).reshape(-1, weight.shape[0])
    loss = variant_loss_of_logits(logits, target.reshape(-1), **kwargs)
    return loss.view(target.shape) if kwargs.get("reduction") == "none" else loss


@ON_EACH_VARIANT
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("backend", variant_backends())
def test_variants_match_pytorch_fp64(variants, reduction, label_smoothing, with_bias, backend):
    """Loss, gradients and the double backward (cross terms, and to the incoming gradient) of every variant and
    combination, against autograd through F.linear + the variant in plain torch; ignored rows 1 and 7, three row
    tiles and two class tiles."""
    hidden, weight, bias, target = make_problem((2, 5), bias=with_bias)
    tangents = tangents_for(hidden, weight, bias)
    grad_loss = grad_loss_for(target, reduction)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing, **variants)
    got = derivatives(on(backend), hidden, weight, target, bias, tangents, grad_loss, **kwargs)
    expected = derivatives(torch_variant_loss, hidden, weight, target, bias, tangents, grad_loss, **kwargs)
    assert_fp64_close(got, expected, labels_for(bias))


def test_default_variants_are_the_plain_loss_bit_for_bit():
    hidden, weight, bias, target = make_problem()
    tangents, grad_loss = tangents_for(hidden, weight, bias), grad_loss_for(target, "mean")
    kwargs = dict(label_smoothing=0.15)
    plain = derivatives(on("eager"), hidden, weight, target, bias, tangents, grad_loss, **kwargs)
    default = derivatives(
        on("eager"), hidden, weight, target, bias, tangents, grad_loss, z_loss=0.0, softcap=None, **kwargs
    )
    assert all(torch.equal(a, b) for a, b in zip(plain, default))


@pytest.mark.parametrize("backend", variant_backends())
def test_variants_gradcheck_and_gradgradcheck(backend):
    hidden, weight, bias, target = make_problem((5,), d=3, v=9, ignore=(2,))
    inputs = tuple(x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    variants = dict(z_loss=0.2, softcap=1.5, class_weight=class_weights(9))

    def loss(h, w, b):
        return ours(h, w, target, b, label_smoothing=0.1, fused=backend, **variants)

    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)


def torch_variant_ggn_vp(hidden, weight, target, d_hidden, d_weight, d_bias, bias, **kwargs):
    """Jᵀ H_ℓ(z) J v with J the Jacobian of z = h·Wᵀ + b and ℓ the variant's loss of z (the cap included)."""
    primals = (hidden, weight, bias if bias is not None else torch.zeros(weight.shape[0], dtype=hidden.dtype))
    zero_if_none = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, (d_hidden, d_weight, d_bias))]

    def logits_of(h, w, b):
        return h @ w.T + b

    def loss_of_logits(z):
        return variant_loss_of_logits(z.reshape(-1, weight.shape[0]), target.reshape(-1), **kwargs).sum()

    logits, tangent = torch.func.jvp(logits_of, primals, tuple(zero_if_none))
    _, hessian_tangent = torch.func.jvp(torch.func.grad(loss_of_logits), (logits,), (tangent,))
    _, pullback = torch.func.vjp(logits_of, *primals)
    prod_hidden, prod_weight, prod_bias = pullback(hessian_tangent)
    return prod_hidden, prod_weight, prod_bias if bias is not None else None


@ON_EACH_VARIANT
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("backend", variant_backends())
def test_variants_ggn_vp_matches_torch_func(variants, reduction, with_bias, backend):
    hidden, weight, bias, target = make_problem((2, 5), bias=with_bias)
    d_hidden, d_weight, d_bias = tangents_for(hidden, weight, bias if bias is not None else weight[:, 0])
    d_bias = d_bias if bias is not None else None
    kwargs = dict(reduction=reduction, label_smoothing=0.2, **variants)
    got = curvkern.linear_ce_ggn_vp(
        hidden, weight, target, d_hidden, d_weight, d_bias, bias=bias, fused=backend, **kwargs
    )
    expected = torch_variant_ggn_vp(hidden, weight, target, d_hidden, d_weight, d_bias, bias, **kwargs)
    labels = ["hidden", "weight", "bias"][: 2 + (bias is not None)]
    assert_fp64_close([x for x in got if x is not None], [x for x in expected if x is not None], labels)
    # K = 2 tangents at once equal two calls.
    both = curvkern.linear_ce_ggn_vp(
        hidden,
        weight,
        target,
        torch.stack([d_hidden, -0.5 * d_hidden]),
        torch.stack([d_weight, d_weight]),
        bias=bias,
        fused=backend,
        **kwargs,
    )
    second = curvkern.linear_ce_ggn_vp(
        hidden, weight, target, -0.5 * d_hidden, d_weight, bias=bias, fused=backend, **kwargs
    )
    assert_fp64_close([both[0][1], both[1][1]], [second[0], second[1]], ["K hidden", "K weight"])


VARIANT_MEMORY_CASES = [("dispatch mode", "eager")] + [("profiler", backend) for backend in variant_backends()]


@pytest.mark.parametrize("recorder,backend", VARIANT_MEMORY_CASES, ids=[f"{r}-{b}" for r, b in VARIANT_MEMORY_CASES])
def test_no_tensor_of_n_times_v_elements_is_allocated_with_variants(recorder, backend):
    variants = dict(z_loss=0.1, softcap=3.0, class_weight=class_weights(40))
    phases, n_times_v = largest_allocations(recorder, backend, **variants)
    assert all(0 < largest < n_times_v for largest in phases.values()), (phases, n_times_v)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("backend", variant_backends())
def test_variants_k_tangents_at_once_equal_k_separate_calls(with_bias, backend):
    """All three variants with label smoothing (the cap's term reads q̃): K = 3 tangents, d_weight and d_bias
    included, against three calls."""
    hidden, weight, bias, target = make_problem((2, 5), bias=with_bias)
    kwargs = dict(label_smoothing=0.1, z_loss=0.2, softcap=2.5, class_weight=class_weights(), fused=backend)
    k = 3
    gen = torch.Generator().manual_seed(4)
    d_hidden = torch.randn(k, *hidden.shape, generator=gen, dtype=torch.float64)
    d_weight = torch.randn(k, *weight.shape, generator=gen, dtype=torch.float64)
    d_bias = torch.randn(k, weight.shape[0], generator=gen, dtype=torch.float64) if with_bias else None
    batched = curvkern.linear_ce_ggn_vp(hidden, weight, target, d_hidden, d_weight, d_bias, bias=bias, **kwargs)
    for index in range(k):
        single = curvkern.linear_ce_ggn_vp(
            hidden,
            weight,
            target,
            d_hidden[index],
            d_weight[index],
            None if d_bias is None else d_bias[index],
            bias=bias,
            **kwargs,
        )
        for a, b, label in zip(batched, single, ["hidden", "weight", "bias"]):
            if b is None:
                assert a is None
                continue
            assert_relative_error(a[index], b, FP64_FUSED_CAP, label=f"tangent {index} {label}")


class Bounded:
    """A value in fp64 and a first-order bound on the absolute error of computing it in fp32 from exact inputs:
    running error analysis (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.3), each rounded
    operation adding u·|result| and propagating its operands' errors. Python numbers are rounded to fp32 (u·|c|);
    exp, log and tanh count TRANSCENDENTAL_OPS; a sum of n terms r(n)·u·Σ|x| (tests/tolerance.py)."""

    u = unit_roundoff(torch.float32)

    def __init__(self, value, error=None):
        self.value = value
        self.error = torch.zeros_like(value) if error is None else error

    @classmethod
    def of(cls, x):
        if isinstance(x, Bounded):
            return x
        if isinstance(x, torch.Tensor):
            return cls(x)
        value = torch.tensor(float(x), dtype=torch.float64)
        return cls(value, cls.u * value.abs())

    def _rounded(self, value, error):
        return Bounded(value, error + self.u * value.abs())

    def __add__(self, other):
        other = Bounded.of(other)
        return self._rounded(self.value + other.value, self.error + other.error)

    __radd__ = __add__

    def __sub__(self, other):
        other = Bounded.of(other)
        return self._rounded(self.value - other.value, self.error + other.error)

    def __rsub__(self, other):
        return Bounded.of(other) - self

    def __mul__(self, other):
        other = Bounded.of(other)
        error = self.value.abs() * other.error + other.value.abs() * self.error
        return self._rounded(self.value * other.value, error)

    __rmul__ = __mul__

    def __getitem__(self, index):
        return Bounded(self.value[index], self.error[index])

    def transcendental(self, function, derivative):
        value = function(self.value)
        return Bounded(value, derivative.abs() * self.error + TRANSCENDENTAL_OPS * self.u * value.abs())

    def exp(self):
        return self.transcendental(torch.exp, torch.exp(self.value))

    def log(self):
        return self.transcendental(torch.log, 1 / self.value)

    def tanh(self):
        return self.transcendental(torch.tanh, 1 - torch.tanh(self.value) ** 2)

    def reciprocal(self):
        return self._rounded(1 / self.value, self.error / self.value**2)

    def sum(self, dim):
        terms = reduction_terms(self.value.shape[dim])
        error = self.error.sum(dim) + terms * self.u * self.value.abs().sum(dim)
        return Bounded(self.value.sum(dim), error)

    def __matmul__(self, other):
        other = Bounded.of(other)
        terms = reduction_terms(self.value.shape[-1]) + 1
        error = self.error @ other.value.abs() + self.value.abs() @ other.error
        return Bounded(self.value @ other.value, error + terms * self.u * (self.value.abs() @ other.value.abs()))

    @property
    def T(self):
        return Bounded(self.value.T, self.error.T)

    def relative_bound(self) -> float:
        return (self.error.norm() / self.value.norm()).item()


def variant_ground_truth_and_bounds(hidden, weight, bias, target, tangents, class_weight, alpha, z_loss, softcap):
    """fp64 loss (mean), gradients, double backward and gradient to the incoming gradient of the three variants
    with label smoothing, from materialised logits, each with kind (b)'s bound: the kernels' operations
    (docs/linear_cross_entropy.md, "Loss variants") evaluated with :class:`Bounded`. The online log-sum-exp's
    rescaling exps and the tiles' order are covered by the exp's count and r(V)."""
    v_hidden, v_weight, v_bias = (Bounded(t) for t in tangents)
    h, w, b = Bounded(hidden), Bounded(weight), Bounded(bias)
    num_classes = weight.shape[0]
    valid = (target != -100).double()[:, None]
    one_hot = F.one_hot(target.clamp_min(0), num_classes).double() * valid
    label_weight = Bounded(class_weight[target.clamp_min(0)][:, None] * valid)
    spread = Bounded(class_weight[None, :])

    z = h @ w.T + b
    t = (z * (1 / softcap)).tanh()
    capped, slope = softcap * t, 1 - t * t
    shift = Bounded(capped.value.amax(1, keepdim=True), capped.error.amax(1, keepdim=True))
    lse = shift + (capped - shift).exp().sum(1)[:, None].log()
    p = (capped - lse).exp()
    total = (1 - alpha) * label_weight + (alpha / num_classes) * spread.sum(1)[:, None]
    factor = total + (2 * z_loss) * lse
    scale = Bounded(valid) * label_weight.sum(0).reciprocal()
    grad_capped = factor * p - (alpha / num_classes) * spread + Bounded(one_hot) * ((alpha - 1) * label_weight)
    grad_z = grad_capped * slope * scale

    target_logit = Bounded((capped.value * one_hot).sum(1, keepdim=True), (capped.error * one_hot).sum(1, keepdim=True))
    rows = (
        total * lse
        - (1 - alpha) * (label_weight * target_logit)
        - (alpha / num_classes) * (spread * capped).sum(1)[:, None]
        + z_loss * lse * lse
    )
    loss = (Bounded(valid) * rows).sum(0) * label_weight.sum(0).reciprocal()

    tangent = v_hidden @ w.T + h @ v_weight.T + v_bias
    v = slope * tangent
    p_dot_v = (p * v).sum(1)[:, None]
    v_at_label = Bounded((v.value * one_hot).sum(1, keepdim=True), (v.error * one_hot).sum(1, keepdim=True))
    q_dot_v = (1 - alpha) * (label_weight * v_at_label) + (alpha / num_classes) * (spread * v).sum(1)[:, None]
    curvature = (-2 / softcap**2) * capped * slope
    inner = factor * v - (factor - 2 * z_loss) * p_dot_v
    hessian_u = (slope * p * inner + grad_capped * curvature * tangent) * scale
    grad_grad_loss = (Bounded(valid) * (factor * p_dot_v - q_dot_v)).sum(0) * label_weight.sum(0).reciprocal()
    results = {
        "loss": loss,
        "grad hidden": grad_z @ w,
        "grad weight": grad_z.T @ h,
        "grad bias": grad_z.sum(0),
        "hvp hidden": hessian_u @ w + grad_z @ v_weight,
        "hvp weight": hessian_u.T @ h + grad_z.T @ v_hidden,
        "hvp bias": hessian_u.sum(0),
        "grad grad_loss": grad_grad_loss,
    }
    return {
        label: (x.value.reshape(-1)[0] if x.value.numel() == 1 else x.value, x.relative_bound())
        for label, x in results.items()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", variant_backends())
def test_variants_low_precision_against_an_fp64_ground_truth(dtype, backend):
    """All three variants with label smoothing in fp32 and bf16 against fp64 on the same rounded inputs (kind (b));
    the class weights are given in the inputs' dtype, so they are exact in fp32 and fp64 too."""
    hidden, weight, bias, target = make_problem(dtype=dtype)
    tangents = tangents_for(hidden, weight, bias)
    weights = class_weights().to(dtype)
    kwargs = dict(label_smoothing=0.1, z_loss=0.2, softcap=2.5)
    got = derivatives(
        on(backend),
        hidden,
        weight,
        target,
        bias,
        tangents,
        torch.tensor(1.0, dtype=dtype),
        class_weight=weights,
        **kwargs,
    )
    as_fp64 = [x.double() for x in (hidden, weight, bias)]
    tangents64 = [t.double() for t in tangents]
    truth = variant_ground_truth_and_bounds(
        *as_fp64, target, tangents64, weights.double(), kwargs["label_smoothing"], kwargs["z_loss"], kwargs["softcap"]
    )
    # The closed form above is checked against PyTorch first: it is the fp64 truth.
    expected = derivatives(
        torch_variant_loss,
        *as_fp64[:2],
        target,
        as_fp64[2],
        tangents64,
        torch.tensor(1.0, dtype=torch.float64),
        class_weight=weights.double(),
        **kwargs,
    )
    for (label, (value, _)), torch_value in zip(truth.items(), expected, strict=True):
        assert_relative_error(value, torch_value, FP64_FUSED_CAP, label=f"closed form {label}")
    errors = {}
    for (label, (value, bound)), result in zip(truth.items(), got, strict=True):
        assert result.dtype == dtype, label
        errors[label] = relative_error(result, value)
        assert_relative_error(result, value, bound + unit_roundoff(dtype), label=f"{dtype} {label}")
    print(backend, dtype, {label: f"{e:.2e} (bound {truth[label][1]:.1e})" for label, e in errors.items()})


VARIANT_ERRORS = [
    ("z_loss", dict(z_loss=-0.1), ValueError, "Invalid z_loss"),
    ("z_loss nan", dict(z_loss=math.nan), ValueError, "z_loss"),
    ("softcap 0", dict(softcap=0.0), ValueError, "Invalid softcap"),
    ("softcap negative", dict(softcap=-1.0), ValueError, "Invalid softcap"),
    (
        "class_weight shape",
        dict(class_weight=torch.ones(12, dtype=torch.float64)),
        ValueError,
        r"class_weight.*\(13,\)",
    ),
    ("class_weight int", dict(class_weight=torch.ones(13, dtype=torch.int64)), ValueError, "Invalid class_weight"),
    ("class_weight device", dict(class_weight=torch.ones(13, device="meta")), ValueError, "Invalid class_weight"),
    ("class_weight nan", dict(class_weight=torch.full((13,), math.nan)), ValueError, "finite, non-negative"),
    ("class_weight negative", dict(class_weight=-torch.ones(13)), ValueError, "finite, non-negative"),
    ("class_weight list", dict(class_weight=[1.0] * 13), ValueError, "Invalid class_weight"),
]


@pytest.mark.parametrize("label,change,error,message", VARIANT_ERRORS, ids=[c[0] for c in VARIANT_ERRORS])
def test_bad_variant_arguments_raise_naming_the_parameter(label, change, error, message):
    hidden, weight, bias, target = make_problem()
    with pytest.raises(error, match=message):
        ours(hidden, weight, target, bias, fused="eager", **change)
    with pytest.raises(error, match=message):
        curvkern.linear_ce_ggn_vp(hidden, weight, target, hidden, bias=bias, fused="eager", **change)


def test_probability_targets_are_refused():
    hidden, weight, bias, _ = make_problem()
    soft = torch.softmax(torch.randn(10, 13, dtype=torch.float64), dim=1)
    with pytest.raises(NotImplementedError, match=r"probability \(soft\) targets are not supported"):
        ours(hidden, weight, soft, bias, fused="eager")


def flat(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, tuple) else (result,)) if t is not None]


@pytest.mark.parametrize("variant", ["z_loss", "softcap", "class_weight"])
def test_backends_without_a_variant_raise_naming_it(variant, monkeypatch):
    """A backend without the variant in curvkern.linear_ce.variants.IMPLEMENTED (cpp made to lack it here, as it
    implements all three; triton where it lacks it): an explicit choice raises naming the variant and the
    backend; "auto" on CPU (which picks cpp) runs the eager reference with a warning that says why; never the
    plain loss. Where cpp implements it, "auto" runs cpp's kernels without a warning."""
    hidden, weight, bias, target = make_problem()
    change = {
        "z_loss": dict(z_loss=0.1),
        "softcap": dict(softcap=2.0),
        "class_weight": dict(class_weight=class_weights()),
    }
    change = change[variant]
    calls = [
        lambda fused: ours(hidden, weight, target, bias, fused=fused, **change),
        lambda fused: curvkern.linear_ce_ggn_vp(hidden, weight, target, hidden, bias=bias, fused=fused, **change),
    ]
    if variant in curvkern.linear_ce.variants.IMPLEMENTED.get("cpp", frozenset()) and "cpp" in BACKENDS:
        monkeypatch.setattr(_dispatch, "_warned", set())
        for call in calls:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = call("auto")
            assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(call("cpp")), strict=True))
    monkeypatch.setitem(curvkern.linear_ce.variants.IMPLEMENTED, "cpp", frozenset())
    lacking = [
        b
        for b in ("cpp", "triton")
        if b in FAMILY.backends and variant not in curvkern.linear_ce.variants.IMPLEMENTED.get(b, frozenset())
    ]
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda device: None)
    for call in calls:
        for fused in lacking:
            with pytest.raises(
                NotImplementedError, match=rf"fused='{fused}' does not implement the loss variant\(s\) {variant}"
            ):
                call(fused)
        if "cpp" in BACKENDS:  # "auto" picks cpp on the CPU, which lacks it: the reference, with a warning
            monkeypatch.setattr(_dispatch, "_warned", set())
            with pytest.warns(RuntimeWarning, match=rf"eager reference because its cpp kernels do not .*{variant}"):
                got = call("auto")
            want = call("eager")
            assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(want), strict=True))
    # The kernels themselves refuse too, before any work (no Triton launch: nothing runs in the interpreter).
    record = curvkern.linear_ce.variants.LinearCrossEntropyHyperparameters(**change)
    for kernels, name in ((cpp.CppLinearCrossEntropy, "cpp"), (linear_ce_triton.TritonLinearCrossEntropy, "triton")):
        if name not in lacking:
            continue
        with pytest.raises(
            NotImplementedError, match=rf"fused='{name}' does not implement the loss variant\(s\) {variant}"
        ):
            kernels.forward(hidden, weight, bias, target, record)
        with pytest.raises(NotImplementedError, match=variant):
            kernels.ggn_vp(
                hidden, weight, bias, target, torch.ones((), dtype=torch.float64), hidden[None], None, None, record
            )
