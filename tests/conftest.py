"""Test set-up shared by every kernel family.

A test module names its family (``FAMILY = get_family("hysterograd")``, from the registry in
:mod:`curvkern.families`) and takes ``backend`` and ``device`` arguments: it then runs once per
backend that implements the family and can run here, so a new backend is exercised by every existing
test the day it is registered. Without CUDA, Triton runs on
CPU tensors through its interpreter.

Hypothesis profiles, chosen with ``HYPOTHESIS_PROFILE`` (the Makefile's targets set it): ``full``
(the default: each property test's own example count), ``fast`` (a quarter of it, for ``make
test-fast``) and ``isa`` (the fewest, for the per-ISA runs of ``make test-isa``). A test takes its
count through :func:`max_examples`, so a profile scales every test alike.
"""

import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import settings
from multiprocess_ranks import free_port, init_gloo

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from curvkern import available_backends

FULL_EXAMPLES = 100  # hypothesis's own default: a profile's max_examples relative to it scales the tests
settings.register_profile("full", max_examples=FULL_EXAMPLES, deadline=None)
settings.register_profile("fast", max_examples=FULL_EXAMPLES // 4, deadline=None)
settings.register_profile("isa", max_examples=FULL_EXAMPLES // 10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "full"))


# make test-isa runs the fused-vs-eager tests once per ISA combination: on small shapes only.
SMALL_SHAPES = os.environ.get("CURVKERN_TEST_SMALL_SHAPES", "0") == "1"


def max_examples(full: int) -> int:
    """A property test's example count under the loaded profile (``full`` under "full"), at least 2."""
    return max(2, full * settings().max_examples // FULL_EXAMPLES)


def backend_cases(family: str) -> list[tuple[str, str]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(backend, device) for device in devices for backend in available_backends(family, device)]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and "device" in metafunc.fixturenames:
        cases = backend_cases(metafunc.module.FAMILY.name)
        metafunc.parametrize("backend,device", cases, ids=[f"{b}-{d}" for b, d in cases])


@pytest.fixture
def one_rank_mesh():
    """A 1-rank gloo group on 127.0.0.1 in this process and its CPU device mesh, destroyed afterwards: for the
    checks a DTensor argument meets before any collective."""
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs gloo and no default process group in this process")
    from torch.distributed.device_mesh import init_device_mesh

    init_gloo(0, 1, free_port(), timeout_s=60)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
