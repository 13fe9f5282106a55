"""The fused optimizer kernels against the eager reference: many random models, dtypes and layouts,
determinism, the ops' errors and their vector math (the ops' registration: opcheck in tests/test_ops.py).

Every backend other than eager that runs here is tested; the goldens and properties of the specs run
against each backend in test_hysterograd.py and test_biostatis.py.
"""

import math
import platform
import re

import mpmath
import pytest
import torch
from conftest import SMALL_SHAPES, max_examples
from disassembly import extension_bodies, extension_symbols, has_omp_body, omp_body
from hypothesis import given, settings, strategies as st
from tolerance import (
    BIOSTATIS_OPS,
    HYSTEROGRAD_OPS,
    TRANSCENDENTAL_OPS,
    assert_displacement_close,
    assert_fused_close,
    assert_hysterograd_results_close,
    assert_relative_error,
    math_dtype,
    truth_bound,
)

from curvkern import available_backends
from curvkern.families import OPTIMIZER, families_of_kind

OPTIMIZERS = {family.name: family.api for family in families_of_kind(OPTIMIZER)}
OPS = {"hysterograd": HYSTEROGRAD_OPS, "biostatis": BIOSTATIS_OPS}
CONFIGS = {
    "hysterograd": [
        dict(lr=0.05),
        dict(lr=0.01, grad_clip=2.5, metric_scale=300.0, beta=0.9),
        dict(lr=1.0, stiffening_factor=1.0, initial_temp=0.0, adaptive_threshold=False),
    ],
    "biostatis": [
        dict(lr=1e-2),
        dict(lr=3e-3, weight_decay=0.0, homeo_rate=0.5, energy_target=1e-4),
        dict(lr=1e-2, memory_decays=(0.9, 0.99, 0.999), memory_weights=(0.5, 0.3, 0.2), flip_threshold=2.0),
        dict(lr=1e-2, memory_decays=(), memory_weights=()),
    ],
}
FUSED = [
    (family, backend) for family in OPTIMIZERS for backend in available_backends(family, "cpu") if backend != "eager"
]
CPP = [(family, "cpp") for family in OPTIMIZERS if "cpp" in available_backends(family, "cpu")]
needs_cpp = pytest.mark.skipif(not CPP, reason="curvkern._C is not built")

# Sizes around the vector width, the 16-lane sums and the 16 Ki-element work units.
SIZES = [0, 1, 7, 16, 17, 100, 16383, 16385, 20000]


def reversed_strides(t):
    """``t`` as a non-contiguous tensor of the same shape (its dimensions stored in reverse order)."""
    order = list(reversed(range(t.dim())))
    return t.permute(order).contiguous().permute(order)


def run(
    family,
    backend,
    shapes,
    dtype,
    steps,
    config,
    seed,
    groups=1,
    layout=lambda t: t,
    grad_layout=lambda t: t,
    none_rate=0.15,
    step_results=None,
    starts=None,
):
    """Parameters after ``steps`` steps from a seeded start, with seeded gradients (some None); what each
    step returned is appended to ``step_results``, and copies of the starting parameters to ``starts``,
    when given."""
    gen = torch.Generator().manual_seed(seed)
    params = [layout(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
    if starts is not None:
        starts.extend(p.clone() for p in params)
    split = [{"params": params[i::groups]} for i in range(groups) if params[i::groups]]
    opt = OPTIMIZERS[family](split, fused=backend, **config)
    for _ in range(steps):
        for p in params:
            scale = 10.0 ** torch.randint(-3, 1, (), generator=gen).item()
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            p.grad = None if torch.rand((), generator=gen) < none_rate else grad_layout(g.to(dtype))
        result = opt.step()
        if step_results is not None:
            step_results.append(result)
    return params, opt


def assert_same_trajectory(family, got, expected, dtype, *, steps, reduction_length, starts=None):
    """Kind (a) of tests/tolerance.py: fp64 to 1e-12, fp32 to its bound, bf16/fp16 to the stored ulps;
    fp32 and fp64 also relative to how far each parameter moved from ``starts``, when given."""
    for index, (a, b) in enumerate(zip(got, expected)):
        assert_fused_close(a, b, dtype=dtype, ops=OPS[family], reduction_length=reduction_length, steps=steps)
        if starts is not None and dtype not in (torch.bfloat16, torch.float16):
            assert_displacement_close(
                a,
                b,
                starts[index],
                dtype=dtype,
                ops=OPS[family],
                reduction_length=reduction_length,
                steps=steps,
                label=f"displacement of parameter {index}",
            )


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("family,backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fused_matches_eager_over_random_models(family, backend, dtype):
    # The Triton interpreter is slow, and its kernels see the same code paths on small tensors; the
    # per-ISA runs need only the vector-width boundaries.
    small = backend == "triton" or SMALL_SHAPES
    sizes = [s for s in SIZES if s < 1000] if small else SIZES

    @settings(max_examples=max_examples(4 if small or dtype != torch.float64 else 8), deadline=None)
    @given(
        shapes=st.lists(st.sampled_from(sizes), min_size=1, max_size=4),
        groups=st.integers(1, 2),
        config=st.sampled_from(CONFIGS[family]),
        seed=st.integers(0, 2**16),
    )
    def check(shapes, groups, config, seed):
        steps = 10 if small else 50 if dtype == torch.float64 else 20
        got_results, expected_results, starts = [], [], []
        got, _ = run(
            family, backend, shapes, dtype, steps, config, seed, groups, step_results=got_results, starts=starts
        )
        expected, _ = run(family, "eager", shapes, dtype, steps, config, seed, groups, step_results=expected_results)
        if family == "hysterograd":
            for step, (a, b) in enumerate(zip(got_results, expected_results), start=1):
                if not assert_hysterograd_results_close(a, b, dtype=dtype, reduction_length=sum(shapes), steps=step):
                    return  # a gate on its knife edge: from here the trajectories may rightly part
        assert_same_trajectory(family, got, expected, dtype, steps=steps, reduction_length=sum(shapes), starts=starts)

    check()


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("family,backend", FUSED)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_parameters_and_gradients(family, backend, layout):
    shapes = [(6, 5, 4, 3), (2, 3, 4, 5)]
    make = {
        "transposed": lambda t: t.transpose(0, -1),
        "sliced": lambda t: torch.cat([t, t]).narrow(0, 1, t.shape[0]),
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    }[layout]
    kwargs = dict(layout=make, grad_layout=reversed_strides, none_rate=0)
    got, opt = run(family, backend, shapes, torch.float64, 5, CONFIGS[family][0], 0, **kwargs)
    expected, _ = run(family, "eager", shapes, torch.float64, 5, CONFIGS[family][0], 0, **kwargs)
    assert_same_trajectory(family, got, expected, torch.float64, steps=5, reduction_length=2 * 360)
    for p in got:
        for value in opt.state[p].values():
            for state in value if isinstance(value, list) else [value]:
                if state.dim():
                    assert state.shape == p.shape


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("family,backend", FUSED)
def test_group_mixing_dtypes(family, backend):
    """One group holding fp32, bf16 and fp64 tensors: group statistics still span all of them."""

    def run_mixed(fused):
        gen = torch.Generator().manual_seed(3)
        params = [
            torch.randn(n, generator=gen).to(dtype)
            for n, dtype in ((40, torch.float32), (33, torch.bfloat16), (20, torch.float64), (7, torch.float32))
        ]
        opt = OPTIMIZERS[family](params, fused=fused, **CONFIGS[family][0])
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return params

    for a, b in zip(run_mixed(backend), run_mixed("eager")):
        # The group statistics span every dtype and are summed in fp32: fp64 tensors get fp32's bound.
        dtype = torch.float32 if a.dtype == torch.float64 else a.dtype
        assert_fused_close(a, b, dtype=dtype, ops=OPS[family], reduction_length=100, steps=5)


@pytest.mark.fused_vs_eager
@needs_cpp
@pytest.mark.parametrize("family,backend", CPP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(family, backend, dtype):
    shapes = [40000, 1, 16385, 1000, 3]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            params, opt = run(family, backend, shapes, dtype, 5, CONFIGS[family][1], 7)
            results.append(
                [p.clone() for p in params]
                + [s for p in params for v in opt.state[p].values() for s in (v if isinstance(v, list) else [v])]
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)  # one kernel, the same data, only the thread count differs: bit for bit


@pytest.mark.slow
@needs_cpp
def test_large_tensors_span_many_work_units():
    """Tensors of 1.5 M elements span ~90 units each; the update walks the units from last to first."""
    shapes = [1_500_000, 10, 1_500_000]
    got, _ = run("biostatis", "cpp", shapes, torch.float64, 2, CONFIGS["biostatis"][0], 1, none_rate=0)
    expected, _ = run("biostatis", "eager", shapes, torch.float64, 2, CONFIGS["biostatis"][0], 1, none_rate=0)
    assert_same_trajectory("biostatis", got, expected, torch.float64, steps=2, reduction_length=sum(shapes))


@needs_cpp
def test_ops_reject_bad_inputs_with_clear_errors():
    ops = torch.ops.curvkern
    g = [torch.randn(4)]
    with pytest.raises(RuntimeError, match="G of a Float parameter must be Float, got Double"):
        ops.hysterograd_pass_a_(g, [torch.zeros(4, dtype=torch.float64)], torch.zeros(()), 0.9, 1e-7, 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        ops.hysterograd_pass_a_(g, [torch.zeros(5)], torch.zeros(()), 0.9, 1e-7, 1.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.biostatis_sums(
            [torch.randn(3), torch.randn(3, dtype=torch.float64)],
            [torch.zeros(3)] * 2,
            [torch.zeros(3)] * 2,
            0.9,
            0.999,
        )
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        ops.biostatis_sums([torch.ones(3, dtype=torch.int32)], [torch.zeros(3)], [torch.zeros(3)], 0.9, 0.999)
    sums = ops.biostatis_sums(g, [torch.zeros(4)], [torch.zeros(4)], 0.9, 0.999)
    with pytest.raises(RuntimeError, match="memory EMAs"):
        ops.biostatis_update_(
            g,
            g,
            [torch.zeros(4)],
            [torch.zeros(4)],
            [],
            [torch.tensor(0.0)],
            sums,
            sums.sum(0),
            torch.tensor(1e-3),
            0.9,
            0.999,
            1e-8,
            0.0,
            0.03,
            0.8,
            1e-3,
            0.1,
            [0.9],
            [1.0],
            0.2,
            0.05,
        )
    with pytest.raises(RuntimeError, match="lr must be a 1-element floating-point CPU tensor"):
        ops.hysterograd_scalars_(*[torch.zeros(())] * 4, torch.tensor([1e-3, 1e-3]), 0.01, 0.9, 0.99, True, None, 1.0)


def _abs_tanh_sums(tensors):
    """Σ|tanh g| of each tensor, from pass A (biostatis_sums with zero moments)."""
    zeros = [torch.zeros_like(t, dtype=math_dtype(t.dtype)) for t in tensors]
    return torch.ops.curvkern.biostatis_sums(tensors, zeros, zeros, 0.9, 0.999)[:, 2]


# Below this |g| pass A may take |tanh g|'s short polynomial (csrc/vec.h, kAbsTanhSmallBound).
ABS_TANH_SMALL_BOUND = {torch.float32: 0.5, torch.float64: 0.55}


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectorized_tanh_is_accurate(dtype):
    """csrc/vec.h's |tanh| in both forms pass A uses, read back through Σ|tanh g| and against mpmath:
    - the short polynomial, which a stage (or tail) whose gradients are all below its bound takes: x alone
      in a one-element tensor;
    - the full function, which every other stage takes: x alone for |x| ≥ the bound, and below it x beside
      an element of 1.0, to the precision of the pair's sum (rounded to x's dtype: |tanh x| + tanh 1 within
      the two values' errors plus the sum's rounding);
    - one long tensor mixing both."""
    mpmath.mp.dps = 40
    bound = ABS_TANH_SMALL_BOUND[dtype]
    x = torch.cat(
        [
            torch.linspace(-12, 12, 2001, dtype=torch.float64),
            torch.linspace(-0.55, 0.55, 1001, dtype=torch.float64),
            torch.logspace(-30, 1.5, 300, dtype=torch.float64),
            torch.tensor([0.0, 0.4999, 0.5, 0.5001, 0.5499, 0.55, 0.5501, 44.0, 90.0, 1e4]),
        ]
    ).to(dtype)
    exact = torch.tensor([abs(float(mpmath.tanh(mpmath.mpf(float(v))))) for v in x], dtype=torch.float64)
    ulp = torch.finfo(dtype).eps

    def worst_ulps(got, want):
        return ((got - want).abs() / (want.abs().clamp_min(torch.finfo(dtype).tiny) * ulp)).max().item()

    small = x.abs() < bound
    assert small.sum() > 500 and (~small).sum() > 500  # both forms are read alone
    limit = 2.5 if dtype == torch.float32 else 2.0
    assert worst_ulps(_abs_tanh_sums([v.reshape(1) for v in x]), exact) <= limit
    one = torch.ones(1, dtype=dtype)
    beside_one = _abs_tanh_sums([torch.cat([v.reshape(1), one]) for v in x[small]])
    assert worst_ulps(beside_one, exact[small] + math.tanh(1.0)) <= 2 * limit + 0.5
    total = _abs_tanh_sums([x])[0]
    assert total == pytest.approx(exact.sum().item(), rel=4 * ulp)
    special = _abs_tanh_sums([torch.tensor([v], dtype=dtype) for v in (float("nan"), float("inf"))])
    assert special[0].isnan() and special[1] == 1.0


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("position", [0, 100, 255, 256, 290])
@pytest.mark.parametrize("odd", [float("inf"), -float("inf"), float("nan"), 2.0, -3.0])
def test_a_stage_with_one_large_gradient_takes_the_full_tanh(dtype, position, odd):
    """One element outside the polynomial's bound (±inf, NaN, 2, −3) among small gradients, in a full stage
    of 256 elements or in the tail: its stage must take the full function (the polynomial gives NaN for an
    infinity and −6.0 for 2)."""
    g = torch.full((300,), 0.01, dtype=dtype)
    g[position] = odd
    got = _abs_tanh_sums([g])[0].item()
    small = 299 * math.tanh(float(torch.tensor(0.01, dtype=dtype)))
    if math.isnan(odd):
        assert math.isnan(got)
    else:
        want = small + abs(math.tanh(float(torch.tensor(odd, dtype=dtype))))
        bound = truth_bound(math_dtype(dtype), ops=TRANSCENDENTAL_OPS, reduction_length=g.numel())
        assert_relative_error(got, want, bound)


@needs_cpp
@pytest.mark.skipif(platform.machine() != "x86_64", reason="ISA versions exist on x86-64 only")
def test_kernels_are_vectorized_in_their_isa_clones():
    """The passes' OpenMP bodies exist as avx512 (x86-64-v4), avx2 (x86-64-v3: AVX2 + FMA) and baseline
    versions (csrc/cpu_dispatch.h), the avx512 versions compute on zmm registers, tanh and square roots
    included, and the avx2 versions on ymm."""
    symbols = extension_symbols()
    for kernel in ("hysterograd_pass_a_f32", "hysterograd_pass_b_f32", "biostatis_pass_a_f32", "biostatis_pass_b_f32"):
        for isa in ("avx512", "avx2", "default"):
            assert has_omp_body(symbols, kernel, isa), (kernel, isa)
    bodies = extension_bodies()

    def body(kernel, isa):
        return omp_body(bodies, kernel, isa)

    assert re.search(r"vsqrtps\s.*zmm", body("hysterograd_pass_a_f32", "avx512"))
    assert re.search(r"vdivps\s.*zmm", body("hysterograd_pass_a_f32", "avx512"))
    assert re.search(r"vsqrtps\s.*ymm", body("hysterograd_pass_a_f32", "avx2"))
    assert re.search(r"vdivps\s.*ymm", body("hysterograd_pass_a_f32", "avx2"))
    assert "zmm" not in body("hysterograd_pass_a_f32", "avx2") and "ymm" not in body(
        "hysterograd_pass_a_f32", "default"
    )
    # tanh's polynomial and exp are fused multiply-adds on full vectors.
    assert len(re.findall(r"vfmadd\S*\s.*zmm", body("biostatis_pass_a_f32", "avx512"))) >= 10
    assert len(re.findall(r"vfmadd\S*\s.*ymm", body("biostatis_pass_a_f32", "avx2"))) >= 10
    assert re.search(r"vsqrtps\s.*zmm", body("biostatis_pass_a_f32", "avx512"))
    assert re.search(r"vdivps\s.*zmm", body("biostatis_pass_b_f32", "avx512"))  # the update's m / (√v/√bc2 + ε)
    # bf16 parameters: converted in registers (bit arithmetic), the math still on vectors.
    for kernel in ("hysterograd_pass_b_bf16", "biostatis_pass_b_bf16"):
        assert re.search(r"(vsqrtps|vdivps)\s.*[yz]mm", body(kernel, "avx512")), kernel
