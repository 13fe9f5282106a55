"""curvkern._C end to end: the bandwidth probe op, its fake implementation, both build systems."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from disassembly import extension_symbols, has_omp_body

from curvkern import bandwidth

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [0, 1, 7, 1000, 65537])
def test_stream_axpy_matches_torch(dtype, numel):
    gen = torch.Generator().manual_seed(numel)
    a, b = torch.randn(numel, generator=gen, dtype=dtype), torch.randn(numel, generator=gen, dtype=dtype)
    expected = a + 0.75 * b
    assert bandwidth.stream_axpy_(a, b, 0.75) is a
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-15 if dtype == torch.float64 else 1e-6)


def test_stream_axpy_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="one dtype"):
        bandwidth.stream_axpy_(torch.ones(8), torch.ones(8, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="one shape"):
        bandwidth.stream_axpy_(torch.ones(8), torch.ones(9), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        bandwidth.stream_axpy_(torch.ones(8), torch.ones(16)[::2], 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        bandwidth.stream_axpy_(torch.ones(8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), 1.0)


def test_torch_compile_traces_the_op():
    """Through the fake implementation, in one graph (opcheck on the op itself: tests/test_ops.py)."""
    a, b = torch.randn(33), torch.randn(33)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def axpy(a, b):
        out = a.clone()
        torch.ops.curvkern.stream_axpy_(out, b, 2.0)
        return out * 1

    torch.testing.assert_close(axpy(a, b), a + 2.0 * b)


def test_bandwidth_probe_reports_a_plausible_figure():
    probe = bandwidth.bandwidth_probe("cpu", numel=1 << 20)
    assert probe.bytes_moved == 3 * 4 * (1 << 20)
    assert 0.1 < bandwidth.measure_bandwidth("cpu", numel=1 << 20, repeats=3) < 10_000


@pytest.mark.skipif(platform.machine() != "x86_64", reason="ISA versions exist on x86-64 only")
def test_kernel_is_cloned_per_isa():
    """Runtime dispatch, not -march=native: the library carries an avx512, an avx2 and a baseline version."""
    symbols = extension_symbols()
    # Each version has its own OpenMP-outlined loop body, where the vector code is.
    for isa in ("avx512", "avx2", "default"):
        assert has_omp_body(symbols, "axpy_f32", isa), isa


@pytest.mark.slow  # compiles the whole extension a second time
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_the_same_extension(tmp_path):
    """The CMake route builds and loads the same sources. Unoptimised (Debug with -O0, no -g): the kernels' code
    generation is checked on setup.py's build (test_kernel_is_cloned_per_isa and the disassembly
    tests), and -O3 would take minutes more here."""
    prefix = subprocess.check_output(
        [sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"], text=True
    ).strip()
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Debug",
            "-DCMAKE_CXX_FLAGS_DEBUG=-O0",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, env=env)
    (library,) = build.glob("_C*.so")
    check = (
        "import torch, sys; torch.ops.load_library(sys.argv[1]); "
        "a = torch.ones(5); torch.ops.curvkern.stream_axpy_(a, torch.ones(5), 2.0); "
        "assert torch.equal(a, torch.full((5,), 3.0)), a"
    )
    subprocess.run([sys.executable, "-c", check, str(library)], check=True)
