"""torch.compile and CUDA graphs: both optimizers' step() compiles without a graph break on every backend,
and steps as it does uncompiled; capturing step() with capturable=False raises, as torch.optim's do.

torch's recipe compiles a function that calls ``opt.step()``; Dynamo's counters record every graph break.
A compiled step runs the backend's kernels unchanged: the C++ ops as they are, and the Triton step as one
opaque op (``curvkern::*_triton_step_``), so those trajectories are the uncompiled ones bit for bit (kind
(d) of tests/tolerance.py). The eager reference is compiled itself: Dynamo decomposes its ``addcmul_``,
and inductor generates its own code, so it agrees by the policy's kind (a); without Dynamo's
decompositions, traced but not compiled by inductor, it is bit-identical too.

Without CUDA the Triton step runs through the interpreter (tests/conftest.py): the compiled graph calls the
opaque op, which runs the interpreted kernels; with CUDA every case also runs on the GPU. The real CUDA
graph test skips without a GPU.
"""

import pytest
import torch
import torch._dynamo
from conftest import backend_cases
from tolerance import BIOSTATIS_OPS, HYSTEROGRAD_OPS, assert_fused_close, assert_hysterograd_results_close, numel
from torch._dynamo.utils import counters

from curvkern.optim import BiostatisV6, HysteroGrad

OPTIMIZERS = {"hysterograd": HysteroGrad, "biostatis": BiostatisV6}
HYPERPARAMETERS = {"hysterograd": dict(lr=0.05, grad_clip=2.0), "biostatis": dict(lr=0.01, flip_threshold=3.0)}
OPS = {"hysterograd": HYSTEROGRAD_OPS, "biostatis": BIOSTATIS_OPS}
CASES = [(family, fused, device) for family in sorted(OPTIMIZERS) for fused, device in backend_cases(family)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 3
# (shape, dtype, has a gradient) per parameter: two groups, one mixing dtypes (a C++ call per dtype), and a
# parameter without a gradient; make_optimizer adds an empty group.
GROUPS = (
    (((4, 3), torch.float64, True), ((5,), torch.float64, True)),
    (((6,), torch.float32, True), ((2, 2), torch.bfloat16, True), ((3,), torch.float32, False)),
)


def cases(test):
    return pytest.mark.parametrize("family,fused,device", CASES, ids=["-".join(c) for c in CASES])(test)


def group_numel(layout) -> int:
    return numel(shape for shape, _, _ in layout)


def make_groups(device):
    gen = torch.Generator().manual_seed(0)
    return [
        [
            torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_(True)
            for shape, dtype, _ in layout
        ]
        for layout in GROUPS
    ]


def set_grads(groups, step):
    for params, layout in zip(groups, GROUPS):
        for i, (p, (_, _, has_grad)) in enumerate(zip(params, layout)):
            g = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * (0.37 + 0.1 * i) + step).reshape(p.shape)
            p.grad = g.to(p.device, p.dtype) if has_grad else None


def make_optimizer(family, groups, fused, **kw):
    param_groups = [{"params": params} for params in groups] + [{"params": []}]
    return OPTIMIZERS[family](param_groups, fused=fused, **HYPERPARAMETERS[family], **kw)


def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


def step_compiled_and_uncompiled(family, fused, device, backend, **kw):
    """Step one optimizer through torch's recipe (a compiled function that calls ``opt.step()``) and another
    uncompiled, on the same data (``kw``: hyperparameters beside the family's HYPERPARAMETERS). Returns each
    step's ``(compiled, uncompiled)`` results, the number of graphs compiled after each step, and every
    ``(compiled, uncompiled, elements of the group)`` of the parameter and state tensors at the end."""
    fresh_dynamo()
    groups, reference_groups = make_groups(device), make_groups(device)
    opt, reference = make_optimizer(family, groups, fused, **kw), make_optimizer(family, reference_groups, fused, **kw)

    @torch.compile(backend=backend)
    def compiled_step():
        return opt.step()

    results, graphs = [], []
    for step in range(STEPS):
        set_grads(groups, step)
        set_grads(reference_groups, step)
        results.append((compiled_step(), reference.step()))
        graphs.append(counters["stats"]["unique_graphs"])
    pairs = []
    for params, expected_params, layout in zip(groups, reference_groups, GROUPS):
        for p, q in zip(params, expected_params):
            pairs.append((p, q, group_numel(layout)))
            for key, value in opt.state[p].items():
                expected = reference.state[q][key]
                pairs += [
                    (a, b, group_numel(layout))
                    for a, b in (zip(value, expected) if isinstance(value, list) else [(value, expected)])
                ]
    return results, graphs, pairs


def as_uncompiled(family, result, device):
    """A compiled step's result in the uncompiled form: HysteroGrad's 0-dim device tensors as its tuple."""
    if family == "biostatis":
        return result
    liquid, g_norm, h_width = result
    assert liquid.dtype == torch.bool and g_norm.dtype == h_width.dtype == torch.float64
    assert liquid.device == g_norm.device == h_width.device == torch.device(device)
    return "Liquid" if liquid else "Frozen", g_norm.item(), h_width.item()


def assert_bit_identical(family, device, results, pairs):
    for compiled, uncompiled in results:
        assert as_uncompiled(family, compiled, device) == uncompiled
    for a, b, _ in pairs:
        assert torch.equal(a, b)


@cases
def test_compiled_step_has_no_graph_break_and_steps_as_uncompiled(family, fused, device):
    # aot_eager: Dynamo, then AOT autograd, which also runs the custom ops' fake implementations.
    results, graphs, pairs = step_compiled_and_uncompiled(family, fused, device, "aot_eager")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[-1] == graphs[-2], "a steady-state step compiled again"  # the first step creates the state
    if fused != "eager":
        assert_bit_identical(family, device, results, pairs)
        return
    # The eager reference as torch compiles it: Dynamo decomposes addcmul_ (see the test below).
    for step, (compiled, uncompiled) in enumerate(results, 1):
        got = as_uncompiled(family, compiled, device)
        if family == "hysterograd":
            assert_hysterograd_results_close(
                got, uncompiled, dtype=torch.float32, steps=step, reduction_length=max(map(group_numel, GROUPS))
            )
        else:
            assert got is uncompiled is None
    for a, b, n in pairs:
        assert_fused_close(a, b, dtype=a.dtype, ops=OPS[family], reduction_length=n, steps=STEPS)


TRITON_BIOSTATIS_CASES = [(fused, device) for fused, device in backend_cases("biostatis") if fused == "triton"]


@pytest.mark.parametrize("fused,device", TRITON_BIOSTATIS_CASES, ids=["-".join(c) for c in TRITON_BIOSTATIS_CASES])
def test_compiled_triton_step_without_memories(fused, device):
    """memory_decays=(): the opaque op gets a flat list of no memory EMAs and splits it per parameter."""
    results, _, pairs = step_compiled_and_uncompiled(
        "biostatis", fused, device, "aot_eager", memory_decays=(), memory_weights=()
    )
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_bit_identical("biostatis", device, results, pairs)


@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
@torch._dynamo.config.patch(enable_dynamo_decompositions=False)
def test_compiled_eager_reference_is_bit_identical_without_dynamos_decompositions(family):
    """What separates the compiled eager reference from the uncompiled one is torch's rewriting alone: Dynamo
    decomposes ``addcmul_`` into a multiply and an FMA associated otherwise (torch's config says it "can
    affect numerics"); without that, the traced step is the uncompiled one bit for bit."""
    results, _, pairs = step_compiled_and_uncompiled(family, "eager", "cpu", "aot_eager")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_bit_identical(family, "cpu", results, pairs)


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
def test_compiled_step_with_fullgraph(family, capturable):
    """fullgraph=True raises at the first graph break; the C++ backend where it is built, else the eager one."""
    fresh_dynamo()
    fused = "cpp" if ("cpp", "cpu") in backend_cases(family) else "eager"
    groups = make_groups("cpu")
    opt = make_optimizer(family, groups, fused, capturable=capturable)
    compiled_step = torch.compile(opt.step, backend="eager", fullgraph=True)
    for step in range(2):
        set_grads(groups, step)
        compiled_step()
    assert not counters["graph_break"]


@pytest.mark.parametrize("family,key", [("hysterograd", "G"), ("biostatis", "exp_avg")])
def test_compiled_step_still_checks_the_state(family, key):
    """The checks run when the step is traced; the compiled step's guards retrace it when a tensor changes."""
    fresh_dynamo()
    groups = make_groups("cpu")
    opt = make_optimizer(family, groups, "eager")
    compiled_step = torch.compile(opt.step, backend="eager")
    for step in range(2):
        set_grads(groups, step)
        compiled_step()
    param = groups[0][1]
    opt.state[param][key] = torch.zeros(param.numel() + 1, dtype=param.dtype)
    before = [p.detach().clone() for group in groups for p in group]
    with pytest.raises(
        RuntimeError,
        match=rf"state '{key}' of parameter 1 in param group 0 has shape \(6,\), "
        r"expected \(5,\)",
    ):
        compiled_step()
    assert all(map(torch.equal, [p for group in groups for p in group], before))


@pytest.mark.slow  # torch's default backend: inductor generates and compiles C++ (5-25 s a case, cold)
@cases
def test_inductor_compiled_step_steps_as_uncompiled(family, fused, device):
    results, _, pairs = step_compiled_and_uncompiled(family, fused, device, "inductor")
    assert not counters["graph_break"], dict(counters["graph_break"])
    if fused != "eager":
        assert_bit_identical(family, device, results, pairs)
        return
    for a, b, n in pairs:
        # Inductor generates its own tanh and exp (an ulp off torch's for some inputs), and BiostatisV6's scalar
        # stage rounds tanh(C − c*) to fp32, as the original does: fp64 tensors then agree to fp32's bound.
        dtype = torch.float32 if family == "biostatis" and a.dtype == torch.float64 else a.dtype
        assert_fused_close(a, b, dtype=dtype, ops=OPS[family], reduction_length=n, steps=STEPS)


# ---------------------------------------------------------------------------- CUDA graph capture


@pytest.fixture
def capturing(monkeypatch):
    """Make step() see a CUDA stream that is capturing, without a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
def test_capture_of_a_step_with_capturable_false_raises_before_anything_moves(family, capturing):
    groups = make_groups("cpu")
    set_grads(groups, 0)
    params = [p for group in groups for p in group]
    before = [p.detach().clone() for p in params]
    opt = make_optimizer(family, groups, "eager")
    name = type(opt).__name__
    with pytest.raises(
        RuntimeError,
        match=rf"Attempting CUDA graph capture of step\(\) for an instance of {name} "
        r"but its capturable is False",
    ):
        opt.step()
    assert all(map(torch.equal, params, before))
    assert not opt.state


@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
def test_capture_of_a_capturable_step_is_not_refused(family, capturing):
    groups = make_groups("cpu")
    set_grads(groups, 0)
    make_optimizer(family, groups, "eager", capturable=True).step()


@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
def test_no_capture_check_outside_a_capture(family, monkeypatch):
    """Without CUDA the check asks torch.cuda.is_available() and nothing else."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: pytest.fail("asked without CUDA"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    groups = make_groups("cpu")
    set_grads(groups, 0)
    make_optimizer(family, groups, "eager").step()


@needs_cuda
@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
def test_cuda_graph_capture_with_capturable_false_raises(family):
    params = [torch.randn(8, device="cuda", requires_grad=True)]
    params[0].grad = torch.randn_like(params[0])
    opt = OPTIMIZERS[family](params, fused="auto")
    opt.step()  # warm-up outside the capture, as torch's recipe does
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Attempting CUDA graph capture of step"), torch.cuda.graph(graph):
        opt.step()
