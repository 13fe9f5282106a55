"""HysteroGrad against the goldens and properties of docs/hysterograd.md, on every backend."""

import copy
import math

import pytest
import torch
from conftest import max_examples
from tolerance import (
    HYSTEROGRAD_OPS,
    assert_displacement_close,
    assert_fused_close,
    assert_hysterograd_results_close,
    assert_rounded_close,
    numel,
)

from curvkern import available_backends
from curvkern.families import get_family
from curvkern.optim import HIOptimizer, HysteroGrad

FAMILY = get_family("hysterograd")
GRAD = [0.5, -1.0]


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request):
    return request.param


def make(backend, device, values=(1.0, -2.0), dtype=torch.float32, **hyper):
    p = torch.tensor(values, dtype=dtype, device=device, requires_grad=True)
    return p, HysteroGrad([p], fused=backend, **hyper)


def run(opt, p, grad, steps):
    out = []
    for _ in range(steps):
        p.grad = torch.tensor(grad, dtype=p.dtype, device=p.device)
        out.append(opt.step())
    return out


def scalars(opt, p):
    s = opt.state[p]
    return s["group_tau"].item(), s["group_temp"].item(), s["avg_energy"].item()


def close(actual, expected, rtol=1e-5, atol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64).cpu()
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# G1: defaults, first five steps: (g_norm, h, p0, τ, T, E, G).
G1_TABLE = [
    (14.142115, 1.68179e-6, 0.99, 0.0141421, 0.99, 0.141421, [0.0025, 0.01]),
    (10.025084, 7.43264e-6, 0.982911, 0.0241672, 0.9801, 0.240258, [0.004975, 0.0199]),
    (8.205955, 1.70961e-5, 0.977109, 0.0323732, 0.970299, 0.319915, [0.00742525, 0.029701]),
    (7.124339, 3.03816e-5, 0.972071, 0.0394975, 0.960596, 0.387959, [0.009851, 0.039404]),
    (6.388113, 4.70285e-5, 0.967554, 0.0458856, 0.950990, 0.447961, [0.0122525, 0.0490099]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_g1_defaults_first_five_steps(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype)
    for g_norm, h, p0, tau, temp, energy, metric in G1_TABLE:
        status, got_norm, got_h = run(opt, p, GRAD, 1)[0]
        assert status == "Liquid"
        close(got_norm, g_norm)
        close(got_h, h, rtol=1e-4, atol=0)
        close(p.detach(), [p0, -1 - p0])
        close(scalars(opt, p), [tau, temp, energy])
        close(opt.state[p]["G"], metric)
    assert set(opt.state[p]) == {"group_tau", "group_temp", "avg_energy", "G"}
    assert opt.state[p]["G"].dtype == dtype
    # The group scalars stay in the default dtype even for float64 parameters (docs/hysterograd.md).
    assert opt.state[p]["group_tau"].dtype == torch.float32
    group = opt.state_dict()["param_groups"][0]
    assert set(group) - {"params"} == {
        "lr",
        "stiffening_factor",
        "beta",
        "epsilon",
        "cooling_rate",
        "initial_temp",
        "metric_scale",
        "adaptive_threshold",
        "grad_clip",
        "hysteresis_scale",
    }
    assert (group["lr"], group["beta"], group["grad_clip"]) == (1e-3, 0.99, None)


G2 = dict(lr=1.0, stiffening_factor=1.0, initial_temp=0.0, adaptive_threshold=False)
G2_TABLE = [
    ("Liquid", 14.142, 3.7606, 14.1421),
    ("Liquid", 10.025, 4.9160, 24.1672),
    ("Liquid", 8.206, 5.6897, 32.3732),
    ("Liquid", 7.124, 6.2847, 39.4975),
    ("Frozen", 6.388, 6.7739, 45.8856),
    ("Frozen", 5.846, 7.1925, 51.7317),
    ("Frozen", 5.426, 7.5603, 57.1575),
    ("Frozen", 5.088, 7.8896, 62.2456),
]


def test_g2_freeze_flip_and_shock(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype, **G2)
    for t, (status, g_norm, h, tau) in enumerate(G2_TABLE, start=1):
        got = run(opt, p, GRAD, 1)[0]
        assert got[0] == status
        close(got[1:], [g_norm, h], rtol=1e-4)
        close(scalars(opt, p)[0], tau, rtol=1e-5)
        if t == 4:
            after_liquid = p.detach().clone()
            close(after_liquid, [-26.928936, 25.928955])
        if t > 4:
            assert torch.equal(p.detach(), after_liquid)  # frozen: p is not written at all
    tau, temp, energy = scalars(opt, p)
    assert temp == 0.0
    close(energy, 0.596549)
    opt.shock(0.5)
    close(scalars(opt, p), [31.12278, 0.2, energy])


def test_g2b_spike_unfreezes(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype, **G2)
    run(opt, p, GRAD, 8)
    before = p.detach().clone()
    status, g_norm, h = run(opt, p, [50.0, -100.0], 1)[0]
    assert status == "Liquid"
    close([g_norm, h], [14.13673, 8.73970])
    close(p.detach() - before, [-9.996178, 9.996178])
    close(opt.state[p]["G"], [25.01912, 100.0765])
    close(scalars(opt, p)[0], 76.38230)


@pytest.mark.fused_vs_eager
def test_g4_clipping(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype, grad_clip=1.0)
    status, g_norm, h = run(opt, p, GRAD, 1)[0]
    assert status == "Liquid"
    assert g_norm != 1.0  # N/(N + 1e-6) rounds below 1 in fp32
    assert_fused_close(g_norm, 0.99999994, dtype=torch.float32, ops=HYSTEROGRAD_OPS, reduction_length=2)
    close(h, 3.16228e-8, rtol=1e-4, atol=0)
    close(scalars(opt, p), [0.001, 0.99, 0.01])
    close(p.detach(), [0.9992929, -1.9992929])
    expected_p = [[0.9985858, -1.9985857], [0.9978787, -1.9978786]]
    for tau, p_t in zip([0.002, 0.003], expected_p):
        _, g_norm, _ = run(opt, p, GRAD, 1)[0]
        assert_fused_close(g_norm, 0.99999988, dtype=torch.float32, ops=HYSTEROGRAD_OPS, reduction_length=2)
        close(scalars(opt, p)[0], tau)
        close(p.detach(), p_t)


def test_g5_zero_gradient(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype)
    for temp in [0.99, 0.9801]:
        assert run(opt, p, [0.0, 0.0], 1)[0] == ("Frozen", 0.0, 0.0)
        close(p.detach(), [1.0, -2.0], rtol=0, atol=0)
        close(opt.state[p]["G"], [0.0, 0.0], rtol=0, atol=0)
        close(scalars(opt, p), [0.0, temp, 0.0])
    status, g_norm, h = run(opt, p, GRAD, 1)[0]
    assert status == "Liquid"
    close([g_norm, h], [14.142115, 4.99507e-6], rtol=1e-4)
    close(p.detach(), [0.99, -1.99])


def test_g6_none_gradient_and_diluted_means(backend, device, dtype):
    a = torch.tensor([1.0, -2.0], device=device, dtype=dtype, requires_grad=True)
    b = torch.tensor([3.0], device=device, dtype=dtype, requires_grad=True)
    opt = HysteroGrad([{"params": [a]}, {"params": [b]}], fused=backend)
    a.grad = torch.tensor(GRAD, device=device, dtype=dtype)
    status, g_norm, h = opt.step()
    assert status == "Liquid"
    close([g_norm, h], [7.0710573, 8.408938e-7], rtol=1e-5, atol=0)
    assert b.item() == 3.0
    assert set(opt.state[b]) == {"group_tau", "group_temp", "avg_energy"}
    close(scalars(opt, b), [0.0, 1.0, 0.0], rtol=0, atol=0)


def test_g8_hot_start(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype, initial_temp=1.5)
    results = run(opt, p, GRAD, 41)
    assert all(h == 0.0 for _, _, h in results[:40])
    close(results[40][2], 3.53211e-5, rtol=1e-4)
    close(opt.state[p]["group_temp"], 0.993423)
    assert all(status == "Liquid" for status, _, _ in results)


def test_g9_first_step_magnitude(backend, device, dtype):
    config = dict(
        lr=0.05,
        metric_scale=300,
        beta=0.9,
        epsilon=1e-8,
        cooling_rate=0.995,
        stiffening_factor=0.005,
        grad_clip=2.5,
        hysteresis_scale=0.6,
    )
    p, opt = make(backend, device, dtype=dtype, values=(1.0, -2.0, 0.0), **config)
    status, g_norm, h = run(opt, p, [0.5, -1.0, 0.0], 1)[0]
    assert status == "Liquid"
    close([g_norm, h], [0.2581989, 4.40056e-8], rtol=1e-5, atol=0)
    close(p.detach(), [0.9908713, -1.9908713, 0.0])
    close(opt.state[p]["G"], [7.5, 30.0, 0.0])
    close(scalars(opt, p), [0.01290994, 0.995, 0.02581989])


def test_g10_nan_poisoning_never_reaches_parameters(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype)
    status, g_norm, h = run(opt, p, [math.nan, -1.0], 1)[0]
    assert status == "Frozen" and math.isnan(g_norm) and math.isnan(h)
    close(p.detach(), [1.0, -2.0], rtol=0, atol=0)
    metric = opt.state[p]["G"].cpu()
    assert math.isnan(metric[0]) and metric[1].item() == pytest.approx(0.01)
    tau, _, energy = scalars(opt, p)
    assert math.isnan(tau) and math.isnan(energy)
    status, g_norm, _ = run(opt, p, GRAD, 1)[0]
    assert status == "Frozen" and math.isnan(g_norm)
    close(p.detach(), [1.0, -2.0], rtol=0, atol=0)


@pytest.mark.parametrize("grad", [[math.inf, -1.0], [-math.inf, 1.0]])
def test_infinite_gradient_freezes_without_touching_parameters(backend, device, dtype, grad):
    p, opt = make(backend, device, dtype=dtype)
    status, g_norm, _ = run(opt, p, grad, 1)[0]
    assert status == "Frozen" and math.isnan(g_norm)
    assert torch.equal(p.detach().cpu(), torch.tensor([1.0, -2.0]))


def test_g11_integer_initial_temp_is_cast(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype, initial_temp=1)
    q, reference = make(backend, device, dtype=dtype, initial_temp=1.0)
    assert run(opt, p, GRAD, 3) == run(reference, q, GRAD, 3)  # one backend, the same float: bit for bit
    assert opt.state[p]["group_temp"].dtype == torch.float32


def random_grads(seed, shapes, steps, device):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(steps)]


def test_p1_gradient_scale_invariance(backend, device, dtype):
    shapes = [(7,), (3, 5)]
    grads = random_grads(0, shapes, 20, device)
    trajectories = []
    for scale in [1.0, 1000.0]:
        params = [torch.zeros(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
        opt = HysteroGrad(params, lr=0.01, fused=backend)
        results = []
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(dtype) * scale
            results.append(opt.step())
        trajectories.append((results, [p.detach().clone() for p in params]))
    (results_1, params_1), (results_c, params_c) = trajectories
    assert [r[0] for r in results_1] == [r[0] for r in results_c]
    close([r[1] for r in results_1], [r[1] for r in results_c], rtol=1e-4, atol=1e-4)
    for a, b in zip(params_1, params_c):
        close(a, b, rtol=0, atol=1e-6)


def test_p2_frozen_steps_keep_parameters_bitwise_and_advance_state(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype, **G2)
    run(opt, p, GRAD, 4)
    for _ in range(4):
        before_p, before_metric = p.detach().clone(), opt.state[p]["G"].clone()
        before_scalars = scalars(opt, p)
        assert run(opt, p, GRAD, 1)[0][0] == "Frozen"
        assert torch.equal(p.detach(), before_p)  # frozen: p is not written at all
        assert not torch.equal(opt.state[p]["G"], before_metric)
        assert all(a != b for a, b in zip(scalars(opt, p), before_scalars) if b != 0.0)


def test_p3_adaptive_off_relation(backend, device, dtype):
    p_on, adaptive = make(backend, device, dtype=dtype)
    p_off, plain = make(backend, device, dtype=dtype, adaptive_threshold=False)
    for _ in range(5):
        _, _, h_on = run(adaptive, p_on, GRAD, 1)[0]
        _, _, h_off = run(plain, p_off, GRAD, 1)[0]
        energy = scalars(adaptive, p_on)[2]
        close(h_off, h_on / (energy + 1e-8), rtol=1e-5)


@pytest.mark.slow  # 2000 steps
def test_p5_steady_state_constant_gradient(backend, device, dtype):
    if backend == "triton" and device == "cpu":
        pytest.skip("2000 steps through the Triton interpreter take ~40 s; it runs on CUDA")
    p, opt = make(backend, device, dtype=dtype)
    results = run(opt, p, GRAD, 2000)
    assert all(status == "Liquid" for status, _, _ in results)
    _, g_norm, h = results[-1]
    close([g_norm, h], [1.414215, 0.0245099], rtol=1e-4)
    tau, _, energy = scalars(opt, p)
    close([tau, energy], [3.00365, 1.414223], rtol=1e-4)


def test_p6_status_is_any_group_and_means_divide_by_all_groups(backend, device, dtype):
    a = torch.tensor([1.0, -2.0], device=device, dtype=dtype, requires_grad=True)
    b = torch.tensor([1.0, -2.0], device=device, dtype=dtype, requires_grad=True)
    c = torch.tensor([5.0], device=device, dtype=dtype, requires_grad=True)
    opt = HysteroGrad([{"params": [a]}, {"params": [b], **G2}, {"params": [c]}], fused=backend)
    for _ in range(5):
        a.grad = torch.tensor(GRAD, device=device, dtype=dtype)
        b.grad = torch.tensor(GRAD, device=device, dtype=dtype)
        status, g_norm, h = opt.step()
    # Group b froze at step 5 (G2) while group a stays liquid; c never had a gradient.
    assert status == "Liquid"
    close(g_norm, (6.388113 + 6.388) / 3, rtol=1e-4)
    close(h, (4.70285e-5 + 6.7739) / 3, rtol=1e-4)
    a.grad = None
    for _ in range(2):
        assert opt.step()[0] == "Frozen"


def test_no_gradient_at_all(backend, device):
    p, opt = make(backend, device)
    assert opt.step() == ("Frozen", 0.0, 0.0)
    assert set(opt.state[p]) == {"group_tau", "group_temp", "avg_energy"}


def test_closure_loss_is_kept_but_tuple_returned(backend, device, dtype):
    p, opt = make(backend, device, dtype=dtype)

    def closure():
        opt.zero_grad()
        loss = (p * torch.tensor(GRAD, device=device)).sum()
        loss.backward()
        return loss

    status, g_norm, _ = opt.step(closure)
    assert status == "Liquid"
    close(g_norm, 14.142115)
    assert opt.last_loss.item() == pytest.approx(0.5 + 2.0)


def test_lr_scheduler_changes_lr_and_tau_growth(backend, device):
    p, opt = make(backend, device, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, p, GRAD, 1)
    scheduler.step()
    run(opt, p, GRAD, 1)
    close(scalars(opt, p)[0], 0.1 * 14.142115 + 0.05 * 10.025084, rtol=1e-5)


def test_one_cycle_lr_runs_with_cycle_momentum_false(backend, device):
    p, opt = make(backend, device, lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        assert run(opt, p, GRAD, 1)[0][0] == "Liquid"
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1 / 25) and lrs == sorted(lrs)  # the warm-up from max_lr / div_factor
    close(scalars(opt, p)[0], sum(lr * g_norm for lr, g_norm in zip(lrs, (14.142115, 10.025084, 8.205955))), rtol=1e-5)


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_schedulers_cycling_momentum_by_default_raise(scheduler):
    """HysteroGrad has no momentum or betas: torch's schedulers that cycle one refuse it, as documented."""
    _, opt = make("eager", "cpu")
    arguments = dict(max_lr=0.1, total_steps=10) if scheduler == "OneCycleLR" else dict(base_lr=0.01, max_lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        getattr(torch.optim.lr_scheduler, scheduler)(opt, **arguments)


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_use_fp32_state_and_round_to_nearest(backend, device, dtype):
    shapes = [(33,), (4, 9)]
    grads = random_grads(1, shapes, 6, device)
    params = [(torch.randn(s, generator=torch.Generator().manual_seed(2)) * 3).to(device, dtype) for s in shapes]
    shadow = [p.float() for p in params]
    for p in params + shadow:
        p.requires_grad_(True)
    opt = HysteroGrad(params, lr=0.01, fused=backend)
    reference = HysteroGrad(shadow, lr=0.01, fused="eager")
    for step, step_grads in enumerate(grads, start=1):
        for p, q, g in zip(params, shadow, step_grads):
            p.grad = g.to(dtype)
            q.grad = g.to(dtype).float()
        assert assert_hysterograd_results_close(
            opt.step(), reference.step(), dtype=dtype, reduction_length=numel(shapes), steps=step
        )
        with torch.no_grad():
            for q in shadow:
                q.copy_(q.to(dtype).float())  # what the fp32 math rounded to nearest even stores
    for p, q in zip(params, shadow):
        assert opt.state[p]["G"].dtype == torch.float32
        if backend == "eager":  # the same fp32 math, rounded once: bit for bit
            assert torch.equal(p.detach().float(), q.detach())
        assert_rounded_close(
            p.detach(),
            q.detach(),
            storage_dtype=dtype,
            ops=HYSTEROGRAD_OPS,
            reduction_length=numel(shapes),
            steps=len(grads),
        )


def test_fp16_zero_gradient_stays_finite(backend, device):
    p, opt = make(backend, device, dtype=torch.float16)
    run(opt, p, [0.0, 0.0], 3)
    run(opt, p, [1e-4, -1e-4], 3)
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["G"]).all()


def test_shapes_strides_and_missing_grads(backend, device):
    """Empty, size-1, odd-sized and non-contiguous tensors, and a None grad, in one group."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=gen).to(device)
    shapes = [(0,), (1,), (1031,), (3, 0, 2)]
    dense = [torch.randn(s, generator=gen).to(device) for s in shapes] + [
        base.t().contiguous(),
        torch.ones(4, device=device),
    ]
    strided = [t.clone() for t in dense[:4]] + [base.clone().t(), torch.ones(4, device=device)]
    assert not strided[4].is_contiguous()
    results = []
    for params in (dense, strided):
        for p in params:
            p.requires_grad_(True)
        opt = HysteroGrad(params, lr=0.01, fused=backend)
        for step in range(3):
            for p in params[:5]:
                g = torch.sin(torch.arange(p.numel(), device=device, dtype=p.dtype) + step).reshape(p.shape)
                p.grad = g if p.is_contiguous() else g.t().contiguous().t()
            results.append(opt.step())
        assert "G" not in opt.state[params[5]]
        assert torch.equal(params[5].detach(), torch.ones(4, device=device))
    # One backend on the same values, dense or strided: the same code, bit for bit.
    assert results[:3] == results[3:]
    for a, b in zip(dense, strided):
        assert torch.equal(a.detach(), b.detach())


def trajectory(opt, params, grads):
    out = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        out.append(opt.step())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_state_dict_round_trip_continues_the_trajectory(backend, device, dtype):
    shapes = [(5,), (2, 3)]
    grads = random_grads(4, shapes, 8, device)
    grads = [[g.to(dtype) for g in step] for step in grads]

    def make_params():
        return [torch.ones(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]

    config = dict(lr=0.01, grad_clip=5.0)
    straight = make_params()
    opt = HysteroGrad(straight, fused=backend, **config)
    expected = trajectory(opt, straight, grads)

    first = make_params()
    opt_a = HysteroGrad(first, fused=backend, **config)
    results = trajectory(opt_a, first, grads[:4])
    saved = copy.deepcopy(opt_a.state_dict())
    second = [p.detach().clone().requires_grad_(True) for p in first]
    opt_b = HysteroGrad(second, fused=backend, lr=0.5)
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["lr"] == 0.01
    assert opt_b.state[second[0]]["group_tau"].dtype == torch.float32
    assert opt_b.state[second[0]]["G"].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    results += trajectory(opt_b, second, grads[4:])
    assert results == expected  # one backend, saved and loaded state: bit for bit
    for a, b in zip(straight, second):
        assert torch.equal(a, b)


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("target", available_backends(FAMILY.name, "cpu"))
def test_state_dict_loads_across_fused_modes(backend, device, target):
    p, opt = make(backend, device)
    run(opt, p, GRAD, 3)
    q = p.detach().clone().cpu().requires_grad_(True)
    other = HysteroGrad([q], fused=target)
    other.load_state_dict(opt.state_dict())
    got, expected = run(other, q, GRAD, 2), run(opt, p, GRAD, 2)
    if target == backend:  # the same code on the same data: bit for bit
        assert got == expected
        assert torch.equal(p.detach().cpu(), q.detach())
        return
    for step, (a, b) in enumerate(zip(got, expected), start=4):
        assert assert_hysterograd_results_close(a, b, dtype=torch.float32, reduction_length=2, steps=step)
    assert_fused_close(q.detach(), p.detach(), dtype=torch.float32, ops=HYSTEROGRAD_OPS, reduction_length=2, steps=5)


@pytest.mark.fused_vs_eager
def test_four_default_steps_agree_across_backends_by_the_policy():
    """An AMD EPYC (AVX2) returned N̂ = 7.1243391036987305 from eager and 7.124338626861572 from cpp after
    four default steps (one fp32 ulp): every backend's N̂ and h agree with eager's to the policy, not bits."""
    results = {}
    for backend in available_backends(FAMILY.name, "cpu"):
        p, opt = make(backend, "cpu")
        results[backend] = (run(opt, p, GRAD, 4), p.detach().clone())
    expected, expected_p = results["eager"]
    assert_hysterograd_results_close(
        ("Liquid", 7.124338626861572, expected[3][2]), expected[3], dtype=torch.float32, reduction_length=2, steps=4
    )
    for backend, (got, got_p) in results.items():
        for step, (a, b) in enumerate(zip(got, expected), start=1):
            assert assert_hysterograd_results_close(a, b, dtype=torch.float32, reduction_length=2, steps=step), backend
        assert_fused_close(got_p, expected_p, dtype=torch.float32, ops=HYSTEROGRAD_OPS, reduction_length=2, steps=4)


def test_checkpoint_of_the_original_loads(backend, device):
    """The original keeps G in the parameter dtype: a bf16 G loads as fp32 state here."""
    p = torch.tensor([1.0, -2.0], dtype=torch.bfloat16, device=device, requires_grad=True)
    opt = HysteroGrad([p], fused=backend)
    original = {
        "state": {
            0: {
                "group_tau": torch.tensor(0.5),
                "group_temp": torch.tensor(0.9),
                "avg_energy": torch.tensor(0.1),
                "G": torch.tensor([0.25, 1.0], dtype=torch.bfloat16),
            }
        },
        "param_groups": [dict(opt.param_groups[0], params=[0])],
    }
    opt.load_state_dict(original)
    assert opt.state[p]["G"].dtype == torch.float32
    assert opt.state[p]["group_tau"].dtype == torch.float32
    run(opt, p, GRAD, 1)


def test_step_reads_the_device_once(backend, device, monkeypatch):
    """Only building the returned tuple leaves the device: no .item(), bool() or float() of a tensor."""
    p, opt = make(backend, device, grad_clip=1.0)
    reads = []
    real_tolist = torch.Tensor.tolist

    def forbidden(*_):
        raise AssertionError("host sync inside step()")

    def counted_tolist(self):
        reads.append(self.shape)
        return real_tolist(self)

    for name in ("item", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    b = torch.tensor([2.0], device=device, requires_grad=True)
    opt.add_param_group({"params": [b]})
    p.grad = torch.tensor(GRAD, device=device)
    b.grad = torch.tensor([1.0], device=device)
    opt.step()
    assert len(reads) == 1


def test_hioptimizer_is_the_same_class():
    assert HIOptimizer is HysteroGrad


@pytest.mark.parametrize(
    "name,value",
    [
        ("lr", -1e-3),
        ("lr", math.nan),
        ("stiffening_factor", -0.1),
        ("beta", 1.0),
        ("beta", -0.1),
        ("epsilon", 0.0),
        ("cooling_rate", 1.5),
        ("cooling_rate", -0.1),
        ("initial_temp", math.inf),
        ("metric_scale", 0.0),
        ("hysteresis_scale", -1.0),
        ("grad_clip", -1.0),
        ("adaptive_threshold", "yes"),
        ("lr", "0.1"),
    ],
)
def test_invalid_hyperparameters_name_the_parameter(name, value):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        HysteroGrad([p], **{name: value}, fused="eager")
    with pytest.raises(ValueError, match=name):
        HysteroGrad([{"params": [p], name: value}], fused="eager")


def test_grad_clip_zero_means_off():
    p, opt = make("eager", "cpu", grad_clip=0.0)
    q, reference = make("eager", "cpu")
    assert run(opt, p, GRAD, 2) == run(reference, q, GRAD, 2)  # eager both sides: bit for bit


def test_invalid_fused_value():
    with pytest.raises(ValueError, match="fused"):
        HysteroGrad([torch.zeros(1, requires_grad=True)], fused="cuda")


def test_bad_inputs_raise_clear_errors(backend, device):
    p, opt = make(backend, device)
    p.grad = torch.tensor(GRAD, device=device).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(TypeError, match="complex"):
        HysteroGrad([torch.zeros(2, dtype=torch.complex64, device=device, requires_grad=True)], fused=backend)
    with pytest.raises(TypeError, match="dtype"):
        HysteroGrad([torch.zeros(2, dtype=torch.int32, device=device)], fused=backend)
    with pytest.raises(RuntimeError, match="one device"):
        HysteroGrad(
            [torch.zeros(2, device=device, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)],
            fused=backend,
        )


@pytest.mark.parametrize("fused", ["cpp", "triton"])
def test_backend_that_cannot_run_raises_instead_of_falling_back(fused):
    if fused in available_backends(FAMILY.name, "cpu"):
        pytest.skip(f"{fused} runs here; the backend tests cover it")
    with pytest.raises((NotImplementedError, RuntimeError), match=fused):
        HysteroGrad([torch.zeros(2, requires_grad=True)], fused=fused)


class OriginalHIOptimizer(torch.optim.Optimizer):
    """The original HEAD step (docs/hysterograd.md, "The algorithm"), transcribed with its host syncs: the oracle."""

    def __init__(self, params, **hyper):
        super().__init__(params, hyper)

    @torch.no_grad()
    def step(self):
        liquid_groups, sum_h, sum_n = 0, 0.0, 0.0
        for group in self.param_groups:
            ref = group["params"][0]
            scalars = self.state[ref]
            if "group_tau" not in scalars:
                scalars["group_tau"] = torch.tensor(0.0, device=ref.device)
                scalars["group_temp"] = torch.tensor(group["initial_temp"], device=ref.device)
                scalars["avg_energy"] = torch.tensor(0.0, device=ref.device)
            acc, items = torch.tensor(0.0, device=ref.device), []
            beta = group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "G" not in state:
                    state["G"] = torch.zeros_like(p)
                state["G"].mul_(beta).addcmul_(p.grad, p.grad, value=(1 - beta) * group["metric_scale"])
                u = p.grad / (torch.sqrt(state["G"]) + group["epsilon"])
                acc += u.pow(2).sum()
                items.append((p, u))
            if not items:
                continue
            norm = torch.sqrt(acc)
            if group["grad_clip"]:
                ratio = group["grad_clip"] / (norm + 1e-6)
                clip_scale = ratio if ratio < 1.0 else 1.0
            else:
                clip_scale = 1.0
            g_norm = norm * clip_scale
            scalars["group_tau"] += group["lr"] * g_norm
            scalars["group_temp"] *= group["cooling_rate"]
            scalars["avg_energy"] = beta * scalars["avg_energy"] + (1 - beta) * g_norm
            cold = 1 - torch.clamp(scalars["group_temp"], 0, 1)
            h = group["stiffening_factor"] * torch.sqrt(scalars["group_tau"]) * cold * group["hysteresis_scale"]
            if group["adaptive_threshold"]:
                h = h * (scalars["avg_energy"] + 1e-8)
            sum_h += float(h)
            sum_n += float(g_norm)
            if g_norm > h:
                liquid_groups += 1
                for p, u in items:
                    p.add_(u, alpha=-group["lr"] * clip_scale)
        n = len(self.param_groups)
        return ("Liquid" if liquid_groups > 0 else "Frozen"), sum_n / n, sum_h / n


from hypothesis import example, given, settings, strategies as st  # noqa: E402

hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([1e-3, 0.05, 1.0]),
        "stiffening_factor": st.sampled_from([0.0, 0.01, 1.0]),
        "beta": st.sampled_from([0.0, 0.9, 0.99]),
        "epsilon": st.sampled_from([1e-8, 1e-7, 1e-3]),
        "cooling_rate": st.sampled_from([0.9, 0.99, 1.0]),
        "initial_temp": st.sampled_from([0.0, 0.5, 1.0, 1.5]),
        "metric_scale": st.sampled_from([1.0, 300.0]),
        "adaptive_threshold": st.booleans(),
        "grad_clip": st.sampled_from([None, 0.0, 0.5, 2.5]),
        "hysteresis_scale": st.sampled_from([0.6, 1.0, 5.0]),
    }
)


# An AMD EPYC (AVX2) found this case: N̂ 2.1e-6 apart (relative) from the original's in fp32, where a
# tuned 1e-6 had been allowed.
AMD_FP32_CASE = dict(
    hyper=dict(
        lr=1.0,
        stiffening_factor=0.01,
        beta=0.99,
        epsilon=1e-8,
        cooling_rate=0.99,
        initial_temp=1.0,
        metric_scale=1.0,
        adaptive_threshold=True,
        grad_clip=None,
        hysteresis_scale=1.0,
    ),
    shapes=[(3, 4)],
    groups=1,
    steps=2,
    seed=0,
)
# A parameter that ends near zero: its steps cancel its start, so only its displacement has a small relative error.
CANCELLING_CASE = dict(
    hyper=dict(
        lr=0.05,
        stiffening_factor=0.0,
        beta=0.99,
        epsilon=1e-8,
        cooling_rate=0.9,
        initial_temp=0.0,
        metric_scale=1.0,
        adaptive_threshold=False,
        grad_clip=2.5,
        hysteresis_scale=0.6,
    ),
    shapes=[(1,), (3, 4), (1,), (3, 4)],
    groups=1,
    steps=5,
    seed=1995,
)

# Found by hypothesis: steps of alternating sign leave a displacement (3e-4) far shorter than the path
# they walked, so the error relative to it (1.2e-13) exceeded the bound before the bound took the path.
ALTERNATING_CASE = dict(
    hyper=dict(
        lr=0.05,
        stiffening_factor=0.0,
        beta=0.9,
        epsilon=1e-7,
        cooling_rate=0.9,
        initial_temp=0.0,
        metric_scale=1.0,
        adaptive_threshold=False,
        grad_clip=None,
        hysteresis_scale=0.6,
    ),
    shapes=[(3, 4), (3, 4), (3, 4), (1,)],
    groups=1,
    steps=3,
    seed=36,
)


@pytest.mark.fused_vs_eager
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_the_original_algorithm(backend, device, dtype):
    """Kind (c) of tests/tolerance.py: fp64 to 1e-12; fp32 to the policy's bound; the gate's decision
    where it is decided by more than that bound (the trajectories may rightly part where it is not)."""

    @settings(max_examples=max_examples(25), deadline=None)
    @example(**AMD_FP32_CASE)
    @example(**CANCELLING_CASE)
    @example(**ALTERNATING_CASE)
    @given(
        hyper=hyperparameters,
        shapes=st.lists(st.sampled_from([(1,), (5,), (3, 4), (0,), (130,)]), min_size=1, max_size=4),
        groups=st.integers(1, 2),
        steps=st.integers(1, 8),
        seed=st.integers(0, 2**16),
    )
    def check(hyper, shapes, groups, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        mine = [t.clone().to(device).requires_grad_(True) for t in init]
        oracle = [t.clone().requires_grad_(True) for t in init]

        def split(ps):
            return [{"params": ps[i::groups]} for i in range(groups) if ps[i::groups]]

        opt = HysteroGrad(split(mine), fused=backend, **hyper)
        reference = OriginalHIOptimizer(split(oracle), **hyper)
        longest_group = max(numel(shapes[i::groups]) for i in range(groups))
        paths = [0.0] * len(oracle)  # Σ‖Δq‖ per parameter: assert_displacement_close's path
        for step in range(1, steps + 1):
            before = [q.detach().clone() for q in oracle]
            for p, q in zip(mine, oracle):
                has_grad = torch.rand((), generator=gen) < 0.8
                scale = 10.0 ** torch.randint(-3, 3, (), generator=gen).item()
                g = torch.randn(p.shape, generator=gen, dtype=dtype) * scale if has_grad else None
                p.grad = None if g is None else g.to(device)
                q.grad = g
            got, expected = opt.step(), reference.step()
            paths = [path + (q.detach() - b).norm().item() for path, q, b in zip(paths, oracle, before)]
            if not assert_hysterograd_results_close(
                got, expected, dtype=dtype, reduction_length=longest_group, steps=step
            ):
                return  # a gate on its knife edge: from here the two may rightly differ
        for p, q, p0, path in zip(mine, oracle, init, paths):
            # Relative to the displacement: a parameter whose steps cancel its start (0.089 → 2.5e-5 in
            # 5 steps, found by hypothesis) has a relative error of its own far above the bound (9e-14) with
            # its update exact to 2.6e-17.
            assert_displacement_close(
                p.detach(),
                q.detach(),
                p0,
                dtype=dtype,
                ops=HYSTEROGRAD_OPS,
                reduction_length=longest_group,
                steps=steps,
                path=path,
            )
            if "G" in reference.state[q]:
                # G ← G·β + c·g² per element: 3 roundings a step, no reduction.
                assert_fused_close(opt.state[p]["G"], reference.state[q]["G"], dtype=dtype, ops=3, steps=steps)

    check()


def test_rejected_param_group_leaves_the_optimizer_unchanged():
    p, opt = make("eager", "cpu")
    with pytest.raises(ValueError, match="beta"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "beta": 2.0})
    assert len(opt.param_groups) == 1
    assert run(opt, p, GRAD, 1)[0][0] == "Liquid"
