"""The one dispatch point: fused= choices, the auto rule, and errors instead of fallbacks."""

import dataclasses
import re
import warnings

import pytest
import torch

from curvkern import _dispatch, families
from curvkern.families import FAMILIES


@pytest.fixture
def toy_family(monkeypatch):
    """A family with an eager and a cpp implementation, registered only for the test."""
    monkeypatch.setitem(FAMILIES, "toy", dataclasses.replace(FAMILIES["hysterograd"], name="toy"))
    monkeypatch.setattr(_dispatch, "_REGISTRY", dict(_dispatch._REGISTRY))
    monkeypatch.setattr(_dispatch, "_warned", set())
    _dispatch.register("toy", "eager")(lambda: "eager")
    _dispatch.register("toy", "cpp")(lambda: "cpp")
    return "toy"


def test_check_fused_rejects_unknown_values():
    for good in _dispatch.FUSED_CHOICES:
        assert _dispatch.check_fused(good) == good
    for bad in ["fused", "cuda", True, None, "CPP"]:
        with pytest.raises(ValueError, match="fused must be one of"):
            _dispatch.check_fused(bad)


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        _dispatch.register("toy", "numba")


# The optimizers' class names, and a near miss: all unknown to the registry, which knows families by name.
UNKNOWN_FAMILIES = ["HysteroGrad", "BiostatisV6", "cross-entropy", "toy", ""]


@pytest.mark.parametrize("name", UNKNOWN_FAMILIES)
def test_an_unknown_family_raises_naming_the_known_ones(name):
    known = re.escape(str(sorted(FAMILIES)))
    with pytest.raises(ValueError, match=rf"unknown kernel family {re.escape(repr(name))}; known families: {known}"):
        families.get_family(name)
    with pytest.raises(ValueError, match="unknown kernel family"):
        _dispatch.register(name, "eager")
    for fused in _dispatch.FUSED_CHOICES:
        with pytest.raises(ValueError, match="unknown kernel family"):
            _dispatch.select(name, fused, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown kernel family"):
        _dispatch.available_backends(name, "cpu")
    assert (name, "eager") not in _dispatch._REGISTRY


def test_a_backend_its_family_does_not_list_is_refused(toy_family, monkeypatch):
    monkeypatch.setitem(FAMILIES, toy_family, dataclasses.replace(FAMILIES[toy_family], backends=("eager",)))
    with pytest.raises(ValueError, match=r"toy: backend 'triton' is not among its Family entry's backends \('eager',"):
        _dispatch.register(toy_family, "triton")


def test_an_unknown_kind_of_family_raises():
    with pytest.raises(ValueError, match="unknown kind of kernel family 'metric'"):
        families.families_of_kind("metric")
    assert [f.name for f in families.families_of_kind(families.OPTIMIZER)] == ["hysterograd", "biostatis"]
    assert [f.name for f in families.families_of_kind(families.LOSS)] == ["cross_entropy"]
    assert [f.name for f in families.families_of_kind(families.LINEAR_LOSS)] == ["linear_cross_entropy"]


def test_extension_is_built_here():
    # CI builds the extension; a missing build must fail loudly, not skip every cpp test.
    assert _dispatch.cpp_unavailable_reason() is None


def test_auto_prefers_cpp_on_cpu(toy_family):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend, impl = _dispatch.select(toy_family, "auto", torch.device("cpu"))
    assert (backend, impl()) == ("cpp", "cpp")


def test_auto_falls_back_to_eager_once_with_a_reason(toy_family, monkeypatch):
    monkeypatch.setattr(_dispatch, "cpp_unavailable_reason", lambda: "the C++ extension curvkern._C is not built")
    with pytest.warns(RuntimeWarning, match="eager reference because the C\\+\\+ extension"):
        assert _dispatch.select(toy_family, "auto", torch.device("cpu"))[0] == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select(toy_family, "auto", torch.device("cpu"))[0] == "eager"


def test_auto_on_cuda_without_a_triton_kernel_warns_and_runs_eager(toy_family):
    with pytest.warns(RuntimeWarning, match="toy: fused='triton' has no kernel"):
        assert _dispatch.select(toy_family, "auto", torch.device("cuda"))[0] == "eager"


def test_explicit_backend_that_cannot_run_raises(toy_family, monkeypatch):
    with pytest.raises(RuntimeError, match="fused='cpp' runs on CPU tensors"):
        _dispatch.select(toy_family, "cpp", torch.device("meta"))
    monkeypatch.setattr(_dispatch, "cpp_unavailable_reason", lambda: "not built")
    with pytest.raises(RuntimeError, match="not built"):
        _dispatch.select(toy_family, "cpp", torch.device("cpu"))
    assert _dispatch.available_backends(toy_family, "cpu") == ["eager"]


def test_explicit_backend_without_a_kernel_raises_not_implemented(toy_family, monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda device: None)
    with pytest.raises(NotImplementedError, match="toy: fused='triton' has no kernel"):
        _dispatch.select(toy_family, "triton", torch.device("cuda"))


def test_every_backend_a_family_lists_is_registered():
    for family in FAMILIES.values():
        for backend in family.backends:
            assert (family.name, backend) in _dispatch._REGISTRY, (family.name, backend)
    assert {family for family, _ in _dispatch._REGISTRY} == set(FAMILIES)


def test_every_family_has_every_backend():
    for family in ("hysterograd", "biostatis", "cross_entropy"):
        assert FAMILIES[family].backends == _dispatch.BACKENDS
        for backend in _dispatch.BACKENDS:
            assert (family, backend) in _dispatch._REGISTRY, (family, backend)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _dispatch.triton_unavailable_reason(torch.device("cpu"))
    assert "CUDA tensors" in _dispatch.triton_unavailable_reason(torch.device("meta"))
    assert _dispatch.triton_unavailable_reason(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.triton_unavailable_reason(torch.device("cpu")) is None


def test_without_triton_a_cpu_tensor_is_told_both_requirements(monkeypatch):
    """One message with everything a CPU user needs: installing Triton, then the interpreter."""
    monkeypatch.setattr(_dispatch, "_triton_installed", False)
    cpu_reason = _dispatch.triton_unavailable_reason(torch.device("cpu"))
    assert "pip install triton" in cpu_reason and "TRITON_INTERPRET=1" in cpu_reason
    cuda_reason = _dispatch.triton_unavailable_reason(torch.device("cuda"))
    assert "pip install triton" in cuda_reason and "TRITON_INTERPRET" not in cuda_reason


def test_eager_is_always_available():
    for family in FAMILIES:
        assert _dispatch.available_backends(family, "cpu")[0] == "eager"
        assert "eager" in _dispatch.available_backends(family, "meta")
