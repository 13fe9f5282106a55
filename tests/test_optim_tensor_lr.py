"""lr as a tensor, for both optimizers on every backend: the trajectory of the float it holds, bit for bit;
schedulers update it in place; no host read in a capturable step; checkpoints keep it a tensor.

torch.optim's convention: a 1-element tensor lr, updated in place by the LR schedulers (``fill_``), is
what lets a step captured in a CUDA graph replay with a new lr.

Every comparison here is bit-exact, legitimately (kind (d) of tests/tolerance.py): both sides run the
same backend on the same data, and differ only in how lr reaches it.
"""

import pytest
import torch
from conftest import backend_cases

from curvkern.families import OPTIMIZER, Family, families_of_kind

# grad_clip small enough to bite (HysteroGrad's −η·k then comes from the fp32 product) and weight decay
# on (BiostatisV6's 1 − lr·wd): every place lr enters the step.
LR_EVERYWHERE = {"hysterograd": dict(grad_clip=0.5), "biostatis": dict(weight_decay=0.1, flip_threshold=3.0)}


def constructor(family: Family):
    def make(params, lr, fused, **kw):
        return family.api(params, lr=lr, fused=fused, **LR_EVERYWHERE[family.name], **kw)

    return make


OPTIMIZERS = {family.name: constructor(family) for family in families_of_kind(OPTIMIZER)}
CASES = [(family, fused, device) for family in sorted(OPTIMIZERS) for fused, device in backend_cases(family)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cases(test):
    return pytest.mark.parametrize("family,fused,device", CASES, ids=["-".join(c) for c in CASES])(test)


def make_params(device, dtype, shapes=((37,), (4, 5), (1,))):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_(True) for s in shapes]


def run(opt, params, steps, scheduler=None):
    results = []
    for step in range(steps):
        for i, p in enumerate(params):
            g = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * (0.3 + 0.1 * i) + step).reshape(p.shape)
            p.grad = (g * (1 + step)).to(p.device, p.dtype)
        results.append(opt.step())
        if scheduler is not None:
            scheduler.step()
    return results


def assert_same_state(opt, other, params, copies):
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            expected = other.state[q][key]
            pairs = zip(value, expected) if isinstance(value, list) else [(value, expected)]
            assert all(torch.equal(a, b) for a, b in pairs), key


@cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32], ids=["lr64", "lr32"])
def test_tensor_lr_follows_the_float_it_holds_bit_for_bit(family, fused, device, dtype, lr_dtype):
    lr = torch.tensor(0.0123456789, dtype=lr_dtype, device=device)
    params, copies = make_params(device, dtype), make_params(device, dtype)
    opt = OPTIMIZERS[family](params, lr, fused)
    reference = OPTIMIZERS[family](copies, lr.item(), fused)
    assert run(opt, params, 8) == run(reference, copies, 8)  # HysteroGrad: (status, N̂, h)
    assert_same_state(opt, reference, params, copies)


@cases
def test_a_scheduler_updates_a_tensor_lr_in_place(family, fused, device):
    lr = torch.tensor(0.1, dtype=torch.float64, device=device)
    params, copies = make_params(device, torch.float32), make_params(device, torch.float32)
    opt, reference = OPTIMIZERS[family](params, lr, fused), OPTIMIZERS[family](copies, 0.1, fused)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, reference)]
    run(opt, params, 3, schedulers[0])
    run(reference, copies, 3, schedulers[1])
    assert opt.param_groups[0]["lr"] is lr and lr.item() == reference.param_groups[0]["lr"] == 0.1 * 0.5**3
    assert_same_state(opt, reference, params, copies)


@cases
def test_a_capturable_step_with_a_tensor_lr_reads_nothing_back(family, fused, device, monkeypatch):
    lr = torch.tensor(0.05, device=device)
    params, copies = make_params(device, torch.float32), make_params(device, torch.float32)
    opt = OPTIMIZERS[family](params, lr, fused, capturable=True)
    reference = OPTIMIZERS[family](copies, lr.item(), fused)
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, lambda *_: pytest.fail("host read in a capturable step"))
        run(opt, params, 3)
    run(reference, copies, 3)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)


@cases
def test_a_tensor_lr_survives_the_state_dict(family, fused, device):
    params, copies = make_params(device, torch.float32), make_params(device, torch.float32)
    opt = OPTIMIZERS[family](params, torch.tensor(0.05, device=device), fused)
    run(opt, params, 2)
    other = OPTIMIZERS[family](copies, 1.0, fused)
    other.load_state_dict(opt.state_dict())
    saved = other.param_groups[0]["lr"]
    assert isinstance(saved, torch.Tensor) and saved.item() == torch.tensor(0.05).item()
    for p, q in zip(params, copies):
        q.data.copy_(p.data)
    run(opt, params, 2)
    run(other, copies, 2)
    assert_same_state(opt, other, params, copies)


@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    "lr, message",
    [
        (torch.tensor([0.1, 0.2]), "one floating-point element"),
        (torch.tensor(1), "one floating-point element"),
        (torch.tensor(-0.1), r"Invalid lr: -0\.1"),
        (torch.tensor(float("nan")), "expected a finite number"),
    ],
)
def test_bad_tensor_lr_is_rejected_with_a_clear_message(family, lr, message):
    with pytest.raises(ValueError, match=message):
        OPTIMIZERS[family](make_params("cpu", torch.float32), lr, "eager")


@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
def test_a_one_element_lr_of_shape_1_acts_as_its_value(family):
    params, copies = make_params("cpu", torch.float32), make_params("cpu", torch.float32)
    opt = OPTIMIZERS[family](params, torch.tensor([0.05], dtype=torch.float64), "eager")
    reference = OPTIMIZERS[family](copies, 0.05, "eager")
    run(opt, params, 2)
    run(reference, copies, 2)
    assert_same_state(opt, reference, params, copies)


@needs_cuda
@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
@pytest.mark.parametrize("fused", ["eager", "triton"])
def test_a_cpu_lr_drives_cuda_parameters(family, fused):
    params, copies = make_params("cuda", torch.float32), make_params("cuda", torch.float32)
    opt = OPTIMIZERS[family](params, torch.tensor(0.05, dtype=torch.float64), fused)
    reference = OPTIMIZERS[family](copies, 0.05, fused)
    run(opt, params, 3)
    run(reference, copies, 3)
    assert_same_state(opt, reference, params, copies)
