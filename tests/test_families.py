"""The kernel-family contract (curvkern/families.py, curvkern/hyperparameters.py), for every family in the
registry: each registered implementation has its kind's Protocol's signature, the public API takes its
defaults from the family's hyperparameter record, the docs page exists, and every sample call runs on
every backend that can run here and agrees with the eager reference.

A new family inherits all of these the day its Family entry lands.
"""

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from conftest import backend_cases
from tolerance import FP64_FUSED_CAP, assert_relative_error

from curvkern import _dispatch
from curvkern.families import FAMILIES, LINEAR_LOSS, LOSS, OPTIMIZER, PROTOCOLS, Family, get_family

ROOT = Path(__file__).resolve().parents[1]
# Triton's interpreter computes with numpy, which warns on the masked-out lanes of ignored rows.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")
ALL_FAMILIES = pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
REGISTERED = sorted(_dispatch._REGISTRY)


def contract(protocol: type) -> dict[str, inspect.Signature]:
    """The signature of each method the Protocol requires (``__call__`` without ``self``)."""
    members = {}
    for name, value in vars(protocol).items():
        if name == "__call__":
            signature = inspect.signature(value)
            members[name] = signature.replace(parameters=list(signature.parameters.values())[1:])
        elif not name.startswith("_") and isinstance(value, staticmethod):
            members[name] = inspect.signature(value.__func__)
    assert members, f"{protocol.__name__} requires nothing"
    return members


def shape_of(signature: inspect.Signature) -> list[tuple]:
    """What a caller relies on: the names, kinds and defaults of the parameters, in order."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("family_name,backend", REGISTERED, ids=[f"{f}-{b}" for f, b in REGISTERED])
def test_every_registered_implementation_satisfies_its_familys_protocol(family_name, backend):
    family = get_family(family_name)
    implementation = _dispatch._REGISTRY[(family_name, backend)]
    for name, expected in contract(family.protocol).items():
        if name == "__call__":
            assert inspect.isfunction(implementation), f"{family_name}/{backend} must register a function"
            function = implementation
        else:
            assert isinstance(inspect.getattr_static(implementation, name), staticmethod), (backend, name)
            function = getattr(implementation, name)
        assert shape_of(inspect.signature(function)) == shape_of(expected), (backend, name)
        hyperparameters = inspect.signature(function, eval_str=True).parameters["hyperparameters"]
        assert hyperparameters.annotation is family.hyperparameters, (backend, name)


def test_each_kind_has_a_protocol_and_every_family_a_known_kind():
    assert set(PROTOCOLS) == {OPTIMIZER, LOSS, LINEAR_LOSS}
    assert all(family.kind in PROTOCOLS and family.name == key for key, family in FAMILIES.items())


@ALL_FAMILIES
def test_the_public_api_takes_its_defaults_from_the_hyperparameter_record(family: Family):
    defaults = family.hyperparameters()
    names = [field.name for field in dataclasses.fields(defaults)]
    parameters = inspect.signature(family.api).parameters
    for name in names:
        assert parameters[name].default == getattr(defaults, name), name
    if family.kind == OPTIMIZER:
        # The constructor's positional hyperparameters, in the record's order, and nothing else in a group.
        assert list(parameters)[1 : 1 + len(names)] == names
        optimizer = family.api([torch.zeros(2, requires_grad=True)], fused="eager")
        assert list(optimizer.defaults) == names
        assert optimizer.family == family.name


def loosely_typed(value):
    """A valid value as a user may give it: a whole float as an int, a tuple as a list."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@pytest.mark.parametrize("family", [f for f in FAMILIES.values() if f.kind == OPTIMIZER], ids=lambda f: f.name)
def test_the_record_a_step_receives_holds_the_groups_values(family: Family):
    defaults = family.hyperparameters()
    group = dataclasses.asdict(defaults)
    family.hyperparameters.validate(group)
    assert family.hyperparameters.from_group(group, torch.device("cpu")) == defaults
    # A validated group may hold ints and lists; the backends receive floats and tuples.
    record = family.hyperparameters.from_group(
        {key: loosely_typed(value) for key, value in group.items()}, torch.device("cpu")
    )
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        assert type(value) is type(getattr(defaults, field.name)), field.name
        assert value == getattr(defaults, field.name), field.name


@ALL_FAMILIES
def test_the_docs_page_and_the_public_api_exist(family: Family):
    assert (ROOT / family.docs).is_file()
    assert family.public.startswith("curvkern.")
    if family.kind == OPTIMIZER:
        assert issubclass(family.api, torch.optim.Optimizer)
    else:
        assert callable(family.api)


def outcome(family: Family, sample, fused: str) -> list[torch.Tensor]:
    """What a sample's call computes on ``fused``: the parameters after two steps (an optimizer), or the
    loss, its gradients to the arguments that require grad (the logits; hidden and weight) and the double
    backward along fixed tangents (a loss of either kind)."""
    if family.kind == OPTIMIZER:
        (params,) = sample.args
        optimizer = family.api(*sample.args, fused=fused, **sample.kwargs)
        optimizer.step()
        optimizer.step()
        return [p.detach() for p in params]
    inputs = [arg for arg in sample.args if isinstance(arg, torch.Tensor) and arg.requires_grad]
    assert inputs, f"{family.name}: a loss sample needs an argument that requires grad"
    loss = family.api(*sample.args, fused=fused, **sample.kwargs)
    grads = torch.autograd.grad(loss.sum(), inputs, create_graph=True)
    tangents = [torch.linspace(-1, 1, x.numel(), dtype=x.dtype, device=x.device).view_as(x) for x in inputs]
    hvps = torch.autograd.grad(grads, inputs, tangents)
    return [loss.detach(), *(grad.detach() for grad in grads), *hvps]


@ALL_FAMILIES
def test_every_sample_runs_on_every_backend_and_agrees_with_eager(family: Family):
    """fp64, kind (a) of tests/tolerance.py: two implementations of one formula agree to 1e-12."""
    assert family.sample_hyperparameters[0] == ("defaults", {})
    for backend, device in backend_cases(family.name):
        samples = family.samples(device, torch.float64)
        assert [s.label for s in samples] == [label for label, _ in family.sample_hyperparameters]
        for sample, reference in zip(samples, family.samples("cpu", torch.float64)):
            got, expected = outcome(family, sample, backend), outcome(family, reference, "eager")
            for index, (a, b) in enumerate(zip(got, expected, strict=True)):
                assert_relative_error(a.cpu(), b, FP64_FUSED_CAP, label=f"{backend} {sample.label} [{index}]")
