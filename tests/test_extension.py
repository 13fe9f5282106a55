"""curvkern._C end to end: the bandwidth probe op, its fake implementation, both build systems."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvkern import bandwidth

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [0, 1, 7, 1000, 65537])
def test_stream_triad_matches_torch(dtype, numel):
    gen = torch.Generator().manual_seed(numel)
    a, b = torch.randn(numel, generator=gen, dtype=dtype), torch.randn(numel, generator=gen, dtype=dtype)
    out = torch.full((numel,), float("nan"), dtype=dtype)
    bandwidth.stream_triad_(out, a, b, 0.75)
    torch.testing.assert_close(out, a + 0.75 * b, rtol=0, atol=1e-15 if dtype == torch.float64 else 1e-6)


def test_stream_triad_rejects_bad_inputs():
    a = torch.ones(8)
    with pytest.raises(RuntimeError, match="one dtype"):
        bandwidth.stream_triad_(torch.empty(8), a, torch.ones(8, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="one shape"):
        bandwidth.stream_triad_(torch.empty(8), a, torch.ones(9), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        bandwidth.stream_triad_(torch.empty(8), a, torch.ones(16)[::2], 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ints = torch.ones(8, dtype=torch.int32)
        bandwidth.stream_triad_(ints.clone(), ints, ints, 1.0)


def test_opcheck_and_torch_compile_trace_the_op():
    a, b, out = torch.randn(33), torch.randn(33), torch.empty(33)
    torch.library.opcheck(torch.ops.curvkern.stream_triad_.default, (out, a, b, 2.0))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def triad(a, b):
        out = torch.empty_like(a)
        torch.ops.curvkern.stream_triad_(out, a, b, 2.0)
        return out * 1

    torch.testing.assert_close(triad(a, b), a + 2.0 * b)


def test_bandwidth_probe_reports_a_plausible_figure():
    gbps = bandwidth.measure_cpu_bandwidth(numel=1 << 20, repeats=3)
    assert 0.1 < gbps < 10_000


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_the_same_extension(tmp_path):
    prefix = subprocess.check_output([sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"], text=True).strip()
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    f"-DPython3_EXECUTABLE={sys.executable}"], check=True, capture_output=True, env=env)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, env=env)
    (library,) = build.glob("_C*.so")
    check = (
        "import torch, sys; torch.ops.load_library(sys.argv[1]); "
        "a = torch.ones(5); out = torch.empty(5); torch.ops.curvkern.stream_triad_(out, a, a, 2.0); "
        "assert torch.equal(out, torch.full((5,), 3.0)), out"
    )
    subprocess.run([sys.executable, "-c", check, str(library)], check=True)
