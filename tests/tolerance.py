"""The test suite's one tolerance policy: how closely two floating-point results must agree.

Why a policy: torch picks its CPU kernels per ISA (AVX-512, AVX2, NEON, scalar), so its reduction
order and its vectorized sqrt/exp/tanh differ between machines by an ulp or a few; our kernels
sum in their own order. An fp32 expectation tied to one machine's kernels (bit-equality between a
fused kernel and eager, or a tolerance tuned until it passed here) fails on another. Every bound
below is derived from the operation instead: the dtype's unit roundoff u = eps/2, the number of
rounded operations per element, the length of the reductions, and the number of optimizer steps.

Error model (first order, valid while the bound is ≪ 1):

- a correctly rounded operation (+ − × ÷ √, a type conversion) adds u relative error;
- a vectorized transcendental (exp, log, tanh in torch's SLEEF/MKL paths or ours) is good to
  2 ulps: count it as ``TRANSCENDENTAL_OPS`` = 4 operations;
- a sum of n terms in an unknown order (torch's order depends on the ISA) is within (n−1)·u·κ of
  the exact sum, κ = Σ|xᵢ| / |Σxᵢ| its condition (1 for sums of squares): the bound of recursive
  summation, which holds for every order. Past 64 terms we count min(n−1, λ√n) with λ = 8, the
  probabilistic bound of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019, Thm. 3.1): rounding
  errors of independent sign, exceeded with probability below 2n·exp(−λ²/2) ≈ 3e-14·n, for every
  order too, and still far below a bug's error;
- a quantity that is the result of ``steps`` steps carries each step's error, once each.

Kinds of comparison, per dtype (u32 = 2⁻²⁴, u64 = 2⁻⁵³; ``ops`` per element and step, n the
reduction length and r(n) = min(n−1, 8√n), s the steps):

===  ==========================================  ===============================================
     comparison                                  bound (normwise ‖a−b‖/‖b‖ unless stated)
===  ==========================================  ===============================================
a    fused backend vs the eager reference        fp32: 2·s·(ops + r(n)·κ)·u32 — both sides round
                                                 independently; fp64: the same, capped at 1e-12
c    ours vs a re-implementation of the          as (a): two implementations of one formula
     original algorithm
b    against an fp64 ground truth computed on    (ops + r(n)·κ)·u + u_out: one side rounds, plus
     the same (rounded) inputs                   the final store into the output dtype
lp   bf16/fp16 parameters (fp32 math, rounded    elementwise ≤ s ulps of the stored dtype (each
     to nearest even each step) vs the same      step's fp32 results, equal to rounding, may round
     trajectory computed another way             to either neighbour of a tie-point) plus the fp32
                                                 bound of (a); at most one element or a quarter
                                                 of them differ at all (a systematic rounding bug,
                                                 e.g. truncation, moves about half of them)
d    bit-exact                                   ONLY where both sides run the same code on the
                                                 same data: a backend against itself (float vs
                                                 tensor lr, save/load, strided vs contiguous
                                                 copies), determinism across thread counts, ISA
                                                 paths whose kernels round identically by
                                                 construction
===  ==========================================  ===============================================

Gates: HysteroGrad's gate compares N̂ with a barrier h; results within the bound of (a) can lie on
either side of it when N̂ ≈ h. A test compares the gate's decision only when it is decided by more
than the bound (:func:`gate_is_decided`); otherwise the trajectories may rightly part, and the test
compares the gate's inputs only.

What the bounds still catch: fp64 stays at 1e-12 (observed fused-vs-eager differences are ~1e-17),
so any wrong constant or missed term in logic the dtypes share fails there. The fp32 bounds are
worst-case: a few 1e-6 for short runs, up to ~3e-3 for 20 steps over 16 Ki-element groups, while
observed differences are ~1e-8. Relative to the parameters' norm such a bound hides most update errors
(parameters move ~1 % in 20 steps), so trajectories are also compared relative to how far each
parameter moved (:func:`assert_displacement_close`): measured there, a BiostatisV6 lr 1 % off gives
1.0e-2, a weight decay 10 % off 2.5–3.9e-3 and a homeostatic rate 10 % off 8e-3, against a bound of
2.6e-3 and fused-vs-eager differences of 8e-8 (fp32, 20 steps, 16.5 Ki elements).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

TRANSCENDENTAL_OPS = 4
PROBABILISTIC_LAMBDA = 8.0
FP64_FUSED_CAP = 1e-12
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Rounded operations per element and step of each optimizer, counted from the eager reference
# (curvkern/optim/*/eager.py); the reduction lengths are the tensors' sizes in the group.
# HysteroGrad: pass A 3 (G·β, c·g², +), u 3 (√, +ε, ÷), u² 1; scalars ~6 (√, clip ratio,
# τ, E, barrier); pass B 2 (×, +).
HYSTEROGRAD_OPS = 15
# BiostatisV6: the four sums (g², |tanh g|, m·g, |m|, √v: ~8 with one tanh), m, v and two EMAs
# (2 each), flow 2, adaptive (tanh, sign) 4 + 4, the scalar stage's two tanh and ~10 operations,
# the update (√v, ÷√bc2, +ε, ÷, four terms) ~10, weight decay 1, bias correction (pow, exp) 8.
BIOSTATIS_OPS = 40 + 4 * TRANSCENDENTAL_OPS


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: bf16/fp16 parameters are computed in fp32."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def rounding_error(dtype: torch.dtype, *, ops: int, reduction_length: int = 1, condition: float = 1.0) -> float:
    """Relative error bound of one evaluation: ``ops`` rounded operations and a sum of
    ``reduction_length`` terms of condition ``condition``, in ``dtype``'s math dtype."""
    if ops < 0 or reduction_length < 0 or condition < 1.0:
        raise ValueError(f"ops={ops}, reduction_length={reduction_length} must be >= 0, condition={condition} >= 1")
    return (ops + reduction_terms(reduction_length) * condition) * unit_roundoff(math_dtype(dtype))


def reduction_terms(n: int) -> float:
    """Roundings a sum of n terms in an unknown order counts: min(n−1, λ√n) (see above)."""
    return min(max(n - 1, 0), PROBABILISTIC_LAMBDA * math.sqrt(n))


def fused_bound(
    dtype: torch.dtype, *, ops: int, reduction_length: int = 1, steps: int = 1, condition: float = 1.0
) -> float:
    """Kinds (a) and (c): two implementations of one formula, ``steps`` steps."""
    bound = 2 * max(steps, 1) * rounding_error(dtype, ops=ops, reduction_length=reduction_length, condition=condition)
    return min(bound, FP64_FUSED_CAP) if dtype == torch.float64 else bound


def truth_bound(dtype: torch.dtype, *, ops: int, reduction_length: int = 1, condition: float = 1.0) -> float:
    """Kind (b): a ``dtype`` result against fp64 on the same inputs, the final store included."""
    return rounding_error(dtype, ops=ops, reduction_length=reduction_length, condition=condition) + unit_roundoff(dtype)


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def relative_error(actual, expected) -> float:
    """‖a−b‖₂/‖b‖₂ over the finite entries (0 when both are zero; inf when only b is)."""
    a, b = _as_float64(actual), _as_float64(expected).reshape(_as_float64(actual).shape)
    finite = torch.isfinite(b)
    difference, scale = (a[finite] - b[finite]).norm().item(), b[finite].norm().item()
    if scale == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / scale


def _check_non_finite(a: torch.Tensor, b: torch.Tensor, label: str) -> None:
    """NaN and ±inf sit at the same places (they are decisions, not roundings)."""
    assert torch.equal(a.isnan(), b.isnan()), f"{label}NaN at different places: {a} vs {b}"
    infinite = b.isinf()
    assert torch.equal(a[infinite], b[infinite]) and not a[~infinite & ~b.isnan()].isinf().any(), (
        f"{label}infinities differ: {a} vs {b}"
    )


def assert_relative_error(actual, truth, bound: float, *, label: str = "") -> None:
    """‖actual − truth‖/‖truth‖ ≤ bound (normwise, finite entries; non-finite ones must match)."""
    a = _as_float64(actual)
    b = _as_float64(truth).reshape(a.shape)
    prefix = f"{label}: " if label else ""
    _check_non_finite(a, b, prefix)
    error = relative_error(a, b)
    assert error <= bound, f"{prefix}relative error {error:.3g} > bound {bound:.3g}"


def assert_fused_close(
    actual,
    expected,
    *,
    dtype: torch.dtype,
    ops: int,
    reduction_length: int = 1,
    steps: int = 1,
    condition: float = 1.0,
    label: str = "",
) -> None:
    """Kinds (a) and (c) for tensors or Python floats; bf16/fp16 dispatch to :func:`assert_rounded_close`."""
    if dtype in LOW_PRECISION:
        assert_rounded_close(
            actual, expected, storage_dtype=dtype, ops=ops, reduction_length=reduction_length, steps=steps, label=label
        )
        return
    bound = fused_bound(dtype, ops=ops, reduction_length=reduction_length, steps=steps, condition=condition)
    assert_relative_error(actual, expected, bound, label=label)


def assert_rounded_close(
    actual,
    expected,
    *,
    storage_dtype: torch.dtype,
    ops: int,
    reduction_length: int = 1,
    steps: int = 1,
    label: str = "",
) -> None:
    """Kind (lp): values stored in bf16/fp16 after ``steps`` steps of fp32 math rounded each step."""
    a = _as_float64(actual)
    b = _as_float64(expected).reshape(a.shape)
    prefix = f"{label}: " if label else ""
    _check_non_finite(a, b, prefix)
    finite = torch.isfinite(b)
    a, b = a[finite], b[finite]
    ulp = torch.finfo(storage_dtype).eps * b.abs().clamp_min(torch.finfo(storage_dtype).tiny)
    math_error = fused_bound(torch.float32, ops=ops, reduction_length=reduction_length, steps=steps)
    allowed = steps * ulp + math_error * b.abs()
    worst = ((a - b).abs() - allowed).max().item() if a.numel() else 0.0
    assert worst <= 0.0, f"{prefix}apart by more than {steps} {storage_dtype} ulps: {(a - b).abs().max().item():.3g}"
    differing = (a != b).sum().item()
    assert differing <= max(1, a.numel() / 4), (
        f"{prefix}{differing} of {a.numel()} elements differ: a systematic rounding difference"
    )


def gate_is_decided(g_norm: float, barrier: float, bound: float) -> bool:
    """Whether N̂ > h is decided by more than ``bound`` (relative): results within the bound agree on it."""
    if math.isnan(g_norm) or math.isnan(barrier):
        return True  # NaN compares false everywhere: every implementation decides "frozen"
    return abs(g_norm - barrier) > bound * max(abs(g_norm), abs(barrier))


def assert_hysterograd_results_close(
    got: Sequence, expected: Sequence, *, dtype: torch.dtype, reduction_length: int, steps: int = 1
) -> bool:
    """One step's (status, N̂, h) by the policy; the status only where the gate is decided.

    Returns whether the gate was decided (a caller comparing a trajectory stops where it was not).
    """
    status, g_norm, barrier = got
    expected_status, expected_norm, expected_barrier = expected
    bound = fused_bound(math_dtype(dtype), ops=HYSTEROGRAD_OPS, reduction_length=reduction_length, steps=steps)
    # The group scalars are kept in fp32 whatever the parameters' dtype (docs/hysterograd.md, "fp32 scalars"),
    # and N̂, h are means over groups: for fp64 parameters their accuracy is fp32's.
    scalar_bound = max(
        bound, fused_bound(torch.float32, ops=HYSTEROGRAD_OPS, reduction_length=reduction_length, steps=steps)
    )
    assert_relative_error(g_norm, expected_norm, scalar_bound, label="N̂")
    assert_relative_error(barrier, expected_barrier, scalar_bound, label="h")
    decided = gate_is_decided(expected_norm, expected_barrier, scalar_bound)
    if decided:
        assert status == expected_status, (got, expected)
    return decided


def numel(shapes: Iterable) -> int:
    """Total elements of ``shapes`` (tuples or ints): a group's reduction length."""
    return sum(math.prod(s) if isinstance(s, (tuple, list, torch.Size)) else int(s) for s in shapes)


def assert_displacement_close(
    actual,
    expected,
    start,
    *,
    dtype: torch.dtype,
    ops: int,
    reduction_length: int = 1,
    steps: int = 1,
    path: float | None = None,
    label: str = "",
) -> None:
    """Kind (a) measured against how far the parameters moved, ‖(a−p₀) − (b−p₀)‖ / ‖b−p₀‖, for fp32 and fp64.

    Parameters move little in a few steps, so their own norm hides an error of the update: a 10 % wrong
    weight decay is far below (a)'s bound relative to ‖p‖. Relative to the displacement, each step's
    update carries (a)'s bound, and storing p + Δ rounds to p's ulp: u·‖b‖/‖b−p₀‖ more per step.

    ``path``, when given, is Σ_k ‖b_k − b_{k−1}‖ over the reference's steps. Steps that cancel one another
    leave a displacement far shorter than the path, and each step's error scales with its own length: the
    bound grows by path/‖b−p₀‖ (hypothesis found fp64 steps of alternating sign with 1.2e-13 against
    1.1e-13), and the stores round at up to ‖p₀‖ + path.
    """
    a, b, p0 = _as_float64(actual), _as_float64(expected), _as_float64(start)
    moved = b - p0
    distance = moved.norm().item()
    if distance == 0.0:
        assert_relative_error(a, b, 0.0, label=label)
        return
    condition, largest = 1.0, b.norm().item()
    if path is not None:
        condition, largest = max(1.0, path / distance), max(largest, p0.norm().item() + path)
    store = 2 * max(steps, 1) * unit_roundoff(dtype) * largest / distance
    bound = fused_bound(dtype, ops=ops, reduction_length=reduction_length, steps=steps) * condition + store
    assert_relative_error(a - p0, moved, bound, label=label or "displacement")
