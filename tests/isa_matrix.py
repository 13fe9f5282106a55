"""Runs the ``fused_vs_eager`` tests once per CPU code path this machine can take, on small shapes.

Each combination of ``CURVKERN_CPU_CAPABILITY`` (curvkern's own C++ kernels; the values
``curvkern._dispatch.cpu_capabilities()`` lists for this CPU) and ``ATEN_CPU_CAPABILITY`` (torch's
kernels, which the eager reference runs on; default, avx2, avx512 up to what this CPU supports, on
other architectures default) runs in its own pytest process, since both are read once at start-up.
CURVKERN_CPU_CAPABILITY changes only the C++ backend's kernels: under its first value every marked
test runs, under the others only the tests that involve ``cpp`` (``-k cpp``), so each test meets
every combination that can change its result. Exits non-zero if any combination fails, after
running them all. Two combinations run at a time, each with one OpenMP thread.

Usage: ``python tests/isa_matrix.py [extra pytest arguments]`` (``make test-isa``).
"""

import concurrent.futures
import glob
import itertools
import os
import subprocess
import sys
import time

os.environ.pop("ATEN_CPU_CAPABILITY", None)  # detect what the CPU supports, not what was forced
os.environ.pop("CURVKERN_CPU_CAPABILITY", None)

import torch

from curvkern._dispatch import cpu_capabilities

ATEN_CAPABILITIES = ["default", "avx2", "avx512"]  # ascending; what ATEN_CPU_CAPABILITY accepts on x86


def aten_capabilities() -> list[str]:
    best = torch.backends.cpu.get_cpu_capability().lower()
    if best not in ATEN_CAPABILITIES:  # aarch64, POWER, s390x: only the default path can be forced
        return ["default"]
    return ATEN_CAPABILITIES[: ATEN_CAPABILITIES.index(best) + 1]


def run_one(ours: str, aten: str, first: bool, tests: list[str], pytest_args: list[str]) -> tuple[str, int, str, float]:
    """One combination's pytest process: (its label, exit code, output, seconds)."""
    env = dict(
        os.environ,
        CURVKERN_CPU_CAPABILITY=ours,
        ATEN_CPU_CAPABILITY=aten,
        HYPOTHESIS_PROFILE="isa",
        CURVKERN_TEST_SMALL_SHAPES="1",
        OMP_NUM_THREADS="1",  # two processes at a time share the cores
    )
    only_cpp = [] if first else ["-k", "cpp"]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "fused_vs_eager",
        *only_cpp,
        *tests,
        *pytest_args,
    ]
    started = time.monotonic()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    label = f"CURVKERN_CPU_CAPABILITY={ours} ATEN_CPU_CAPABILITY={aten}"
    return label, done.returncode, done.stdout, time.monotonic() - started


def marked_modules(directory: str) -> list[str]:
    """The test modules that use the mark: each process then imports and collects those alone (the others'
    imports, transformers among them, cost seconds a process)."""
    modules = sorted(glob.glob(os.path.join(directory, "test_*.py")))
    return [path for path in modules if "pytest.mark.fused_vs_eager" in open(path, encoding="utf-8").read()]


def main(pytest_args: list[str]) -> int:
    """Two combinations at a time (each pytest process spends much of its time importing and collecting, on
    one core), reported in the matrix's order."""
    tests = marked_modules(os.path.dirname(os.path.abspath(__file__)))
    ours_capabilities = cpu_capabilities()
    combinations = list(itertools.product(ours_capabilities, aten_capabilities()))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = [
            pool.submit(run_one, ours, aten, ours == ours_capabilities[0], tests, pytest_args)
            for ours, aten in combinations
        ]
        failed = []
        for run in runs:
            label, code, output, seconds = run.result()
            summary = output.strip().splitlines()[-1] if output.strip() else ""
            print(f"{label}: {summary} ({seconds:.0f} s)", flush=True)
            if code != 0:
                print(output[-6000:], flush=True)
                failed.append(label)
    if failed:
        print("failed under:", *failed, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
