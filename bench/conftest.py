"""pytest-benchmark suites: benchmarks, not tests. The cases come from :mod:`curvkern.bench.cases`, the
same as the main job's (``python -m curvkern.bench``).

Run on the CPU (the default sizes move several GiB per case; ``--quick`` for tiny ones)::

    pytest bench/ --benchmark-json=bench.json

on a GPU, every backend that can run on CUDA tensors (Triton included) against fused AdamW::

    pytest bench/ --device cuda --benchmark-json=bench.json

then render the same table, bench-report.json and bench-report.png as the main job::

    python -m curvkern.bench.report --from-pytest-benchmark bench.json --out DIR
"""

import pytest
import torch

from curvkern.bench.cases import build_cases
from curvkern.bench.report import collect_machine_info
from curvkern.bench.timing import BUDGET_S, QUICK_BUDGET_S


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu", help="where the benchmarks run")
    parser.addoption("--quick", action="store_true", help="tiny sizes: checks the plumbing, measures nothing")


def _device(config) -> torch.device:
    return torch.device(config.getoption("--device"))


def pytest_configure(config):
    if _device(config).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device is available")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = build_cases(_device(metafunc.config), metafunc.config.getoption("--quick"))
        cases = [case for case in cases if case.suite == metafunc.module.SUITE]
        metafunc.parametrize("case", cases, ids=[case.name for case in cases])


def pytest_benchmark_update_machine_info(config, machine_info):
    # What report_from_pytest_benchmark reads back as the report's machine fields.
    machine_info["curvkern"] = collect_machine_info(_device(config))


@pytest.fixture
def device(request) -> torch.device:
    return _device(request.config)


@pytest.fixture
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture
def budget_s(quick) -> float:
    return QUICK_BUDGET_S if quick else BUDGET_S
