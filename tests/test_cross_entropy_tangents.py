"""ce_hvp with K tangents at once: ``u`` of shape (K, *logits.shape) equals K separate calls, on every backend,
for the plain loss and each variant the backend implements, with ignored rows, classes in dim 1 and K = 0 or 1.

Kind (a) of tests/tolerance.py in fp64 (the same formula, sums in another order: 1e-12 relative), kind (b) in
fp32 and bf16 against the fp64 result of the K separate calls.
"""

import pytest
import torch
from test_cross_entropy import CE_OPS
from test_cross_entropy_variants import implements, problem
from tolerance import assert_relative_error, truth_bound, unit_roundoff

import curvkern
from curvkern.families import get_family

FAMILY = get_family("cross_entropy")
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")
FP64 = dict(rtol=1e-12, atol=1e-15)
CASES = {
    "plain": ((), 0.0),
    "label-smoothing": ((), 0.2),
    "z-loss+softcap": (("z_loss", "softcap"), 0.1),
    "weight": (("weight",), 0.0),
    "probabilities": (("soft",), 0.0),
    "weight-label-smoothing-z-loss-softcap": (("weight", "z_loss", "softcap"), 0.2),
    "probabilities-weight-label-smoothing-softcap": (("soft", "weight", "softcap"), 0.1),
}


def tangents(u: torch.Tensor, k: int, seed: int = 1) -> torch.Tensor:
    """(k, *u.shape) tangents of u's dtype and device, u itself first."""
    gen = torch.Generator().manual_seed(seed)
    rest = torch.randn(k - 1, *u.shape, generator=gen, dtype=torch.float64).to(u)
    return torch.cat([u[None], rest])[:k]


def separate_calls(logits, target, u, **kwargs):
    return torch.stack([curvkern.ce_hvp(logits, target, u_k, **kwargs) for u_k in u])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_k_tangents_equal_k_separate_calls_fp64(backend, device, case, reduction):
    combination, label_smoothing = CASES[case]
    if not implements(backend, combination, label_smoothing):
        pytest.skip(f"{backend} does not implement {combination}")
    logits, target, u, kwargs = problem(device, combination)  # (4, 6, 3) logits, two ignored positions
    u = tangents(u, 3)
    kwargs.update(reduction=reduction, label_smoothing=label_smoothing, fused=backend)
    expected = separate_calls(logits, target, u, **kwargs)
    torch.testing.assert_close(curvkern.ce_hvp(logits, target, u, **kwargs), expected, **FP64)
    # Into a caller's buffer that no (K, N, V) view can write (classes not last): through a copy.
    out = torch.empty(u.shape[0], u.shape[2], u.shape[1], u.shape[3], dtype=u.dtype, device=device).transpose(1, 2)
    assert curvkern.ce_hvp(logits, target, u, out=out, **kwargs) is out
    torch.testing.assert_close(out, expected, **FP64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_tangents_low_precision_against_fp64_separate_calls(backend, device, dtype):
    """8 tangents of 300 classes (not a multiple of any tile), rows 3 and 9 ignored."""
    gen = torch.Generator().manual_seed(2)
    n, v = 16, 300
    logits64 = 3 * torch.randn(n, v, generator=gen, dtype=torch.float64)
    u64 = torch.randn(8, n, v, generator=gen, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=gen)
    target[[3, 9]] = -100
    logits, u, target = logits64.to(device, dtype), u64.to(device, dtype), target.to(device)
    truth = separate_calls(logits.double(), target, u.double(), fused="eager", label_smoothing=0.1)
    actual = curvkern.ce_hvp(logits, target, u, fused=backend, label_smoothing=0.1)
    assert actual.dtype == dtype and actual.shape == u.shape
    bound = truth_bound(dtype, ops=CE_OPS, reduction_length=v)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        bound += unit_roundoff(dtype)  # Triton's interpreter truncates fp32 -> bf16: a whole ulp, not half
    for k in range(u.shape[0]):
        assert_relative_error(actual[k], truth[k], bound, label=f"tangent {k}")


def test_zero_one_tangent_and_empty_batches(backend, device):
    logits, target, u, _ = problem(device, ())
    one = curvkern.ce_hvp(logits, target, u[None], fused=backend)
    torch.testing.assert_close(one, curvkern.ce_hvp(logits, target, u, fused=backend)[None], rtol=0, atol=0)
    none = curvkern.ce_hvp(logits, target, u.new_empty(0, *u.shape), fused=backend)
    assert none.shape == (0, *u.shape)
    empty = curvkern.ce_hvp(logits[:0], target[:0], tangents(u[:0], 2), fused=backend)
    assert empty.shape == (2, 0, *u.shape[1:])
    ignored = torch.full_like(target, -100)
    torch.testing.assert_close(
        curvkern.ce_hvp(logits, ignored, tangents(u, 2), reduction="sum", fused=backend),
        torch.zeros(2, *u.shape, dtype=u.dtype, device=device),
        rtol=0,
        atol=0,
    )


def test_bad_tangent_shapes_raise(backend, device):
    logits, target, u, _ = problem(device, ())
    u3 = tangents(u, 3)
    with pytest.raises(ValueError, match=r"u must have the logits' shape .* \(or \(K, \*logits.shape\)"):
        curvkern.ce_hvp(logits, target, u3[:, :, :5], fused=backend)
    with pytest.raises(ValueError, match="u must have"):
        curvkern.ce_hvp(logits, target, u3[None], fused=backend)
    with pytest.raises(ValueError, match="out must match u's shape"):
        curvkern.ce_hvp(logits, target, u3, out=torch.empty_like(u), fused=backend)
    with pytest.raises(ValueError, match="u must have"):
        curvkern.ce_hvp(logits, target, u3.float(), fused=backend)


def test_the_kernels_check_tangents_before_any_work(backend, device):
    """The kernels' own checks, below the public function's: a bad shape or layout is a ValueError (C++:
    RuntimeError from TORCH_CHECK), never a read or write out of bounds."""
    kernels = curvkern._dispatch._REGISTRY[("cross_entropy", backend)]
    logits, target, _, _ = problem(device, ())
    rows, flat, v = logits.movedim(1, -1).reshape(-1, 6).contiguous(), target.reshape(-1), 6
    hyperparameters = curvkern.hyperparameters.CrossEntropyLossHyperparameters()
    scale = torch.ones((), dtype=torch.float64, device=device)
    good = torch.randn(2, *rows.shape, dtype=rows.dtype, device=device)
    bad = {
        "u with one class too few": (good[..., :-1], torch.empty_like(good)),
        "out of another K": (good, torch.empty_like(good[:1])),
        "a strided class dimension": (torch.randn(2, rows.shape[0], 2 * v, dtype=rows.dtype)[..., ::2], good),
    }
    for u_rows, out in bad.values():
        with pytest.raises((ValueError, RuntimeError), match=r"\b(u|out)\b"):
            kernels.hvp(rows, flat, u_rows.to(device), scale, hyperparameters, 0, out)


def test_dtensor_logits_take_one_tangent_per_call(one_rank_mesh):
    from torch.distributed.tensor import Replicate, distribute_tensor

    logits, target, u, _ = problem("cpu", ())
    z = distribute_tensor(logits, one_rank_mesh, [Replicate()])
    with pytest.raises(NotImplementedError, match=r"K tangents .* of DTensor logits"):
        curvkern.ce_hvp(z, target, distribute_tensor(tangents(u, 2), one_rank_mesh, [Replicate()]))
