"""``torch.library.opcheck`` on every op of ``torch.ops.curvkern``, once per sample input of tests/op_samples.py,
and a check that the sample table covers exactly the registered ops: an op added to csrc/registration.cpp (or a
``torch.library.custom_op`` such as the Triton steps' in curvkern/optim/*/triton.py) without samples fails here.

opcheck's default checks run: test_schema (the schema's aliasing and mutation annotations are what the kernel
does), test_autograd_registration, test_faketensor (the fake implementations in curvkern/**/cpp.py,
curvkern/optim/*/triton.py and curvkern/bandwidth.py give the real outputs' shapes, dtypes and strides) and
test_aot_dispatch_dynamic (the op traces and runs under AOTAutograd with dynamic shapes, as torch.compile uses it).
"""

import inspect

import pytest
import torch
from op_samples import SAMPLES, registered_ops, resolve

import curvkern
import curvkern.bandwidth  # noqa: F401  (registers stream_axpy_'s)
from curvkern._dispatch import cpp_unavailable_reason

pytestmark = pytest.mark.skipif(cpp_unavailable_reason() is not None, reason="curvkern._C is not built")

OPCHECK_DEFAULT_CHECKS = inspect.signature(torch.library.opcheck).parameters["test_utils"].default

# cpu_capability and cpu_capabilities return str and str[]: test_aot_dispatch_dynamic compares the eager and
# the traced results with torch.testing.assert_close, which has no comparison for strings, and an op without
# tensors has nothing for AOTAutograd to trace. test_ops_without_tensors_run_and_match_their_schemas checks them.
SKIPPED_CHECKS = {
    "cpu_capability": {"test_aot_dispatch_dynamic"},
    "cpu_capabilities": {"test_aot_dispatch_dynamic"},
}

# make test-fast checks each op on its first samples (the plain dtypes and layouts); make test on all of them.
FAST_SAMPLES_PER_OP = 6
CASES = [
    pytest.param(
        op_name,
        sample,
        id=f"{op_name}-{sample.name}",
        marks=pytest.mark.slow if index >= FAST_SAMPLES_PER_OP else (),
    )
    for op_name in sorted(SAMPLES)
    for index, sample in enumerate(SAMPLES[op_name])
]


@pytest.mark.parametrize("op_name,sample", CASES)
def test_opcheck(op_name, sample):
    checks = [check for check in OPCHECK_DEFAULT_CHECKS if check not in SKIPPED_CHECKS.get(op_name, set())]
    torch.library.opcheck(resolve(op_name), sample.make_args(), test_utils=checks)


def test_every_registered_op_has_samples():
    missing = [op_name for op_name in registered_ops() if not SAMPLES.get(op_name)]
    assert not missing, f"ops without sample inputs in tests/op_samples.py: {missing}"


def test_the_tables_name_only_registered_ops():
    registered = set(registered_ops())
    unknown = sorted((set(SAMPLES) | set(SKIPPED_CHECKS)) - registered)
    assert not unknown, f"tests/op_samples.py or SKIPPED_CHECKS name ops curvkern does not register: {unknown}"


def test_checks_are_skipped_only_for_ops_without_tensors():
    def has_tensors(op_name):
        schema = resolve(op_name)._schema
        types = [str(a.type) for a in (*schema.arguments, *schema.returns)]
        return any("Tensor" in t for t in types)

    assert not [op_name for op_name in SKIPPED_CHECKS if has_tensors(op_name)]
    assert all(check in OPCHECK_DEFAULT_CHECKS for checks in SKIPPED_CHECKS.values() for check in checks)


def test_ops_without_tensors_run_and_match_their_schemas():
    """What test_aot_dispatch_dynamic cannot check for them: they run, and return the types their schemas say."""
    ops = torch.ops.curvkern
    assert str(ops.cpu_capability.default._schema) == "curvkern::cpu_capability() -> str"
    assert str(ops.cpu_capabilities.default._schema) == "curvkern::cpu_capabilities() -> str[]"
    capabilities = ops.cpu_capabilities()
    assert isinstance(capabilities, list) and all(isinstance(c, str) for c in capabilities)
    assert capabilities[0] == "default"
    capability = ops.cpu_capability()
    assert isinstance(capability, str) and capability in capabilities
