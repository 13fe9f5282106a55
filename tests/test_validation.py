"""Both optimizers check everything a kernel will touch before any kernel runs, and load checkpoints safely.

A state tensor of the wrong size once reached the Triton pointer table and made the kernels write past
its end (a segfault, or glibc's ``free(): invalid size``): every backend now refuses it, by name, with
the optimizer left exactly as it was.
"""

import copy
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from curvkern import available_backends
from curvkern.families import OPTIMIZER, families_of_kind
from curvkern.optim import HysteroGrad

OPTIMIZERS = {family.name: family.api for family in families_of_kind(OPTIMIZER)}
# (family, backend) for every backend that can run here (Triton on CPU through the interpreter).
CASES = [(family, backend) for family in OPTIMIZERS for backend in available_backends(family, "cpu")]
CASE_IDS = [f"{family}-{backend}" for family, backend in CASES]
# Every state tensor of each optimizer, as (key, index into a list or None).
STATE_TENSORS = {
    "hysterograd": [("G", None), ("group_tau", None), ("group_temp", None), ("avg_energy", None)],
    "biostatis": [("step", None), ("exp_avg", None), ("exp_avg_sq", None), ("memory_emas", 0), ("memory_emas", 1)],
}
GROUP_SCALARS = ("group_tau", "group_temp", "avg_energy")


def make(family, backend, shapes=((3,), (2, 2), (5,))):
    """Two param groups: the first two parameters, then the rest."""
    params = [torch.linspace(-1, 1, math.prod(s)).reshape(s).requires_grad_(True) for s in shapes]
    opt = OPTIMIZERS[family]([{"params": params[:2]}, {"params": params[2:]}], fused=backend)
    return params, opt


def set_grads(params, value=0.5):
    for p in params:
        p.grad = torch.full_like(p, value)


def stepped(family, backend, steps=2):
    params, opt = make(family, backend)
    for _ in range(steps):
        set_grads(params)
        opt.step()
    return params, opt


def snapshot(params, opt):
    """Everything a step could change, cloned."""

    def clone(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        return [clone(v) for v in value] if isinstance(value, list) else copy.deepcopy(value)

    return [p.detach().clone() for p in params], {
        id(p): {k: clone(v) for k, v in opt.state[p].items()} for p in params if p in opt.state
    }


def assert_unchanged(params, opt, before):
    before_params, before_state = before
    for p, q in zip(params, before_params):
        assert torch.equal(p.detach(), q)
    assert {id(p) for p in params if opt.state.get(p)} == set(before_state)
    for p in params:
        for key, value in before_state.get(id(p), {}).items():
            now = opt.state[p][key]
            for a, b in zip(now if isinstance(now, list) else [now], value if isinstance(value, list) else [value]):
                assert torch.equal(a, b), key


def state_slot(opt, param, key, index):
    """(container, slot) holding one state tensor: ``container[slot]`` reads and writes it."""
    entry = opt.state[param]
    return (entry[key], index) if index is not None else (entry, key)


def where(key, index, param_index, group_index):
    label = f"state '{key}'" + (f"[{index}]" if index is not None else "")
    return f"{label} of parameter {param_index} in param group {group_index}"


def wrong_tensors(tensor):
    """Tensors no kernel may read in place of ``tensor``: (what, replacement, message pattern)."""
    yield "size", torch.zeros(tensor.numel() + 997, dtype=tensor.dtype), "shape"
    yield "shape", tensor.reshape(-1, 1), "shape"
    yield "dtype", tensor.to(torch.float64 if tensor.dtype != torch.float64 else torch.float32), "dtype"
    yield "device", torch.empty_like(tensor, device="meta"), "meta"
    if tensor.dim():
        yield "layout", tensor.to_sparse(), "layout"
    yield "subclass", tensor.clone().as_subclass(Subclass), "Subclass"
    yield "type", tensor.tolist(), "not a tensor"


class Subclass(torch.Tensor):
    pass


# ---------------------------------------------------------------------------------- the report


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_state_of_a_smaller_parameter_is_refused_on_load(family, backend):
    """The report: a 3-element state loaded over a 1000-element parameter, then a step."""
    small = torch.zeros(3, requires_grad=True)
    saved = OPTIMIZERS[family]([small], fused="eager")
    small.grad = torch.ones(3)
    saved.step()
    big = torch.zeros(1000, requires_grad=True)
    opt = OPTIMIZERS[family]([big], fused=backend)
    with pytest.raises(RuntimeError, match=r"of parameter 0 in param group 0 has shape \(3,\), expected \(1000,\)"):
        opt.load_state_dict(saved.state_dict())
    assert not opt.state  # nothing was loaded
    big.grad = torch.ones(1000)
    opt.step()
    assert torch.isfinite(big).all()


# ------------------------------------------------------- checks before the step, every state tensor


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_every_wrong_state_tensor_is_refused_before_any_group_moves(family, backend):
    """Each state tensor of the second group made wrong in turn: the step refuses it by name, and neither
    group has moved (the first group, checked fine, must not have stepped either)."""
    params, opt = stepped(family, backend)
    param_index, param = 0, params[2]  # the first parameter of group 1 (HysteroGrad's scalars live there)
    for key, index in STATE_TENSORS[family]:
        container, slot = state_slot(opt, param, key, index)
        right = container[slot]
        for _, wrong, pattern in wrong_tensors(right):
            set_grads(params)
            before = snapshot(params, opt)
            container[slot] = wrong
            with pytest.raises(RuntimeError, match=re.escape(where(key, index, param_index, 1)) + f".*{pattern}"):
                opt.step()
            container[slot] = right
            assert_unchanged(params, opt, before)
    set_grads(params)
    opt.step()  # and, put right, it steps


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_a_wrong_gradient_or_a_resized_parameter_is_refused(family, backend):
    params, opt = stepped(family, backend)
    set_grads(params)
    params[1].grad.data = torch.ones(7)  # behind autograd's back
    before = snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"the gradient of parameter 1 in param group 0 has shape \(7,\)"):
        opt.step()
    assert_unchanged(params, opt, before)

    set_grads(params)
    params[2].data = torch.zeros(11)  # the parameter resized under its state
    with pytest.raises(RuntimeError, match=r"of parameter 0 in param group 1 has shape \(5,\), expected \(11,\)"):
        opt.step()


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_missing_or_foreign_state_keys_are_refused_at_the_step(family, backend):
    params, opt = stepped(family, backend)
    # HysteroGrad's G alone may be missing: the parameter then has no state (as before its first gradient).
    key, index = ("exp_avg", 1) if family == "biostatis" else ("group_tau", 0)
    entry = opt.state[params[index]]
    value = entry.pop(key)
    set_grads(params)
    with pytest.raises(RuntimeError, match=rf"state of parameter {index} in param group 0 lacks \['{key}'\]"):
        opt.step()
    entry[key] = value
    entry["momentum_buffer"] = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"has keys \['momentum_buffer'\]"):
        opt.step()


def test_memory_emas_must_be_a_list_of_one_tensor_per_decay():
    params, opt = stepped("biostatis", "eager")
    opt.state[params[0]]["memory_emas"].pop()
    set_grads(params)
    with pytest.raises(RuntimeError, match=r"'memory_emas' of parameter 0 in param group 0 must be a list .*\(2\)"):
        opt.step()


def test_partial_group_scalars_are_refused():
    params, opt = stepped("hysterograd", "eager")
    del opt.state[params[0]]["group_temp"]
    set_grads(params)
    with pytest.raises(RuntimeError, match=r"parameter 0 in param group 0 lacks \['group_temp'\]"):
        opt.step()


def test_the_check_reads_no_tensor_on_the_host(monkeypatch):
    _, opt = stepped("biostatis", "eager")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda *_: pytest.fail("host read in the check"))
    opt._check_step_inputs()


# ----------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_every_wrong_loaded_state_tensor_is_refused_and_the_optimizer_kept(family, backend):
    saved = stepped(family, "eager")[1].state_dict()
    params, opt = stepped(family, backend, steps=1)
    before = snapshot(params, opt)
    groups_before = opt.param_groups
    pid = 2  # the first parameter of group 1
    for key, index in STATE_TENSORS[family]:
        value = saved["state"][pid][key]
        right = value[index] if index is not None else value
        for what, wrong, _ in wrong_tensors(right):
            # Loading converts a state tensor to the dtype the step keeps, as torch does; a one-element
            # scalar to 0-dim, and a step count may be the original's number.
            if what == "dtype" or (right.dim() == 0 and what == "shape") or (key == "step" and what == "type"):
                continue
            broken = copy.deepcopy(saved)
            if index is not None:
                broken["state"][pid][key][index] = wrong
            else:
                broken["state"][pid][key] = wrong
            with pytest.raises((RuntimeError, TypeError), match=r"parameter 0 in param group 1"):
                opt.load_state_dict(broken)
            assert opt.param_groups is groups_before
            assert_unchanged(params, opt, before)


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_foreign_and_truncated_checkpoints_name_what_is_missing(family, backend):
    params, opt = stepped(family, backend, steps=1)
    before = snapshot(params, opt)

    adamw_params = [p.detach().clone().requires_grad_(True) for p in params]
    adamw = torch.optim.AdamW([{"params": adamw_params[:2]}, {"params": adamw_params[2:]}])
    # Before AdamW has any state its groups give it away (it would otherwise load AdamW's lr and decay).
    foreign_groups = r"param group 0 .* has \[.*'foreach'.*'maximize'.*\].*another optimizer"
    with pytest.raises(ValueError, match=foreign_groups):
        opt.load_state_dict(adamw.state_dict())
    set_grads(adamw_params)
    adamw.step()
    with pytest.raises(ValueError, match=foreign_groups):
        opt.load_state_dict(adamw.state_dict())
    # Without those keys, its state gives it away.
    stripped = adamw.state_dict()
    for group in stripped["param_groups"]:
        for key in ("foreach", "maximize", "differentiable", "amsgrad", "decoupled_weight_decay"):
            group.pop(key, None)
    required = "'G'" if family == "hysterograd" else "'memory_emas'"
    pattern = rf"parameter 0 in param group 0 lacks \[.*{required}.*\].*another optimizer"
    with pytest.raises(RuntimeError, match=pattern):
        opt.load_state_dict(stripped)
    assert_unchanged(params, opt, before)

    saved = stepped(family, "eager")[1].state_dict()
    for key in [k for k, _ in STATE_TENSORS[family] if k != "G"]:  # G alone may be missing (see below)
        broken = copy.deepcopy(saved)
        del broken["state"][1 if key not in GROUP_SCALARS else 0][key]
        with pytest.raises(RuntimeError, match=rf"lacks \[.*'{key}'.*\]"):
            opt.load_state_dict(broken)
        assert_unchanged(params, opt, before)

    broken = copy.deepcopy(saved)
    broken["state"][0]["alpha"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"has keys \['alpha'\]"):
        opt.load_state_dict(broken)
    broken = copy.deepcopy(saved)
    broken["param_groups"] = broken["param_groups"][:1]
    with pytest.raises(ValueError, match="number of parameter groups"):
        opt.load_state_dict(broken)
    assert_unchanged(params, opt, before)


def test_a_first_parameter_without_gradient_holds_the_group_scalars_alone():
    """HysteroGrad's group scalars live with the first parameter even when it has no gradient (no G)."""
    params, opt = make("hysterograd", "eager")
    for _ in range(2):
        params[1].grad = torch.full_like(params[1], 0.5)
        opt.step()
    saved = opt.state_dict()
    assert set(saved["state"][0]) == set(GROUP_SCALARS)
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    other = HysteroGrad([{"params": copies[:2]}, {"params": copies[2:]}], fused="eager")
    other.load_state_dict(saved)
    params[1].grad = torch.full_like(params[1], 0.5)
    copies[1].grad = torch.full_like(copies[1], 0.5)
    assert other.step() == opt.step()

    saved["state"][0] = {}  # G elsewhere but no group scalars: not a checkpoint of this optimizer
    with pytest.raises(RuntimeError, match="param group 0 has state but its first parameter lacks"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_a_missing_hyperparameter_takes_the_default(family, backend):
    key = "hysteresis_scale" if family == "hysterograd" else "ascent_strength"
    saved = stepped(family, "eager")[1].state_dict()
    expected_params, expected = stepped(family, "eager")
    for group in saved["param_groups"]:
        del group[key]
    params, opt = make(family, backend)
    with torch.no_grad():
        for p, q in zip(params, expected_params):
            p.copy_(q)
    opt.load_state_dict(saved)
    assert all(group[key] == opt.defaults[key] for group in opt.param_groups)
    set_grads(params)
    set_grads(expected_params)
    opt.step()
    expected.step()
    for p, q in zip(params, expected_params):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("family", OPTIMIZERS)
def test_loaded_hyperparameters_are_validated_as_the_constructor_validates_them(family):
    key = "epsilon" if family == "hysterograd" else "eps"
    params, opt = stepped(family, "eager", steps=1)
    before = snapshot(params, opt)
    lr_before = opt.param_groups[1]["lr"]
    saved = opt.state_dict()
    cases = [(key, -1.0), ("lr", math.nan), ("lr", "0.1")] + ([("epsilon", 0.0)] if family == "hysterograd" else [])
    for name, bad in cases:
        broken = copy.deepcopy(saved)
        broken["param_groups"][1][name] = bad
        with pytest.raises(ValueError, match=f"Invalid {name}") as loaded:
            opt.load_state_dict(broken)
        with pytest.raises(ValueError) as constructed:
            OPTIMIZERS[family]([torch.zeros(2, requires_grad=True)], **{name: bad}, fused="eager")
        assert str(loaded.value) == str(constructed.value)
        assert opt.param_groups[1]["lr"] == lr_before
        assert_unchanged(params, opt, before)


def test_a_zero_epsilon_from_a_checkpoint_no_longer_freezes_the_group():
    """The report: epsilon=0 loaded made τ NaN after one zero-gradient step, frozen for good."""
    params, opt = stepped("hysterograd", "eager", steps=1)
    saved = opt.state_dict()
    saved["param_groups"][0]["epsilon"] = 0.0
    with pytest.raises(ValueError, match="epsilon"):
        opt.load_state_dict(saved)
    set_grads(params, 0.0)
    opt.step()
    assert all(torch.isfinite(opt.state[params[i]]["group_tau"]) for i in (0, 2))


def test_load_state_dict_hooks_still_run():
    _, opt = stepped("hysterograd", "eager", steps=1)
    calls = []
    opt.register_load_state_dict_pre_hook(lambda optimizer, state_dict: calls.append("pre"))
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post"]


# ------------------------------------------------------------------ DTensor and other subclasses


@pytest.fixture(scope="module")
def one_rank_mesh():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_a_dtensor_group_steps_and_a_mixed_group_is_refused(family, backend, one_rank_mesh):
    """DTensor groups step their local shards (tests/test_distributed_dtensor_optim.py checks the numbers);
    a group mixing DTensors and plain tensors has no one reduction: TypeError, and the optimizer unchanged."""
    from torch.distributed.tensor import distribute_tensor

    sharded = torch.nn.Parameter(distribute_tensor(torch.zeros(4), one_rank_mesh))
    sharded.grad = distribute_tensor(torch.ones(4), one_rank_mesh)
    OPTIMIZERS[family]([sharded], fused=backend).step()
    assert sharded.to_local().ne(0).all()
    _, opt = make(family, backend)
    with pytest.raises(TypeError, match=r"param group 2 mixes DTensor and plain parameters \(parameter 1 is"):
        opt.add_param_group({"params": [sharded, torch.zeros(2, requires_grad=True)]})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("family,backend", CASES, ids=CASE_IDS)
def test_a_tensor_subclass_parameter_is_refused(family, backend):
    param = torch.zeros(3).as_subclass(Subclass).requires_grad_(True)
    with pytest.raises(TypeError, match=r"parameter 0 in param group 0 is a .*Subclass.*plain tensors"):
        OPTIMIZERS[family]([param], fused=backend)
    params, opt = stepped(family, backend, steps=1)
    opt.param_groups[1]["params"][0] = param  # swapped in after construction: the step refuses it
    set_grads(params)
    param.grad = torch.ones(3)
    with pytest.raises(TypeError, match=r"parameter 0 in param group 1 is a"):
        opt.step()


@pytest.mark.skipif("triton" not in available_backends("hysterograd", "cpu"), reason="needs Triton (interpreted)")
def test_the_triton_chunk_table_refuses_foreign_null_and_short_addresses(one_rank_mesh):
    from torch.distributed.tensor import distribute_tensor

    from curvkern.optim._triton_multi_tensor import build_table

    cpu = torch.device("cpu")
    param, grad = torch.zeros(1000), torch.zeros(1000)
    with pytest.raises(RuntimeError, match=r"tensor 0 of role 2 has 3 elements, its parameter 1000"):
        build_table([[param], [grad], [torch.zeros(3)]], cpu, 1 << 14)
    with pytest.raises(TypeError, match=r"tensor 0 of role 1 is a DTensor"):
        build_table([[param], [distribute_tensor(torch.zeros(1000), one_rank_mesh)]], cpu, 1 << 14)
    with pytest.raises(RuntimeError, match=r"is on meta"):
        build_table([[param], [torch.empty(1000, device="meta")]], cpu, 1 << 14)
    build_table([[torch.zeros(0)], [torch.zeros(0)]], cpu, 1 << 14)  # an empty tensor may have no address


# ------------------------------------------------------------------------------- fuzz, per backend


def test_broken_checkpoints_never_crash_any_backend():
    """tests/validation_fuzz.py per backend, each in a process of its own (in parallel): a memory error
    kills the process with a signal or makes glibc print its complaint."""
    script = os.path.join(os.path.dirname(__file__), "validation_fuzz.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    backends = sorted(set.intersection(*(set(available_backends(family, "cpu")) for family in OPTIMIZERS)))
    runs = {
        backend: subprocess.Popen(
            [sys.executable, script, backend], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for backend in backends
    }
    for backend, process in runs.items():
        stdout, stderr = process.communicate(timeout=600)
        if process.returncode < 0:
            pytest.fail(f"{backend}: killed by {signal.Signals(-process.returncode).name}\n{stderr[-3000:]}")
        for complaint in ("free():", "corrupted", "double free", "Segmentation fault"):
            assert complaint not in stderr, f"{backend}: {complaint}\n{stderr[-3000:]}"
        assert process.returncode == 0, f"{backend}:\n{stdout}\n{stderr[-3000:]}"
        assert stdout.count("refused") == 2, stdout


@pytest.mark.parametrize("family", OPTIMIZERS)
def test_group_keys_of_users_and_lr_schedulers_still_load(family):
    """Only torch.optim's own flags mark a foreign checkpoint: a group's name, or the keys an LR scheduler
    adds (initial_lr, max_lr, ...), load as they are."""
    params, _ = make(family, "eager")
    opt = OPTIMIZERS[family]([{"params": params[:2], "name": "encoder"}, {"params": params[2:], "name": "head"}])
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)
    saved = opt.state_dict()
    other = OPTIMIZERS[family]([{"params": params[:2], "name": "?"}, {"params": params[2:], "name": "?"}])
    other.load_state_dict(saved)
    assert [g["name"] for g in other.param_groups] == ["encoder", "head"]
    assert [g["max_lr"] for g in other.param_groups] == [0.1, 0.1]
