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
    # The interpreter's subset: leading dimensions are a reshape before the kernels; bias with smoothing or neither
    # (every combination runs on eager and C++, and natively on a GPU).
    interpreted = backend == "triton" and not torch.cuda.is_available()
    if interpreted and (leading != (10,) or with_bias != bool(label_smoothing)):
        pytest.skip("outside the Triton interpreter's subset")
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


@pytest.mark.parametrize("with_variants", [False, True], ids=["plain", "all three variants"])
@ON_EACH_BACKEND
def test_gradcheck_and_gradgradcheck(backend, with_variants, monkeypatch):
    """Plain (reduction "sum") and with z-loss, soft cap and class weights (reduction "mean"), both with label
    smoothing."""
    if with_variants and backend not in variant_backends():
        pytest.skip(f"{backend} does not implement the variants")
    if backend == "triton":
        # The interpreter takes tens of milliseconds a launch: a smaller problem (21 inputs, not 51), on tiles
        # of 2 rows × 4 classes × 1 feature so that it still spans two tiles of each, or this takes minutes.
        for name, size in (("BLOCK_N", 2), ("BLOCK_V", 4), ("BLOCK_D", 1)):
            monkeypatch.setattr(linear_ce_triton, name, size)
        hidden, weight, bias, target = make_problem((3,), d=2, v=5, ignore=(1,))
    else:
        hidden, weight, bias, target = make_problem((5,), d=3, v=9, ignore=(2,))
    inputs = tuple(x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    kwargs = dict(reduction="sum")
    if with_variants:
        kwargs = dict(z_loss=0.2, softcap=1.5, class_weight=class_weights(weight.shape[0]))

    def loss(h, w, b):
        return curvkern.linear_cross_entropy(h, w, target, b, label_smoothing=0.1, fused=backend, **kwargs)

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
    assert_k_tangents_equal_k_calls(backend, with_bias)


def assert_k_tangents_equal_k_calls(backend, with_bias, **kwargs):
    """linear_ce_ggn_vp with K = 3 tangents (hidden, weight and bias parts) equals three calls with one."""
    hidden, weight, bias, target = make_problem((2, 5), bias=with_bias)
    k = 3
    gen = torch.Generator().manual_seed(2)
    d_hidden = torch.randn(k, *hidden.shape, generator=gen, dtype=torch.float64)
    d_weight = torch.randn(k, *weight.shape, generator=gen, dtype=torch.float64)
    d_bias = torch.randn(k, weight.shape[0], generator=gen, dtype=torch.float64) if with_bias else None
    batched = curvkern.linear_ce_ggn_vp(
        hidden, weight, target, d_hidden, d_weight, d_bias, bias=bias, fused=backend, **kwargs
    )
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
            **kwargs,
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

    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    row_error = epsilon_p * max(1.0, torch.logsumexp(logits, 1).abs().max().item(), logits.abs().max().item())
    loss_bound = (
        row_error * valid.sum().item() * scale.max().item() + reduction_terms(n) * u * loss.abs().item()
    ) / loss.abs().item()
    return products_and_bounds(
        hidden, weight, tangents, (loss, loss_bound), grad_z, grad_z_error, hessian_u, hessian_u_error
    )


def products_and_bounds(hidden, weight, tangents, loss, grad_z, grad_z_error, hessian_u, hessian_u_error):
    """The results of the per-logit g_z and H u (N, V), and the bound of each from their elementwise absolute
    errors (:func:`sum_of_products_bound`); ``loss`` is (value, bound)."""
    n, v = grad_z.shape
    v_hidden, v_weight, _ = tangents
    ones = torch.ones(n, 1, dtype=torch.float64)
    return {
        "loss": loss,
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
    assert_within_the_truths_bounds(got, truth, expected, dtype, backend)


def assert_within_the_truths_bounds(got, truth, expected, dtype, backend):
    """The closed form ``truth`` equals PyTorch's fp64 ``expected`` (it is the fp64 truth), and each ``dtype``
    result is within its bound of it, plus the final store into ``dtype``."""
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
    """Compile every Triton linear cross-entropy kernel, in every mode (plain, and four with every loss variant),
    for ``dtype`` inputs ahead of time for sm_90 (to PTX and through ptxas), at the default tile sizes; run in a
    process without TRITON_INTERPRET,
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
        return "fp32" if name.startswith(("smoothing", "z_loss", "cap")) else "i64"

    plain = dict(HAS_ZLOSS=False, HAS_SOFTCAP=False, HAS_WEIGHT=False)
    kernels = [("forward", linear_ce_triton._forward_kernel, dict(tiles, **plain, HAS_BIAS=True, SMOOTHING=True))]
    for mode in (0, 1, 2):
        for name, kernel in (("rows", linear_ce_triton._rows_kernel), ("columns", linear_ce_triton._columns_kernel)):
            kernels.append((f"{name} mode {mode}", kernel, dict(tiles, **flags, **plain, MODE=mode)))
    # With all three loss variants, the kernels that hold every line of their code (compiling all seven again
    # would double the test's time): the forward, the HVP's two kernels, the Gauss-Newton sweep 1 under a cap.
    variants = dict(HAS_ZLOSS=True, HAS_SOFTCAP=True, HAS_WEIGHT=True)
    kernels.append(("forward variants", linear_ce_triton._forward_kernel, dict(kernels[0][2], **variants)))
    for name, kernel, mode in (
        ("rows", linear_ce_triton._rows_kernel, 1),
        ("columns", linear_ce_triton._columns_kernel, 1),
        ("rows", linear_ce_triton._rows_kernel, 2),
    ):
        kernels.append((f"{name} mode {mode} variants", kernel, dict(tiles, **flags, **variants, MODE=mode)))
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
def rows_past_two_to_the_31(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (R, d) as a view whose rows lie 2³⁰ + 7 elements apart in one bf16 storage of more than 2³¹
    elements: a 32-bit offset would wrap. Only the pages of the R rows are ever touched (torch.empty)."""
    stride = 2**30 + 7
    storage = torch.empty((rows.shape[0] - 1) * stride + rows.shape[1], dtype=rows.dtype)
    view = storage.as_strided(rows.shape, (stride, 1))
    view.copy_(rows)
    return view


@ON_EACH_BACKEND
def test_inputs_whose_offsets_pass_two_to_the_31(backend):
    """hidden and weight rows past element 2³¹ of their storage (64-bit offsets): loss, gradients and the double
    backward equal those of the same values stored densely."""
    hidden, weight, bias, target = (
        x.to(torch.bfloat16) if x.is_floating_point() else x for x in make_problem((3,), d=5, v=3, ignore=())
    )
    tangents = tangents_for(hidden, weight, bias)
    dense = derivatives(on(backend), hidden, weight, target, bias, tangents, torch.tensor(1.0, dtype=torch.bfloat16))
    far = [rows_past_two_to_the_31(x).requires_grad_(True) for x in (hidden, weight)]
    assert far[0].stride(0) * 2 + 5 > 2**31
    far.append(bias.clone().requires_grad_(True))
    loss = ours(far[0], far[1], target, far[2], fused=backend)
    grads = torch.autograd.grad(loss, far, create_graph=True)
    hvps = torch.autograd.grad(grads, far, tangents)
    for got, want, label in zip([loss, *grads, *hvps], dense[:7], LABELS[:7], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=label)


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
    assert len(report) == 11, report
    for label, instructions in report.items():
        if dtype == "fp64":
            assert instructions and all("f64" in x for x in instructions), (label, instructions)
        else:
            assert not any("tf32" in x for x in instructions), (label, instructions)


# --- Loss variants: z-loss, soft-capping, class weights (every backend that implements them) ----------------


def variant_backends():
    return [
        b
        for b in BACKENDS
        if set(("z_loss", "softcap", "class_weight")) <= curvkern.linear_ce.variants.IMPLEMENTED.get(b, frozenset())
    ]


ON_EACH_VARIANT_BACKEND = pytest.mark.parametrize("backend", variant_backends())
# The fp64 matrices: Triton's interpreter runs them in make test only (slow); make test-fast checks its
# variants through the gradcheck, K-tangent, low-precision and compile tests.
ON_EACH_VARIANT_BACKEND_INTERPRETER_SLOW = pytest.mark.parametrize(
    "backend",
    [
        pytest.param(b, marks=pytest.mark.slow) if b == "triton" and not torch.cuda.is_available() else b
        for b in variant_backends()
    ],
)


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
PAIRS = [c[1] for c in VARIANT_CASES if len(c[1]) == 2]


def skip_outside_the_interpreted_subset(backend, variants, with_bias, label_smoothing=None):
    """Triton on CPU tensors runs in its interpreter (about 1.5 s a case here): it takes each variant alone and
    all three together, and bias with label smoothing or neither; eager and C++ take every combination."""
    interpreted = backend == "triton" and not torch.cuda.is_available()
    pair_or_mixed = any(variants is pair for pair in PAIRS) or (
        label_smoothing is not None and with_bias != bool(label_smoothing)
    )
    if interpreted and pair_or_mixed:
        pytest.skip("outside the Triton interpreter's subset (every combination runs on eager and C++)")


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
@ON_EACH_VARIANT_BACKEND_INTERPRETER_SLOW
def test_variants_match_pytorch_fp64(variants, reduction, label_smoothing, with_bias, backend):
    """Loss, gradients and the double backward (cross terms, and to the incoming gradient) of every variant and
    combination, against autograd through F.linear + the variant in plain torch; ignored rows 1 and 7, three row
    tiles and two class tiles."""
    skip_outside_the_interpreted_subset(backend, variants, with_bias, label_smoothing)
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
@ON_EACH_VARIANT_BACKEND_INTERPRETER_SLOW
def test_variants_ggn_vp_matches_torch_func(variants, reduction, with_bias, backend):
    skip_outside_the_interpreted_subset(backend, variants, with_bias)
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


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@ON_EACH_VARIANT_BACKEND
def test_variants_k_tangents_at_once_equal_k_separate_calls(with_bias, backend):
    """K tangents with all three variants (every variant's code runs), per-row scales (reduction "none") and
    label smoothing: a = W + 2λ·lse and the cap's curvature are per row and tile, shared by the K tangents."""
    variants = dict(z_loss=0.2, softcap=2.5, class_weight=class_weights())
    assert_k_tangents_equal_k_calls(backend, with_bias, reduction="none", label_smoothing=0.1, **variants)


def variant_ground_truth_and_bounds(hidden, weight, bias, target, tangents, label_smoothing, z_loss, softcap, weights):
    """:func:`ground_truth_and_bounds` with all three variants: the fp64 mean loss, gradients and HVP from
    materialised logits (docs/linear_cross_entropy.md, "Loss variants"), and kind (b)'s bound of each, each
    error carried elementwise through the formulas by the product and sum rules (u per rounded operation,
    TRANSCENDENTAL_OPS·u per exp, log or tanh, r(n)·u times the sum of the absolute terms per sum):

    - z carries δz as there; t = tanh(z/c) carries δt = J·(δz + u|z|)/c + (2·TRANSCENDENTAL_OPS + 3)·u
      (absolute: the kernels' tanh is (1 − e^{−2|y|})/(1 + e^{−2|y|}) above 0.04), z' = c·t and J = 1 − t²
      then δz' = c·δt + u|z'| and δJ = 2|t|·δt + 2u; lse and p carry δz' as lse and p carry δz there;
    - W = (1 − α)·w_y + (α/V)·Σ w and a = W + 2λ·lse; the weighted mean's scale 1/Σ w_y carries (r(N) + 1)·u;
    - g' = a·p − q̃, g_z = s·J⊙g', v = J⊙u_z, ⟨p, v⟩, H u = s·(J⊙[a·p⊙(v − ⟨p, v⟩) + 2λ·p·⟨p, v⟩] + g'⊙z''⊙u_z)
      and the loss rows W·lse − ⟨q̃, z'⟩ + λ·lse², each from its factors' errors.
    """
    u, ops = unit_roundoff(torch.float32), TRANSCENDENTAL_OPS
    n, d, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    v_hidden, v_weight, v_bias = tangents
    alpha = label_smoothing
    logits = hidden @ weight.T + bias
    delta_z = (reduction_terms(d) + 1) * u * (hidden.abs() @ weight.abs().T + bias.abs()).max().item()
    t = torch.tanh(logits / softcap)
    capped, jacobian = softcap * t, 1 - t * t
    delta_t = jacobian * (delta_z + u * logits.abs()) / softcap + (2 * ops + 3) * u
    delta_capped = softcap * delta_t + u * capped.abs()
    delta_jacobian = 2 * t.abs() * delta_t + 2 * u
    lse = torch.logsumexp(capped, 1, keepdim=True)
    p = torch.softmax(capped, 1)
    epsilon_p = 2 * delta_capped.max().item() + (reduction_terms(v) + 2 * ops + 4) * u
    lse_error = delta_capped.max().item() + (reduction_terms(v) + 2 * ops + 2) * u * lse.abs().clamp_min(1.0)

    valid = (target != -100)[:, None]
    w_y = torch.where(valid, weights[target.clamp_min(0)][:, None], 0.0)
    total = (1 - alpha) * w_y + alpha / v * weights.sum()
    total_error = (reduction_terms(v) + 4) * u * total
    a = total + 2 * z_loss * lse
    a_error = total_error + 2 * z_loss * lse_error + 2 * u * a.abs()
    q = torch.where(valid, (1 - alpha) * w_y * F.one_hot(target.clamp_min(0), v) + alpha / v * weights, 0.0)
    scale = valid / w_y.sum()
    epsilon_scale = (reduction_terms(n) + 1) * u

    grad_capped = a * p - q
    grad_capped_error = a.abs() * p * epsilon_p + p * a_error + 2 * u * (a.abs() * p + q)
    grad_z = scale * jacobian * grad_capped
    grad_z_error = scale * (jacobian * grad_capped_error + grad_capped.abs() * delta_jacobian)
    grad_z_error += (3 * u + epsilon_scale) * grad_z.abs()

    tangent = v_hidden @ weight.T + hidden @ v_weight.T + v_bias
    tangent_error = (
        (reduction_terms(d) + 1)
        * u
        * (v_hidden.abs() @ weight.abs().T + hidden.abs() @ v_weight.abs().T + v_bias.abs())
    )
    capped_tangent = jacobian * tangent
    capped_tangent_error = jacobian * tangent_error + tangent.abs() * delta_jacobian + u * capped_tangent.abs()
    p_dot_v = (p * capped_tangent).sum(1, keepdim=True)
    p_dot_v_error = (p * (epsilon_p * capped_tangent.abs() + capped_tangent_error)).sum(1, keepdim=True)
    p_dot_v_error += reduction_terms(v) * u * (p * capped_tangent.abs()).sum(1, keepdim=True)
    centred = capped_tangent - p_dot_v
    inner = a * p * centred + 2 * z_loss * p * p_dot_v
    inner_error = (
        a.abs() * p * (epsilon_p * centred.abs() + capped_tangent_error + p_dot_v_error)
        + p * centred.abs() * a_error
        + 2 * z_loss * p * (epsilon_p * p_dot_v.abs() + p_dot_v_error)
        + 5 * u * (a.abs() * p * centred.abs() + 2 * z_loss * p * p_dot_v.abs())
    )
    second = -2 / softcap**2 * capped * jacobian
    second_error = 2 / softcap**2 * (delta_capped * jacobian + capped.abs() * delta_jacobian) + 3 * u * second.abs()
    curvature = grad_capped * second * tangent
    curvature_error = (
        grad_capped_error * (second * tangent).abs()
        + grad_capped.abs() * second_error * tangent.abs()
        + (grad_capped * second).abs() * tangent_error
        + 3 * u * curvature.abs()
    )
    hessian_u = scale * (jacobian * inner + curvature)
    hessian_u_error = scale * (
        jacobian * inner_error + inner.abs() * delta_jacobian + curvature_error + 3 * u * (jacobian * inner).abs()
    )
    hessian_u_error += epsilon_scale * hessian_u.abs()

    rows = total * lse - (q * capped).sum(1, keepdim=True) + z_loss * lse * lse
    row_error = (
        total * lse_error
        + total_error * lse.abs()
        + (q * delta_capped).sum(1, keepdim=True)
        + 2 * z_loss * lse.abs() * lse_error
        + (reduction_terms(v) + 4) * u * (total * lse.abs() + (q * capped.abs()).sum(1, keepdim=True) + z_loss * lse**2)
    )
    loss = (scale * rows).sum()
    loss_error = (scale * row_error).sum() + (reduction_terms(n) + 1) * u * (scale * rows.abs()).sum()
    loss_bound = (loss_error + epsilon_scale * loss.abs()).item() / loss.abs().item()
    return products_and_bounds(
        hidden, weight, tangents, (loss, loss_bound), grad_z, grad_z_error, hessian_u, hessian_u_error
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@ON_EACH_VARIANT_BACKEND
def test_variants_low_precision_against_an_fp64_ground_truth(dtype, backend):
    """All three variants and label smoothing, fp32 and bf16 inputs (and class weights), against the fp64 truth
    on the same rounded inputs with the bounds :func:`variant_ground_truth_and_bounds` derives."""
    hidden, weight, bias, target = make_problem(dtype=dtype)
    tangents = tangents_for(hidden, weight, bias)
    variants = dict(z_loss=0.2, softcap=2.5, class_weight=class_weights().to(dtype))
    label_smoothing = 0.1
    one = torch.tensor(1.0, dtype=dtype)
    got = derivatives(
        on(backend), hidden, weight, target, bias, tangents, one, label_smoothing=label_smoothing, **variants
    )
    as_fp64 = [x.double() for x in (hidden, weight, bias, *tangents)]
    variants_fp64 = dict(variants, class_weight=variants["class_weight"].double())
    truth = variant_ground_truth_and_bounds(*as_fp64[:3], target, as_fp64[3:], label_smoothing, *variants_fp64.values())
    expected = derivatives(
        torch_variant_loss,
        *as_fp64[:2],
        target,
        as_fp64[2],
        as_fp64[3:],
        one.double(),
        label_smoothing=label_smoothing,
        **variants_fp64,
    )
    assert_within_the_truths_bounds(got, truth, expected, dtype, backend)


# As MEMORY_CASES (the profiler alone sees inside a fused backend's op), but not Triton: its kernels hold no
# tile buffers, so the variants add nothing its plain memory test does not see but the (V,) weights.
VARIANT_MEMORY_CASES = [
    (r, b) for b in variant_backends() if b != "triton" for r in (RECORDERS if b == "eager" else ["profiler"])
]


@pytest.mark.parametrize("recorder,backend", VARIANT_MEMORY_CASES, ids=[f"{r}-{b}" for r, b in VARIANT_MEMORY_CASES])
def test_no_tensor_of_n_times_v_elements_is_allocated_with_variants(recorder, backend):
    variants = dict(z_loss=0.1, softcap=3.0, class_weight=class_weights(40))
    phases, n_times_v = largest_allocations(recorder, backend, **variants)
    assert all(0 < largest < n_times_v for largest in phases.values()), (phases, n_times_v)


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


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
def test_the_triton_kernels_check_the_class_weights():
    """Direct calls of the Triton kernels (the public functions check the call first): class weights of the wrong
    shape, dtype or device raise before any launch; strided ones are taken (made contiguous on the host)."""
    hidden, weight, bias, target = make_problem()
    record = curvkern.linear_ce.variants.LinearCrossEntropyHyperparameters
    kernels = linear_ce_triton.TritonLinearCrossEntropy
    scale = torch.ones((), dtype=torch.float64)
    bad_weights = [
        (torch.ones(12, dtype=torch.float64), r"class_weight must be a tensor of shape \(13,\), got \(12,\)"),
        ([1.0] * 13, "class_weight must be a tensor of shape"),
        (torch.ones(13, dtype=torch.int64), "class_weight must be float16, bfloat16, float32 or float64"),
        (torch.ones(13, dtype=torch.float64, device="meta"), "class_weight must be on hidden's device"),
    ]
    for bad, message in bad_weights:
        hyperparameters = record(class_weight=bad)
        with pytest.raises(RuntimeError, match=message):
            kernels.forward(hidden, weight, bias, target, hyperparameters)
        with pytest.raises(RuntimeError, match=message):
            kernels.ggn_vp(hidden, weight, bias, target, scale, hidden[None], None, None, hyperparameters)
    strided = class_weights(26)[::2]
    got = kernels.forward(hidden, weight, bias, target, record(class_weight=strided))
    want = kernels.forward(hidden, weight, bias, target, record(class_weight=strided.contiguous()))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_probability_targets_are_refused():
    hidden, weight, bias, _ = make_problem()
    soft = torch.softmax(torch.randn(10, 13, dtype=torch.float64), dim=1)
    with pytest.raises(NotImplementedError, match=r"probability \(soft\) targets are not supported"):
        ours(hidden, weight, soft, bias, fused="eager")


def flat(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, tuple) else (result,)) if t is not None]


@pytest.mark.parametrize("variant", ["z_loss", "softcap", "class_weight"])
def test_backends_without_a_variant_raise_naming_it(variant, monkeypatch):
    """Where cpp implements the variant, "auto" on CPU runs cpp's kernels without a warning. A backend that does
    not (here cpp and triton, made so by dropping them from IMPLEMENTED): an explicit choice raises naming the
    variant and the backend; "auto" on CPU (which picks cpp) runs the eager reference with a warning that says
    why; never the plain loss."""
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
    if "cpp" in BACKENDS:
        assert variant in curvkern.linear_ce.variants.IMPLEMENTED["cpp"]
        monkeypatch.setattr(_dispatch, "_warned", set())
        for call in calls:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = call("auto")
            assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(call("cpp")), strict=True))
    for backend in ("cpp", "triton"):
        monkeypatch.delitem(curvkern.linear_ce.variants.IMPLEMENTED, backend, raising=False)
    lacking = [b for b in ("cpp", "triton") if b in FAMILY.backends]
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
