"""Test set-up shared by every kernel family.

A test module names its family (``FAMILY = "hysterograd"``) and takes ``backend`` and ``device``
arguments: it then runs once per backend that implements the family and can run here, so a new
backend is exercised by every existing test the day it is registered. Without CUDA, Triton runs on
CPU tensors through its interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from curvkern import available_backends  # noqa: E402  (after TRITON_INTERPRET is settled)


def backend_cases(family: str) -> list[tuple[str, str]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(backend, device) for device in devices for backend in available_backends(family, device)]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and "device" in metafunc.fixturenames:
        cases = backend_cases(metafunc.module.FAMILY)
        metafunc.parametrize("backend,device", cases, ids=[f"{b}-{d}" for b, d in cases])
