"""Broken checkpoints against one backend, in a process of its own (run by tests/test_validation.py).

``python tests/validation_fuzz.py BACKEND`` loads, into both optimizers with ``fused=BACKEND``, checkpoints
whose state is mismatched (size, shape, dtype, device, layout, type), truncated (a key, the group
scalars, a hyperparameter, a param group missing) or foreign (AdamW's, random keys), then steps. Each
case must end in a clean RuntimeError, ValueError or TypeError, or in a finite step where a default
legitimately fills in; a failed load must leave the optimizer as it was. A memory error would kill the
process instead (the caller checks for a signal and for glibc's messages). Prints one line per optimizer.
"""

from __future__ import annotations

import copy
import math
import sys

import torch

from curvkern.optim import BiostatisV6, HysteroGrad

CLEAN = (RuntimeError, ValueError, TypeError)
SHAPES = [(3,), (2, 2), (5,)]  # two groups: the first two parameters, then the third


def make_params():
    return [torch.linspace(-1, 1, math.prod(s)).reshape(s).requires_grad_(True) for s in SHAPES]


def make(cls, params, fused):
    return cls([{"params": params[:2]}, {"params": params[2:]}], fused=fused)


def set_grads(params):
    for p in params:
        p.grad = torch.full_like(p, 0.5)


def saved_state(cls):
    params = make_params()
    opt = make(cls, params, "eager")
    for _ in range(2):
        set_grads(params)
        opt.step()
    return opt.state_dict()


def wrong_values(value: torch.Tensor, converted: bool):
    """(what, replacement, loads): replacements for a state tensor. Those that ``loads`` are converted on
    load as torch converts state (another dtype; one element for a scalar); no kernel may read the others
    in its place. With ``converted`` False, only the others (each conversion costs an interpreted step)."""
    yield "1000 elements", torch.zeros(1000), False
    yield "same numel, other shape", value.reshape(-1, 1), not value.dim()
    if converted:
        yield "int32", value.to(torch.int32), True
    yield "meta device", value.to("meta"), False
    if value.dim():
        yield "sparse", value.to_sparse(), False
    yield "a string", "x", False
    yield "None", None, False


def state_cases(saved):
    """(label, checkpoint, loads) for every state key of parameters 0 and 2 (the first of each group).
    ``key == "G"``: only HysteroGrad has it."""
    for pid in (0, 2):
        for key, value in saved["state"][pid].items():
            tensors = value if isinstance(value, list) else [value]
            for j, tensor in enumerate(tensors):
                for what, wrong, loads in wrong_values(tensor, converted=pid == 0):
                    broken = copy.deepcopy(saved)
                    if isinstance(value, list):
                        broken["state"][pid][key][j] = wrong
                    else:
                        broken["state"][pid][key] = wrong
                    yield f"state[{pid}][{key!r}]{f'[{j}]' if isinstance(value, list) else ''}: {what}", broken, loads
            broken = copy.deepcopy(saved)
            del broken["state"][pid][key]
            # The first parameter of a HysteroGrad group may hold the group scalars alone (no gradient yet).
            yield f"state[{pid}] without {key!r}", broken, key == "G"
        broken = copy.deepcopy(saved)
        broken["state"][pid]["momentum_buffer"] = torch.zeros(1)
        yield f"state[{pid}] with a foreign key", broken, False


def truncated_and_foreign_cases(saved, cls):
    broken = copy.deepcopy(saved)
    broken["param_groups"] = broken["param_groups"][:1]
    yield "one param group fewer", broken, False
    broken = copy.deepcopy(saved)
    broken["param_groups"][1]["params"].append(7)
    yield "a param group of another size", broken, False
    broken = copy.deepcopy(saved)
    del broken["param_groups"][1]["params"]
    yield "a param group without params", broken, False
    broken = copy.deepcopy(saved)
    broken["state"][1] = "garbage"
    yield "a state entry that is not a dict", broken, False
    broken = copy.deepcopy(saved)
    broken["state"][0] = {"alpha": torch.zeros(3), 5: [1, 2]}
    yield "random keys", broken, False
    yield "no state at all", {"param_groups": saved["param_groups"]}, False
    for bad in (-1.0, math.nan, math.inf, "0.1", None):
        broken = copy.deepcopy(saved)
        broken["param_groups"][1]["lr"] = bad
        yield f"lr={bad!r}", broken, False
    eps_key = "epsilon" if cls is HysteroGrad else "eps"
    broken = copy.deepcopy(saved)
    broken["param_groups"][0][eps_key] = -1.0
    yield f"{eps_key}=-1", broken, False

    params = make_params()
    adamw = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
    set_grads(params)
    adamw.step()
    yield "AdamW's checkpoint", adamw.state_dict(), False


def default_cases(saved):
    """A hyperparameter the checkpoint lacks takes the default: these must step."""
    for key in [k for k in saved["param_groups"][0] if k != "params"][:2]:
        broken = copy.deepcopy(saved)
        for group in broken["param_groups"]:
            del group[key]
        yield f"without hyperparameter {key!r}", broken


def run(cls, fused: str) -> tuple[int, int]:
    saved = saved_state(cls)
    params = make_params()
    opt = make(cls, params, fused)
    set_grads(params)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    rejected = converted = 0
    for label, checkpoint, loads in [*state_cases(saved), *truncated_and_foreign_cases(saved, cls)]:
        case = f"{cls.__name__} {fused} {label}"
        loaded = False
        try:
            opt.load_state_dict(checkpoint)
            loaded = True
            set_grads(params)
            opt.step()
        except CLEAN as exc:
            assert not loads, f"{case}: refused ({exc})"
            rejected += 1
            if not loaded:  # a refused load leaves the optimizer as it was
                torch.testing.assert_close(opt.state_dict(), before, rtol=0, atol=0, msg=case)
        except Exception as exc:
            raise AssertionError(f"{case}: raised {type(exc).__name__}: {exc}") from exc
        else:
            assert loads, f"{case}: loaded and stepped"
            assert all(torch.isfinite(p).all() for p in params), f"{case}: not finite"
            converted += 1
        if loaded:
            opt.load_state_dict(before)
    set_grads(params)
    opt.step()  # and it still steps

    stepped = 0
    for label, checkpoint in default_cases(saved):
        fresh = make_params()
        other = make(cls, fresh, fused)
        other.load_state_dict(checkpoint)
        set_grads(fresh)
        other.step()
        assert all(torch.isfinite(p).all() for p in fresh), f"{cls.__name__} {fused} {label}: not finite"
        stepped += 1
    return rejected, converted + stepped


def reported_case(cls, fused: str) -> None:
    """The report: a 3-element checkpoint loaded over a 1000-element parameter, then a step."""
    small = torch.zeros(3, requires_grad=True)
    opt = cls([small], fused="eager")
    small.grad = torch.ones(3)
    opt.step()
    big = torch.zeros(1000, requires_grad=True)
    other = cls([big], fused=fused)
    try:
        other.load_state_dict(opt.state_dict())
    except CLEAN:
        return
    big.grad = torch.ones(1000)
    try:
        other.step()
    except CLEAN:
        return
    raise AssertionError(f"{cls.__name__} {fused}: a 3-element state over 1000 elements loaded and stepped")


if __name__ == "__main__":
    backend = sys.argv[1]
    for optimizer in (HysteroGrad, BiostatisV6):
        reported_case(optimizer, backend)
        rejected, stepped = run(optimizer, backend)
        print(
            f"{optimizer.__name__} {backend}: {rejected} refused, {stepped} converted or defaulted and stepped",
            flush=True,
        )
