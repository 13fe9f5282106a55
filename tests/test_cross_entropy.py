"""curvkern.cross_entropy, its double backward and ce_hvp against PyTorch's cross-entropy, on every backend.

Ground truth is PyTorch's own ``F.cross_entropy`` (and its autograd double backward) in fp64; low-precision
results are compared with an fp64 ground truth by ‖a − b‖ / ‖b‖, to the bound of tests/tolerance.py.
"""

import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from disassembly import extension_bodies, extension_symbols, has_omp_body, omp_body
from tolerance import TRANSCENDENTAL_OPS, assert_relative_error, relative_error, truth_bound, unit_roundoff

import curvkern
from curvkern.families import get_family
from curvkern.integrations import eigenthings as ck_eigenthings

FAMILY = get_family("cross_entropy")
# Triton's interpreter computes with numpy, which warns on the NaN and inf rows these tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")
REDUCTIONS = ["mean", "sum", "none"]
FP64 = dict(rtol=1e-10, atol=1e-13)


def make_problem(n, v, *, dtype=torch.float64, ignore=(), seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (spread * torch.randn(n, v, generator=gen, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, v, (n,), generator=gen)
    target[list(ignore)] = -100
    u = torch.randn(n, v, generator=gen, dtype=torch.float64).to(dtype)
    return logits, target, u


def loss_grad_hvp(loss_fn, logits, target, u, grad_loss=None, **kwargs):
    """Loss, gradient, the double backward's two results (to the logits and to the incoming gradient)."""
    z = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(z, target, **kwargs)
    if grad_loss is None:
        grad_loss = torch.ones_like(loss)
    grad_loss = grad_loss.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss, z, grad_loss, create_graph=True)
    hvp, grad_grad_loss = torch.autograd.grad(grad, (z, grad_loss), u)
    return loss.detach(), grad.detach(), hvp, grad_grad_loss


def ours(backend):
    return lambda z, y, **kw: curvkern.cross_entropy(z, y, fused=backend, **kw)


def assert_all_close(actual, expected, **tol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, equal_nan=True, **tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(backend, device, reduction):
    logits, target, _ = make_problem(5, 7, ignore=[2])
    z = logits.to(device).requires_grad_(True)

    def fn(z):
        return curvkern.cross_entropy(z, target.to(device), reduction=reduction, label_smoothing=0.2, fused=backend)

    assert torch.autograd.gradcheck(fn, (z,))
    # Also checks the derivative with respect to the incoming gradient (docs/cross_entropy.md, "Double backward").
    assert torch.autograd.gradgradcheck(fn, (z,))


@pytest.mark.parametrize("u_requires_grad", [False, True])
def test_a_third_derivative_raises_instead_of_dropping_a_term(backend, device, u_requires_grad):
    """An HVP taken with create_graph=True stays attached to the graph, and differentiating it raises:
    torch's @once_differentiable looks only at u, so with a plain u the HVP came back detached and a loss
    built on it silently added nothing to the logits' gradient."""
    logits, target, u = (t.to(device) for t in make_problem(4, 5))
    z = logits.requires_grad_(True)
    u.requires_grad_(u_requires_grad)
    loss = curvkern.cross_entropy(z, target, fused=backend)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    (hvp,) = torch.autograd.grad(g, z, grad_outputs=u, create_graph=True)
    assert hvp.requires_grad
    with pytest.raises(RuntimeError, match="third derivatives are not implemented"):
        (loss + (hvp * hvp).sum()).backward()
    # Without create_graph, the same HVP is a plain tensor.
    (g,) = torch.autograd.grad(curvkern.cross_entropy(z, target, fused=backend), z, create_graph=True)
    (plain,) = torch.autograd.grad(g, z, grad_outputs=u.detach())
    assert not plain.requires_grad and torch.equal(plain, hvp.detach())  # same kernel on the same data


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", [(), (1, 4)], ids=["all-valid", "some-ignored"])
def test_matches_torch_double_backward_fp64(backend, device, reduction, label_smoothing, ignored):
    logits, target, u = (t.to(device) for t in make_problem(6, 11, ignore=ignored))
    grad_loss = torch.rand(6 if reduction == "none" else (), dtype=torch.float64, device=device) + 0.5
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    expected = loss_grad_hvp(F.cross_entropy, logits, target, u, grad_loss, **kwargs)
    actual = loss_grad_hvp(ours(backend), logits, target, u, grad_loss, **kwargs)
    assert_all_close(actual, expected, **FP64)
    # ce_hvp: the loss Hessian alone (labels and smoothing do not enter it).
    hvp = curvkern.ce_hvp(logits, target, u, reduction=reduction, fused=backend)
    torch.testing.assert_close(hvp, loss_grad_hvp(F.cross_entropy, logits, target, u, reduction=reduction)[2], **FP64)
    for row in ignored:
        assert torch.equal(actual[2][row], torch.zeros(11, dtype=torch.float64, device=device))


def test_single_class_and_empty_batch(backend, device):
    logits, target, u = (t.to(device) for t in make_problem(4, 1))
    for reduction in REDUCTIONS:
        actual = loss_grad_hvp(ours(backend), logits, target, u, reduction=reduction)
        assert_all_close(actual, loss_grad_hvp(F.cross_entropy, logits, target, u, reduction=reduction), **FP64)
        assert torch.count_nonzero(actual[2]) == 0  # V = 1: p = 1, the Hessian vanishes
    empty = torch.empty(0, 9, dtype=torch.float64, device=device)
    no_target = torch.empty(0, dtype=torch.int64, device=device)
    for reduction in REDUCTIONS:
        actual = loss_grad_hvp(ours(backend), empty, no_target, empty, reduction=reduction)
        expected = loss_grad_hvp(F.cross_entropy, empty, no_target, empty, reduction=reduction)
        assert_all_close(actual, expected, **FP64)  # mean over nothing: NaN, like PyTorch
        assert curvkern.ce_hvp(empty, no_target, empty, reduction=reduction, fused=backend).shape == (0, 9)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(backend, device, reduction):
    """mean: loss NaN, gradient and HVP 0, gradient to the incoming gradient NaN, all as PyTorch."""
    logits, target, u = (t.to(device) for t in make_problem(4, 6, ignore=range(4)))
    expected = loss_grad_hvp(F.cross_entropy, logits, target, u, reduction=reduction)
    logits[1] = float("nan")  # PyTorch's gradient would be NaN here; ignored rows are exactly 0 in ours
    actual = loss_grad_hvp(ours(backend), logits, target, u, reduction=reduction)
    assert_all_close(actual, expected, **FP64)
    assert torch.count_nonzero(actual[1]) == 0 and torch.count_nonzero(actual[2]) == 0
    assert actual[0].isnan().all() == (reduction == "mean")
    assert torch.count_nonzero(curvkern.ce_hvp(logits, target, u, reduction=reduction, fused=backend)) == 0


def test_strided_and_non_contiguous_inputs(backend, device):
    logits, target, u = (t.to(device) for t in make_problem(6, 9, ignore=[0]))
    expected = loss_grad_hvp(F.cross_entropy, logits, target, u, label_smoothing=0.1)
    wide = torch.full((6, 16), float("nan"), dtype=torch.float64, device=device)
    wide[:, 3:12] = logits  # row stride 16, V = 9: the NaN around each row must never be read
    wide_u = torch.full_like(wide, float("nan"))
    wide_u[:, 2:11] = u
    transposed = logits.t().contiguous().t()  # a transposed view: column stride 6
    for z, w in [(wide[:, 3:12], wide_u[:, 2:11]), (transposed, u.t().contiguous().t())]:
        assert not z.is_contiguous()
        actual = loss_grad_hvp(ours(backend), z, target, w, label_smoothing=0.1)
        assert_all_close(actual, expected, **FP64)
        torch.testing.assert_close(curvkern.ce_hvp(z, target, w, fused=backend), expected[2], **FP64)
    # Rows taken with a step, and u broadcast along the rows (row stride 0).
    every_other = torch.cat([logits, logits]).view(2, 6, 9).transpose(0, 1)[:, 0]
    shared_u = u[2:3].expand(6, 9)
    torch.testing.assert_close(
        curvkern.ce_hvp(every_other, target, shared_u, fused=backend),
        loss_grad_hvp(F.cross_entropy, logits, target, shared_u.contiguous())[2],
        **FP64,
    )
    # ``out`` written in place, strided or transposed.
    for out in [
        torch.empty(6, 16, dtype=torch.float64, device=device)[:, :9],
        torch.empty(9, 6, dtype=torch.float64, device=device).t(),
    ]:
        result = curvkern.ce_hvp(logits, target, u, out=out, fused=backend)
        assert result is out
        torch.testing.assert_close(out, expected[2], **FP64)


def test_infinite_and_nan_rows(backend, device):
    """Rows of −inf or NaN give NaN as PyTorch does; ignored rows stay exactly 0 whatever they hold;
    single −inf entries (masked classes) have probability 0."""
    logits, target, u = (t.to(device) for t in make_problem(6, 7))
    logits[0] = float("-inf")
    logits[1, 2] = float("nan")
    logits[2] = float("-inf")
    logits[3] = float("nan")
    logits[4, [0, 5]] = float("-inf")
    target[[2, 3]] = -100
    target[4] = 1
    finite_ignored = logits.clone()
    finite_ignored[2:4] = 0.0  # PyTorch's gradient is NaN on ignored NaN rows; ours is 0
    for reduction in ["sum", "none"]:
        actual = loss_grad_hvp(ours(backend), logits, target, u, reduction=reduction)
        expected = loss_grad_hvp(F.cross_entropy, finite_ignored, target, u, reduction=reduction)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, equal_nan=True, **FP64)
        for result in actual[1:3]:
            assert result[:2].isnan().all() and torch.count_nonzero(result[2:4]) == 0
            assert result[4].isfinite().all() and result[4, 0] == 0 and result[4, 5] == 0
    hvp = curvkern.ce_hvp(logits, target, u, reduction="sum", fused=backend)
    assert hvp[:2].isnan().all() and torch.count_nonzero(hvp[2:4]) == 0 and hvp[4:].isfinite().all()


def test_peaked_and_flat_rows_closed_forms(backend, device):
    n, v = 4, 33
    _, target, u = (t.to(device) for t in make_problem(n, v))
    flat = torch.full((n, v), 0.7, dtype=torch.float64, device=device)
    # Flat rows: (H u)_r = c (u_r − mean(u_r)) / V, loss log V (docs/cross_entropy.md, "The math").
    torch.testing.assert_close(
        curvkern.ce_hvp(flat, target, u, fused=backend), (u - u.mean(1, keepdim=True)) / v / n, **FP64
    )
    torch.testing.assert_close(
        curvkern.cross_entropy(flat, target, fused=backend),
        torch.tensor(math.log(v), dtype=torch.float64, device=device),
        **FP64,
    )
    # Peaked rows, the target 50 above the rest: p_y = 1 / (1 + (V−1)e^{−50}), the others e^{−50} p_y.
    peaked = torch.zeros(n, v, dtype=torch.float64, device=device)
    peaked[torch.arange(n), target] = 50.0
    p = torch.full((n, v), math.exp(-50.0), dtype=torch.float64, device=device)
    p[torch.arange(n), target] = 1.0
    p /= p.sum(1, keepdim=True)
    expected = p * (u - (p * u).sum(1, keepdim=True))
    torch.testing.assert_close(
        curvkern.ce_hvp(peaked, target, u, reduction="sum", fused=backend), expected, rtol=1e-9, atol=1e-30
    )
    loss = curvkern.cross_entropy(peaked, target, reduction="none", fused=backend)
    torch.testing.assert_close(
        loss,
        torch.full((n,), math.log1p((v - 1) * math.exp(-50.0)), dtype=torch.float64, device=device),
        rtol=0,
        atol=1e-14,
    )


# Rounded operations per element of the loss, gradient and HVP: exp, log and the softmax's exp(z − lse)
# (transcendental), the shift, label smoothing, the scales and u − Σp·u; the sums run over the V classes.
CE_OPS = 10 + 3 * TRANSCENDENTAL_OPS


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_against_fp64_ground_truth(backend, device, dtype, reduction):
    """Kind (b) of tests/tolerance.py: each result's ‖a − b‖/‖b‖ against fp64 on the same inputs."""
    n, v = 16, 300
    logits64, target, u64 = (t.to(device) for t in make_problem(n, v, ignore=[3, 9], seed=1))
    logits, u = logits64.to(dtype), u64.to(dtype)
    # Ground truth: fp64 evaluated on the same (rounded) inputs.
    truth = loss_grad_hvp(
        F.cross_entropy, logits.double(), target, u.double(), reduction=reduction, label_smoothing=0.1
    )
    actual = loss_grad_hvp(ours(backend), logits, target, u, reduction=reduction, label_smoothing=0.1)
    standalone = curvkern.ce_hvp(logits, target, u, reduction=reduction, fused=backend)
    bound = truth_bound(dtype, ops=CE_OPS, reduction_length=v)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        bound += unit_roundoff(dtype)  # Triton's interpreter truncates fp32 -> bf16: a whole ulp, not half
    for name, ours_result, truth_result in zip(["loss", "grad", "hvp", "grad_grad_loss"], actual, truth):
        assert ours_result.dtype == dtype, name
        assert_relative_error(ours_result, truth_result, bound, label=name)
    assert standalone.dtype == dtype
    assert_relative_error(standalone, truth[2], bound, label="ce_hvp")


def test_argument_errors(backend, device):
    logits, target, u = (t.to(device) for t in make_problem(3, 4))

    def call(z=logits, y=target, **kwargs):
        return curvkern.cross_entropy(z, y, fused=backend, **kwargs)

    with pytest.raises(ValueError, match="reduction"):
        call(reduction="avg")
    with pytest.raises(RuntimeError, match="label_smoothing"):
        call(label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="Long"):
        call(y=target.int())
    with pytest.raises(ValueError, match="target size"):
        call(y=target[:2])
    with pytest.raises(TypeError, match="logits"):
        call(z=logits.to(torch.int32))
    if device == "cpu":
        for bad in [4, -1]:
            with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
                call(y=torch.tensor([0, bad, 1]))
            with pytest.raises(IndexError, match="out of bounds"):
                curvkern.ce_hvp(logits, torch.tensor([0, bad, 1]), u, fused=backend)
    with pytest.raises(ValueError, match="u must have the logits' shape"):
        curvkern.ce_hvp(logits, target, u[:2], fused=backend)
    with pytest.raises(ValueError, match="out must match"):
        curvkern.ce_hvp(logits, target, u, out=torch.empty(3, 4, dtype=torch.float32, device=device), fused=backend)
    with pytest.raises(ValueError, match="fused"):
        curvkern.cross_entropy(logits, target, fused="cuda")


def test_explicit_backend_never_falls_back(monkeypatch):
    logits, target, u = make_problem(3, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton cannot run on CPU tensors now
    with pytest.raises((RuntimeError, NotImplementedError), match="fused='triton'"):
        curvkern.cross_entropy(logits, target, fused="triton")
    with pytest.raises((RuntimeError, NotImplementedError), match="fused='triton'"):
        curvkern.ce_hvp(logits, target, u, fused="triton")
    with pytest.raises((RuntimeError, NotImplementedError), match="fused='cpp'"):
        curvkern.cross_entropy(logits.to("meta"), target.to("meta"), fused="cpp")


def test_saves_only_logits_lse_and_scalars(backend, device):
    """No (N, V) tensor other than the logits themselves is kept alive between forward and backward."""
    logits, target, _ = (t.to(device) for t in make_problem(8, 50))
    z = logits.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        curvkern.cross_entropy(z, target, fused=backend)
    big = [t for t in saved if t.numel() >= z.numel()]
    assert len(big) == 1 and big[0].data_ptr() == z.data_ptr()
    assert sum(t.numel() for t in saved) <= z.numel() + 2 * 8 + 1


# --- hessian-eigenthings ---------------------------------------------------------------------------


class TinyCausalLM(torch.nn.Module):
    """Embedding, a causal running mean, a nonlinearity and a head: a (B, T) → (B, T, V) language model."""

    def __init__(self, vocab=13, width=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, **_):
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[:, None]
        x = torch.tanh(self.mix(x.cumsum(1) / steps))
        return SimpleNamespace(logits=self.head(x))  # what hf_lm_forward reads, as from a HF model


def lm_batches(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 13, (3, 5), generator=gen)
        labels = ids.clone()
        labels[0, 2] = -100
        labels[2, 4] = -100
        batches.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return batches


def test_eigenthings_operators_match_torch_cross_entropy(backend, device):
    he = pytest.importorskip("hessian_eigenthings")
    torch.manual_seed(0)
    model = TinyCausalLM().double().to(device)
    batches = lm_batches(device)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64, device=device)
    forward = he.hf_lm_forward()
    ggn = [
        he.GGNOperator(model, batches, forward, loss).matvec(v)
        for loss in [he.hf_lm_loss_of_output(), ck_eigenthings.hf_lm_loss_of_output(fused=backend)]
    ]
    torch.testing.assert_close(ggn[1], ggn[0], **FP64)
    assert ggn[0].norm() > 0

    def hessian_loss(loss_of_output):
        return lambda model, batch: loss_of_output(forward(model, batch), batch)

    # A full Hessian-vector product: double backward through the model and the loss.
    hessian = [
        he.HessianOperator(model, batches, hessian_loss(loss)).matvec(v)
        for loss in [he.hf_lm_loss_of_output(), ck_eigenthings.hf_lm_loss_of_output(fused=backend)]
    ]
    torch.testing.assert_close(hessian[1], hessian[0], **FP64)
    assert not torch.allclose(hessian[0], ggn[0])  # the two operators differ: the comparison has teeth


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_eigenthings_hvp_protocol(backend, device, layout):
    """``.hvp(output, batch, u)`` (hessian-eigenthings 1.0.0a6) equals the autograd HVP on the loss-only graph."""
    torch.manual_seed(1)
    batch = lm_batches(device)[0]
    output = torch.randn(3, 5, 13, dtype=torch.float64, device=device)
    u = torch.randn_like(output)
    if layout == "strided":
        output = torch.cat([output, output], dim=-1)[..., :13]
        u = torch.cat([u, u], dim=-1)[..., 13:]
    loss_fn = ck_eigenthings.hf_lm_loss_of_output(fused=backend)
    reference = loss_grad_hvp(
        lambda z, y: F.cross_entropy(z[:, :-1].reshape(-1, 13), y[:, 1:].reshape(-1)), output, batch["labels"], u
    )
    torch.testing.assert_close(loss_fn(output, batch), reference[0], **FP64)
    hvp = loss_fn.hvp(output, batch, u)
    assert hvp.shape == output.shape and hvp.dtype == output.dtype
    torch.testing.assert_close(hvp, reference[2], **FP64)
    assert (
        torch.count_nonzero(hvp[:, -1]) == 0 and torch.count_nonzero(hvp[0, 1]) == 0
    )  # last step; label[0, 2] ignored

    plain = ck_eigenthings.cross_entropy_loss_of_output(fused=backend)
    z, y = output.reshape(15, 13), batch["labels"].reshape(15)
    torch.testing.assert_close(plain(z, (None, y)), F.cross_entropy(z, y), **FP64)
    torch.testing.assert_close(
        plain.hvp(z, (None, y), u.reshape(15, 13)), loss_grad_hvp(F.cross_entropy, z, y, u.reshape(15, 13))[2], **FP64
    )


def test_eigenthings_hvp_takes_any_sequence_length_without_recompiling(backend, device):
    """The causal shift's period is a runtime argument of the kernels: T = 4 and T = 7 in turn, one compile."""
    loss_fn = ck_eigenthings.hf_lm_loss_of_output(fused=backend)

    def check(length):
        gen = torch.Generator().manual_seed(length)
        output = torch.randn(3, length, 11, generator=gen, dtype=torch.float64).to(device)
        u = torch.randn(3, length, 11, generator=gen, dtype=torch.float64).to(device)
        labels = torch.randint(0, 11, (3, length), generator=gen).to(device)
        reference = loss_grad_hvp(
            lambda z, y: F.cross_entropy(z[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1)), output, labels, u
        )
        torch.testing.assert_close(loss_fn.hvp(output, {"labels": labels}, u), reference[2], **FP64)

    check(4)
    if device == "cuda" and backend == "triton":
        from curvkern.ce.triton import _hvp_kernel

        compiled = sum(len(cache[0]) for cache in _hvp_kernel.device_caches.values())
        check(7)
        assert sum(len(cache[0]) for cache in _hvp_kernel.device_caches.values()) == compiled
    else:
        check(7)


# --- 64-bit offsets --------------------------------------------------------------------------------


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_rows_past_two_to_the_31_elements(backend, device):
    """N·V ≥ 2³¹ bf16 logits (4.3 GiB, plus the 4.3 GiB result): rows past the 32-bit boundary are right."""
    if backend == "eager":
        pytest.skip("the eager reference materialises fp32 softmaxes of 8.6 GiB each: too large for the test machine")
    if backend == "triton" and device == "cpu":
        pytest.skip("2³¹ elements are out of reach of the Triton interpreter; runs natively on a GPU")
    if device == "cpu" and available_memory_bytes() < 10 * 2**30:
        pytest.skip("needs 10 GiB of free memory: 4.3 GiB of bf16 logits and 4.3 GiB of result")
    v = 50257
    n = 2**31 // v + 8
    gen = torch.Generator().manual_seed(0)
    patterns = (3 * torch.randn(5, v, generator=gen)).to(torch.bfloat16).to(device)
    rows = torch.arange(n, device=device)
    logits = patterns[rows % 5]
    target = (rows * 7919) % v
    target[n - 3] = -100
    u = patterns[1:2].expand(n, v)  # row stride 0: one copy of u for every row
    checked = torch.tensor([0, 1, n // 2, 2**31 // v - 1, 2**31 // v, 2**31 // v + 1, n - 3, n - 2, n - 1])
    expected_loss = F.cross_entropy(logits[checked].float(), target[checked], reduction="none")
    loss = curvkern.cross_entropy(logits, target, reduction="none", fused=backend)
    torch.testing.assert_close(loss[checked].float(), expected_loss, rtol=1e-2, atol=1e-2)
    hvp = curvkern.ce_hvp(logits, target, u, reduction="sum", fused=backend)
    del logits
    expected = loss_grad_hvp(
        F.cross_entropy,
        patterns[checked.to(device) % 5].double(),
        target[checked],
        patterns[1:2].expand(len(checked), v).double(),
        reduction="sum",
    )[2]
    assert relative_error(hvp[checked], expected) < 1e-2
    assert torch.count_nonzero(hvp[n - 3]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outputs_are_the_fp32_results_rounded(backend, device, dtype):
    """Accumulation is fp32 and the only low-precision step is the final round to nearest even: the
    results equal the same computation on fp32 logits rounded by PyTorch, overflow and subnormals included."""
    logits, target, u = (t.to(device) for t in make_problem(8, 301, dtype=dtype, ignore=[2], seed=3))
    logits[5] = float("nan")
    exact = dict(rtol=0, atol=0)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter truncates fp32 -> bf16 (compiled Triton rounds to nearest even): one ulp.
        exact = dict(rtol=2**-7, atol=1e-30)
    for scale in [1e-6, 1.0, 3e5]:
        grad_loss = torch.tensor(scale, dtype=dtype, device=device)
        low = loss_grad_hvp(ours(backend), logits, target, u, grad_loss, reduction="sum")
        high = loss_grad_hvp(ours(backend), logits.float(), target, u.float(), grad_loss.float(), reduction="sum")
        for name, a, b in zip(["grad", "hvp"], low[1:3], high[1:3]):
            torch.testing.assert_close(a, b.to(dtype), equal_nan=True, msg=name, **exact)
    rounded = curvkern.ce_hvp(logits, target, u, reduction="sum", fused=backend)
    torch.testing.assert_close(
        rounded,
        curvkern.ce_hvp(logits.float(), target, u.float(), reduction="sum", fused=backend).to(dtype),
        equal_nan=True,
        **exact,
    )


# --- the C++ ops ------------------------------------------------------------------------------------


def cpp_ops():
    if "cpp" not in curvkern.available_backends(FAMILY.name):
        pytest.skip("the C++ extension is not built")
    return torch.ops.curvkern


def test_cpp_ops_reject_bad_inputs():
    ops = cpp_ops()
    logits, target, u = make_problem(4, 5, dtype=torch.float32)
    scale = torch.tensor(1.0)
    out = torch.empty_like(logits)
    with pytest.raises(RuntimeError, match="dense last dimension"):
        ops.cross_entropy_hvp_(logits.t().contiguous().t(), target, u, scale, -100, 0.0, 0, False, out)
    with pytest.raises(RuntimeError, match="must have the logits' dtype"):
        ops.cross_entropy_hvp_(logits, target, u.double(), scale, -100, 0.0, 0, False, out)
    with pytest.raises(RuntimeError, match="scale must be a Float"):
        ops.cross_entropy_hvp_(logits, target, u, scale.double(), -100, 0.0, 0, False, out)
    with pytest.raises(RuntimeError, match="shift_period"):
        ops.cross_entropy_hvp_(logits, target, u, scale, -100, 0.0, 3, False, out)
    with pytest.raises(RuntimeError, match="contiguous int64"):
        ops.cross_entropy_forward(logits, target.int(), -100, 0.0)
    # An out-of-range label reaching the kernel directly gives NaN, never a read out of bounds.
    loss, _ = ops.cross_entropy_forward(logits, torch.tensor([0, 7, -3, 1]), -100, 0.0)
    assert loss[1:3].isnan().all() and loss[[0, 3]].isfinite().all()


def test_shard_kernels_reject_bad_inputs(backend, device):
    """The vocabulary-parallel shard kernels check shapes, dtypes and the shard's place before any work:
    a Python exception (ValueError, or RuntimeError from the C++ ops), never a launch on bad input."""
    kernels = curvkern._dispatch.select(FAMILY.name, backend, device)[1]
    h = FAMILY.hyperparameters(label_smoothing=0.1)
    logits, target, u = (t.to(device) for t in make_problem(4, 5))
    lse, scale, out = torch.zeros(4, dtype=torch.float64, device=device), torch.tensor(1.0, device=device), u.clone()
    bad = (ValueError, RuntimeError)
    with pytest.raises(bad, match="does not fit"):
        kernels.partial_stats(logits, target, None, 3, 7, h)  # columns 3..8 of 7
    with pytest.raises(bad, match="u"):
        kernels.partial_stats(logits, target, u[:3], 0, 5, h)
    with pytest.raises(bad, match="target"):
        kernels.partial_stats(logits, target.int(), u, 0, 5, h)
    with pytest.raises(bad, match="lse"):
        kernels.shard_backward(logits, target, lse.float(), scale.double(), 0, 5, h)
    with pytest.raises(bad, match="scale"):
        kernels.shard_backward(logits, target, lse, scale, 0, 5, h)  # an fp32 scale for fp64 logits
    with pytest.raises(bad, match="p_dot_u"):
        kernels.shard_hvp(logits, target, u, lse, lse[:2], scale.double(), 5, h, out)
    with pytest.raises(bad, match="out"):
        kernels.shard_hvp(logits, target, u, lse, lse, scale.double(), 5, h, out.float())
    with pytest.raises(bad, match="dense last dimension"):
        kernels.partial_stats(logits.t().contiguous().t(), target, None, 0, 5, h)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="ISA versions exist on x86-64 only")
def test_cpp_kernels_are_cloned_and_vectorized_per_isa():
    """Each parallel region exists as an avx512 (x86-64-v4), an avx2 (AVX2 + FMA) and a baseline version
    (csrc/cpu_dispatch.h), and the avx512 version of the HVP runs on zmm registers for every dtype, with
    exp inlined (no libm call)."""
    cpp_ops()
    symbols = extension_symbols()
    for kernel in ["forward", "backward", "hvp"]:
        for dtype in ["f32", "f64", "bf16", "f16"]:
            for isa in ("avx512", "avx2", "default"):
                assert has_omp_body(symbols, f"ce_{kernel}_{dtype}", isa), (kernel, dtype, isa)
    for dtype in ["f32", "f64", "bf16", "f16"]:
        code = omp_body(extension_bodies(), f"ce_hvp_{dtype}", "avx512")
        assert code.count("zmm") > 50, dtype
        assert not re.search(r"call\s.*<(exp|expf|__expf|fma|fmaf)", code), dtype


# --- the Triton kernels, compiled -------------------------------------------------------------------


def compile_for_sm90(dtype: str) -> None:
    """Compile the Triton kernels for ``dtype`` logits ahead of time for sm_90, to PTX and through
    ptxas (run in a process without TRITON_INTERPRET, where ``triton.jit`` gives compilable functions)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from curvkern.ce import triton as ce_triton

    accumulator = "*fp64" if dtype == "fp64" else "*fp32"
    acc = ce_triton.tl.float64 if dtype == "fp64" else ce_triton.tl.float32
    logits, common = (
        f"*{dtype}",
        {
            "target_row_stride": "i64",
            "N": "i64",
            "V": "i32",
            "class_offset": "i64",
            "num_classes": "i64",
            "ignore_index": "i32",
            "smoothing_hi": "fp32",
            "smoothing_lo": "fp32",
            "z_loss_hi": "fp32",
            "z_loss_lo": "fp32",
            "cap_hi": "fp32",
            "cap_lo": "fp32",
        },
    )
    kernels = [
        (
            ce_triton._forward_kernel,
            {
                "logits_ptr": logits,
                "row_stride": "i64",
                "target_ptr": "*i64",
                "weight_ptr": logits,
                "loss_ptr": accumulator,
                "lse_ptr": accumulator,
            },
            {
                "ACC": acc,
                "SMOOTHING": True,
                "Z_LOSS": True,
                "CAP": True,
                "WEIGHTED": True,
                "SOFT": False,
                "ROWS": 4,
                "BLOCK_V": 1024,
            },
        ),
        (
            ce_triton._backward_kernel,
            {
                "logits_ptr": logits,
                "row_stride": "i64",
                "target_ptr": "*i64",
                "weight_ptr": logits,
                "lse_ptr": accumulator,
                "scale_ptr": accumulator,
                "scale_stride": "i64",
                "grad_ptr": logits,
            },
            {
                "ACC": acc,
                "SMOOTHING": True,
                "Z_LOSS": True,
                "CAP": True,
                "WEIGHTED": True,
                "SOFT": False,
                "ROWS": 1,
                "BLOCK_V": 4096,
            },
        ),
        (
            ce_triton._hvp_kernel,
            {
                "logits_ptr": logits,
                "row_stride": "i64",
                "target_ptr": "*i64",
                "weight_ptr": logits,
                "u_ptr": logits,
                "u_tangent_stride": "i64",
                "u_row_stride": "i64",
                "scale_ptr": accumulator,
                "scale_stride": "i64",
                "out_ptr": logits,
                "out_tangent_stride": "i64",
                "out_row_stride": "i64",
                "dot_ptr": accumulator,
                "K": "i32",
                "shift_period": "i64",
            },
            {
                "SHIFTED": True,
                "ACC": acc,
                "SMOOTHING": True,
                "Z_LOSS": True,
                "CAP": True,
                "WEIGHTED": True,
                "SOFT": False,
                "ROWS": 1,
                "BLOCK_V": 512,
                "TANGENTS": 8,  # K = 8 tangents: a [8, 1, 512] tile
            },
        ),
        (
            ce_triton._stats_kernel,
            {
                "logits_ptr": logits,
                "row_stride": "i64",
                "target_ptr": "*i64",
                "u_ptr": logits,
                "u_row_stride": "i64",
                "stats_ptr": accumulator,
            },
            {"ACC": acc, "WITH_U": True, "SMOOTHING": True, "ROWS": 1, "BLOCK_V": 4096},
        ),
        (
            ce_triton._shard_hvp_kernel,
            {
                "logits_ptr": logits,
                "row_stride": "i64",
                "target_ptr": "*i64",
                "u_ptr": logits,
                "u_row_stride": "i64",
                "lse_ptr": accumulator,
                "p_dot_u_ptr": accumulator,
                "scale_ptr": accumulator,
                "scale_stride": "i64",
                "out_ptr": logits,
                "out_row_stride": "i64",
            },
            {"ACC": acc, "ROWS": 4, "BLOCK_V": 1024},
        ),
    ]
    # The three kernels above take class weights with label smoothing; again with probability targets (of the
    # logits' dtype, not shifted), and plain (every flag off: code behind a constexpr branch compiles only when taken).
    with_labels = kernels[:3]
    for kernel, pointers, constants in with_labels:
        soft = {**constants, "SOFT": True, **({"SHIFTED": False} if "SHIFTED" in constants else {})}
        plain = {name: False if isinstance(value, bool) else value for name, value in constants.items()}
        kernels += [(kernel, {**pointers, "target_ptr": logits}, soft), (kernel, pointers, plain)]
    for kernel, pointers, constants in kernels:
        signature = {**pointers, **common, **{name: "constexpr" for name in constants}}
        source = ASTSource(kernel, signature={name: signature[name] for name in kernel.arg_names}, constexprs=constants)
        compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32))
        assert ".entry" in compiled.asm["ptx"]


# One compiler process per dtype: fp32 in every run, the others in the slow ones.
@pytest.mark.parametrize(
    "dtype", ["fp32", *(pytest.param(d, marks=pytest.mark.slow) for d in ("bf16", "fp16", "fp64"))]
)
def test_triton_kernels_compile_for_a_gpu_target(dtype):
    """The interpreter accepts code the Triton compiler rejects: without a GPU, compile for one."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # The child runs from tests/: put this checkout first, not whichever curvkern the environment installed.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    script = f"import test_cross_entropy as t; t.compile_for_sm90({dtype!r})"
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.slow  # needs results past the 64 MiB streaming threshold
def test_cpp_streaming_stores_write_the_same_bits():
    """fp32 results of 64 MiB and more written into a caller's ``out`` leave through streaming stores
    (csrc/ce/cross_entropy.cpp): the same values, bit for bit, as ordinary stores, misaligned rows included."""
    if "cpp" not in curvkern.available_backends(FAMILY.name):
        pytest.skip("the C++ extension is not built")
    logits, target, u = make_problem(340, 50257, dtype=torch.float32, ignore=[7], seed=5)  # 68 MiB per copy
    streamed = curvkern.ce_hvp(logits, target, u, reduction="sum", out=torch.empty_like(logits), fused="cpp")
    stored = torch.cat(
        [
            curvkern.ce_hvp(logits[i : i + 20], target[i : i + 20], u[i : i + 20], reduction="sum", fused="cpp")
            for i in range(0, 340, 20)
        ]
    )
    assert torch.equal(streamed, stored)
    assert torch.count_nonzero(streamed[7]) == 0 and streamed.abs().sum() > 0
