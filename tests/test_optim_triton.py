"""What only the Triton optimizer kernels have: the chunk table, launches per step, determinism, RNE stores,
runtime hyperparameters, CUDA graphs and > 2³¹-element tensors.

Every optimizer test of test_hysterograd.py and test_biostatis.py also runs against "triton". Without
CUDA these run on CPU tensors through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the GPU-only tests skip.
"""

import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from tolerance import BIOSTATIS_OPS, HYSTEROGRAD_OPS, assert_fused_close, numel

from curvkern.families import OPTIMIZER, Family, families_of_kind
from curvkern.optim import HysteroGrad

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from curvkern.optim import _triton_multi_tensor as multi_tensor  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {"hysterograd": dict(lr=0.05, grad_clip=2.0), "biostatis": dict(lr=0.01, flip_threshold=3.0)}


def constructor(family: Family):
    def make(params, fused, **kw):
        return family.api(params, fused=fused, **CONFIGS[family.name], **kw)

    return make


OPTIMIZERS = {family.name: constructor(family) for family in families_of_kind(OPTIMIZER)}


OPS = {"hysterograd": HYSTEROGRAD_OPS, "biostatis": BIOSTATIS_OPS}


@pytest.fixture(params=sorted(OPTIMIZERS))
def family(request):
    return request.param


def backend_module(family):
    return importlib.import_module(f"curvkern.optim.{family}.triton")


def make_params(shapes, dtype=torch.float64, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_(True) for s in shapes]


def set_grads(params, step):
    for i, p in enumerate(params):
        g = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * (0.37 + 0.1 * i) + step).reshape(p.shape)
        p.grad = g.to(p.device, p.dtype)


def trajectory(family, params, fused, steps=3, **kw):
    opt = OPTIMIZERS[family](params, fused, **kw)
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return opt


def test_launches_per_step_do_not_grow_with_the_number_of_tensors(family):
    launches = []
    for num_tensors in (1, 6, 30):
        params = make_params([(2 + i % 5,) for i in range(num_tensors)], torch.float32)
        opt = trajectory(family, params, "triton", steps=1)
        set_grads(params, 1)
        before = multi_tensor.launch_count
        opt.step()
        launches.append(multi_tensor.launch_count - before)
    # Pass A, per-tensor sums, pass B (+ HysteroGrad's accumulator kernel); the scalar stages are torch ops.
    assert launches == [4, 4, 4] if family == "hysterograd" else launches == [3, 3, 3]


def test_chunks_cross_tensor_boundaries_and_match_eager(family, monkeypatch):
    # 64-element chunks: the 200-element tensor spans four, the small ones one each, the empty one none.
    monkeypatch.setattr(backend_module(family), "CHUNK_SIZE", 64)
    shapes = [(200,), (3,), (0,), (8, 8), (1,)]
    mine, reference = make_params(shapes), make_params(shapes, device="cpu")
    trajectory(family, mine, "triton")
    trajectory(family, reference, "eager")
    for p, q in zip(mine, reference):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-12, atol=1e-15)


def test_two_runs_are_bitwise_identical(family):
    shapes = [(1500,), (7, 9), (2,)]
    runs = [make_params(shapes, torch.float32) for _ in range(2)]
    for params in runs:
        trajectory(family, params, "triton")
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # the same kernels on the same data: bit for bit


def test_sliced_and_transposed_parameters(family):
    """A transposed matrix is streamed in its own memory order; a strided slice goes through a copy."""
    base = make_params([(6, 10)])[0].detach()
    reference = make_params([(6, 10)], device="cpu")[0].detach()
    mine = [base[:, ::2].requires_grad_(True), base[:, 1::2].t().requires_grad_(True)]
    expected = [reference[:, ::2].clone().requires_grad_(True), reference[:, 1::2].t().clone().requires_grad_(True)]
    trajectory(family, mine, "triton")
    trajectory(family, expected, "eager")
    for p, q in zip(mine, expected):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(base[:, ::2].cpu(), expected[0].detach(), rtol=1e-12, atol=1e-15)


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_match_eager(family, dtype):
    """Kind (lp) of tests/tolerance.py: the fp32 math agrees to rounding, so the stored values agree but
    where a result lies within that rounding of a tie between two bf16/fp16 neighbours."""
    shapes = [(5,), (3, 4), (40,)]
    mine = make_params(shapes, dtype)
    reference = [p.detach().cpu().clone().requires_grad_(True) for p in mine]
    trajectory(family, mine, "triton", steps=4)
    trajectory(family, reference, "eager", steps=4)
    for p, q in zip(mine, reference):
        assert_fused_close(
            p.detach(), q.detach(), dtype=dtype, ops=OPS[family], reduction_length=numel(shapes), steps=4
        )


def test_bf16_store_rounds_to_nearest_even():
    @triton.jit
    def store_kernel(source, target, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        multi_tensor.store_rounded(target + offsets, tl.load(source + offsets, mask=mask), mask, tl.bfloat16)

    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001], dtype=torch.int64)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 0.0, 3.4028235e38, 1e-40, -1e-45])
    values = torch.cat(
        [
            ties.to(torch.int32).view(torch.float32),
            specials,
            torch.randn(200, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.arange(-20, 20, 0.2),
        ]
    ).to(DEVICE)
    stored = torch.empty(len(values), dtype=torch.bfloat16, device=DEVICE)
    store_kernel[(1,)](values, stored, len(values), BLOCK=triton.next_power_of_2(len(values)))
    expected = values.to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(stored.isnan(), nan)  # NaN stays NaN (torch's own NaN bits differ between its CPU paths)
    # One correctly rounded conversion on both sides (RNE by construction): bit for bit.
    assert torch.equal(stored[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_chunk_offsets_are_64_bit():
    """The index arithmetic a > 2³¹-element tensor needs, without allocating one (see the CUDA test)."""
    huge = 3 * 2**31 + 7
    owner, start, chunk_begin = multi_tensor.chunk_layout([5, huge, 0, 2], multi_tensor.CHUNK_SIZE)
    assert start.dtype == torch.int64
    big = owner == 1
    assert int(big.sum()) == -(-huge // multi_tensor.CHUNK_SIZE)
    assert int(start[big][-1]) == (huge - 1) // multi_tensor.CHUNK_SIZE * multi_tensor.CHUNK_SIZE > 2**32
    assert chunk_begin == [0, 1, 1 + int(big.sum()), 1 + int(big.sum()), 2 + int(big.sum())]


HYPERPARAMETER_NAMES = {
    "beta",
    "metric_coef",
    "epsilon",
    "beta1",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "eps",
}


def kernels():
    for module in (*map(backend_module, OPTIMIZERS), multi_tensor):
        for name, value in vars(module).items():
            if name.endswith("_kernel"):
                yield value


def test_hyperparameters_are_runtime_float64_arguments():
    """Never constexpr (a scheduler's new lr would recompile), and float64 (exact for fp64 parameters)."""
    found = set()
    for kernel in kernels():
        for name, parameter in inspect.signature(kernel.fn).parameters.items():
            if name in HYPERPARAMETER_NAMES:
                found.add(name)
                assert parameter.annotation in (tl.float64, "tl.float64"), (kernel.fn.__name__, name)
    assert found == HYPERPARAMETER_NAMES


@pytest.fixture(scope="module")
def ptx_counts():
    """PTX instruction counts of the kernels compiled for sm_90 (no GPU needed), from tests/triton_ptx.py."""
    script = pathlib.Path(__file__).with_name("triton_ptx.py")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_kernels_compile_for_sm90_with_exact_rounding_and_vector_loads(ptx_counts):
    for kernel, counts in ptx_counts.items():
        approximations = [op for op in counts if op.startswith(("div.full", "div.approx", "sqrt.approx"))]
        assert not approximations, (kernel, approximations)
    for kernel in ("hysterograd_pass_a", "hysterograd_pass_b", "biostatis_sums", "biostatis_update"):
        assert ptx_counts[kernel].get("ld.global.v4.b32", 0) > 0, kernel
    assert ptx_counts["biostatis_update_fp64"].get("ld.global.v2.b64", 0) > 0


def test_no_multiply_add_is_contracted(ptx_counts):
    # HysteroGrad's p + u·(−η·k) is a multiply then an add, as eager's two ops.
    assert ptx_counts["hysterograd_pass_b"].get("fma.rn.f32", 0) == 0
    assert ptx_counts["hysterograd_pass_b"]["mul.rn.f32"] > 0
    # BiostatisV6's pass B has 6 explicit FMAs per element (m, v, 2 EMAs, 2 flow terms); contraction
    # would fuse more of its multiplies and adds.
    explicit, fused = ptx_counts["biostatis_update"]["fma.rn.f32"], ptx_counts["biostatis_update_fused"]["fma.rn.f32"]
    assert explicit < fused and explicit % 6 == 0


# ---------------------------------------------------------------- GPU only


def compiled_kernels() -> int:
    return sum(len(cache[0]) for kernel in kernels() for cache in kernel.device_caches.values())


@needs_cuda
def test_scheduler_changing_lr_does_not_recompile(family):
    params = make_params([(100,), (3, 5)], torch.float32)
    opt = trajectory(family, params, "triton", steps=2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    compiled = compiled_kernels()
    for step in range(3):
        set_grads(params, step)
        opt.step()
        scheduler.step()
    assert compiled_kernels() == compiled


@needs_cuda
def test_profiler_launches_per_step_stay_constant(family):
    from torch.profiler import ProfilerActivity, profile

    launches = []
    for num_tensors in (2, 50):
        params = make_params([(1000 + i,) for i in range(num_tensors)], torch.float32)
        opt = trajectory(family, params, "triton", steps=2)
        set_grads(params, 3)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        launches.append(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
    assert launches[0] == launches[1]


@needs_cuda
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_cuda_graph_capture_and_replay_match_eager(family, tensor_lr):
    shapes = [(300,), (7, 9)]
    params = make_params(shapes, torch.float32)
    reference = [p.detach().clone().requires_grad_(True) for p in params]
    opt = OPTIMIZERS[family](params, "triton", capturable=True)
    eager = OPTIMIZERS[family](reference, "eager")
    if tensor_lr:  # a scheduler's in-place update reaches the captured graph
        opt.param_groups[0]["lr"] = torch.tensor(eager.param_groups[0]["lr"], dtype=torch.float64, device="cuda")
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, eager)]
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g

    def load_grads(step):
        set_grads(reference, step)
        for g, q in zip(grads, reference):
            g.copy_(q.grad)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for step in range(2):  # warm-up: compiles the kernels and caches the chunk table
            load_grads(step)
            opt.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(2, 6):
        load_grads(step)
        graph.replay()
        eager.step()
        if tensor_lr:
            for scheduler in schedulers:
                scheduler.step()
    torch.cuda.synchronize()
    for p, q in zip(params, reference):
        assert_fused_close(p.detach(), q.detach(), dtype=torch.float32, ops=OPS[family], reduction_length=363, steps=6)


@needs_cuda
def test_a_tensor_of_more_than_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    numel = 2**31 + 4099
    if free < numel * 9:  # fp16 p and g, fp32 G, with some room
        pytest.skip("not enough free GPU memory")
    p = torch.zeros(numel, dtype=torch.float16, device="cuda", requires_grad=True)
    p.grad = torch.full_like(p, 0.5)
    opt = HysteroGrad([p], lr=0.01, fused="triton")
    status, g_norm, _ = opt.step()
    # Every element sees the same g, so the same G and u: the last element must match the first.
    metric = opt.state[p]["G"]
    assert status == "Liquid"
    assert metric[-1].item() == metric[0].item() == pytest.approx(0.01 * 0.25, rel=1e-6)
    assert p[-1].item() == p[0].item() != 0.0
    assert g_norm == pytest.approx((numel * (0.5 / (0.05 + 1e-7)) ** 2) ** 0.5, rel=1e-4)


# ---------------------------------------------------------------- capturable (any backend; CUDA graphs above)


@pytest.mark.parametrize("fused", ["eager", "triton"])
def test_capturable_hysterograd_returns_the_statistics_on_the_device(fused, monkeypatch):
    params = make_params([(5,), (2, 3)], torch.float32)
    shadow = [p.detach().clone().requires_grad_(True) for p in params]
    opt = HysteroGrad(
        [{"params": params[:1]}, {"params": params[1:]}, {"params": []}], lr=0.05, fused=fused, capturable=True
    )
    reference = HysteroGrad([{"params": shadow[:1]}, {"params": shadow[1:]}, {"params": []}], lr=0.05, fused=fused)
    for step in range(3):
        set_grads(params, step)
        set_grads(shadow, step)
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__float__", "cpu", "numpy"):
                patch.setattr(torch.Tensor, name, lambda *_: pytest.fail("host read in a capturable step"))
            liquid, g_norm, h_width = opt.step()
        status, expected_norm, expected_h = reference.step()
        assert liquid.device == params[0].device and liquid.dtype == torch.bool
        assert bool(liquid) == (status == "Liquid")
        # One backend on the same data; capturable only keeps the results on the device: bit for bit.
        assert g_norm.item() == expected_norm and h_width.item() == expected_h


@pytest.mark.parametrize("capturable_first", [True, False])
def test_capturable_biostatis_state_loads_across_modes(capturable_first):
    params = make_params([(5,), (2, 3)], torch.float32)
    opt = trajectory("biostatis", params, "triton", capturable=capturable_first)
    assert all(opt.state[p]["step"].device == (p.device if capturable_first else torch.device("cpu")) for p in params)
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    other = OPTIMIZERS["biostatis"](copies, "triton", capturable=not capturable_first)
    other.load_state_dict(opt.state_dict())
    for p in copies:
        assert other.state[p]["step"].device == (torch.device("cpu") if capturable_first else p.device)
        assert other.state[p]["step"].item() == 3.0
    for step in (3, 4):
        set_grads(params, step)
        set_grads(copies, step)
        opt.step()
        other.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)  # one backend, its state moved between host and device: bit for bit


@pytest.mark.fused_vs_eager
def test_a_group_of_mixed_dtypes_runs_one_bucket_per_dtype(family):
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32]
    mine = [make_params([(6,)], dtype, seed=i)[0] for i, dtype in enumerate(dtypes)]
    reference = [p.detach().cpu().clone().requires_grad_(True) for p in mine]
    before = multi_tensor.launch_count
    trajectory(family, mine, "triton", steps=2)
    per_step = (multi_tensor.launch_count - before) / 2
    assert per_step == (3 * 3 + 1 if family == "hysterograd" else 3 * 3)  # three buckets
    trajectory(family, reference, "eager", steps=2)
    for p, q in zip(mine, reference):
        # Sums in another order: rounding apart. The group statistics are fp32 sums, so fp64 gets fp32's bound.
        dtype = torch.float32 if p.dtype == torch.float64 else p.dtype
        assert_fused_close(p.detach(), q.detach(), dtype=dtype, ops=OPS[family], reduction_length=24, steps=2)
