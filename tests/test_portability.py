"""The C++ kernels on other machines: aarch64 code generation (cross-compiled here) and every x86-64 ISA
version, forced with CURVKERN_CPU_CAPABILITY, on this CPU.

Cross-compiling needs Debian's g++-aarch64-linux-gnu (`make cross-compiler` installs it). Without it the
aarch64 tests skip, except under CI=true, where a check that did not run is a failure.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from disassembly import count, function_bodies, has_omp_body, omp_body

from curvkern._dispatch import cpp_unavailable_reason, cpu_capabilities

ROOT = Path(__file__).resolve().parents[1]
CAPABILITY_VARIABLE = "CURVKERN_CPU_CAPABILITY"
ALL_CAPABILITIES = ("default", "avx2", "avx512")

needs_cpp = pytest.mark.skipif(cpp_unavailable_reason() is not None, reason="curvkern._C is not built")


# --- aarch64: compiled, not run -----------------------------------------------------------------------


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; `make cross-compiler` installs it (apt-get install g++-aarch64-linux-gnu)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def setup_py_compile_args() -> list[str]:
    """setup.py's extra_compile_args, read without running setup()."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "extra_compile_args":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py passes no extra_compile_args")


@pytest.fixture(scope="module")
def aarch64_disassembly(tmp_path_factory) -> dict[str, str]:
    """Every csrc/**/*.cpp compiled for aarch64 with setup.py's flags (what torch's BuildExtension adds
    too), disassembled: {symbol: its disassembly}."""
    compiler = require_tool("aarch64-linux-gnu-g++")
    objdump = require_tool("aarch64-linux-gnu-objdump")
    out = tmp_path_factory.mktemp("aarch64")
    includes = [ROOT / "csrc", *torch.utils.cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    flags = [
        "-fPIC",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        *setup_py_compile_args(),
        *(f"-I{path}" for path in includes),
    ]
    sources = sorted((ROOT / "csrc").rglob("*.cpp"))

    def compile_one(source: Path) -> Path:
        obj = out / (source.relative_to(ROOT / "csrc").as_posix().replace("/", "_") + ".o")
        done = subprocess.run([compiler, *flags, "-c", str(source), "-o", str(obj)], capture_output=True, text=True)
        assert done.returncode == 0, f"{source.name} does not compile for aarch64:\n{done.stderr[-4000:]}"
        return obj

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, sources))
    bodies = {}
    for obj in objects:
        bodies.update(function_bodies(str(obj), objdump))
    return bodies


@pytest.mark.slow  # a cross build of every source: make test runs it, make test-fast does not
def test_aarch64_build_has_one_portable_version(aarch64_disassembly):
    names = "\n".join(aarch64_disassembly)
    assert has_omp_body(names, "hysterograd_pass_a_f32", "default")
    assert not re.search(r"_(avx2|avx512)\w*\._omp_fn", names), "x86 ISA versions in an aarch64 build"


@pytest.mark.slow
def test_aarch64_hot_loops_are_neon_vectorized(aarch64_disassembly):
    """NEON (128-bit, baseline on aarch64) in the passes' bodies: square roots, divisions and the fused
    multiply-adds of tanh/exp on v registers, and no libm call left in a loop."""
    neon = lambda op: rf"\b{op}\s+v\d+\.[24][sd]"  # noqa: E731  e.g. `fsqrt v1.4s, v2.4s`
    libm = r"\bbl\s.*<(sqrtf?|fmaf?|expf?|tanhf?)[>@+]"
    hysterograd_a = omp_body(aarch64_disassembly, "hysterograd_pass_a_f32")
    hysterograd_b = omp_body(aarch64_disassembly, "hysterograd_pass_b_f32")
    for op in ("fsqrt", "fdiv", "fmla"):
        assert count(neon(op), hysterograd_a), f"HysteroGrad pass A: no vector {op}"
    for op in ("fsqrt", "fdiv"):
        assert count(neon(op), hysterograd_b), f"HysteroGrad pass B: no vector {op}"
    assert count(neon("fsqrt"), omp_body(aarch64_disassembly, "hysterograd_pass_b_f64")), "HysteroGrad pass B fp64"
    biostatis_sums = omp_body(aarch64_disassembly, "biostatis_pass_a_f32")
    biostatis_update = omp_body(aarch64_disassembly, "biostatis_pass_b_f32")
    assert count(neon("fmla"), biostatis_sums) >= 10  # tanh's polynomial
    assert count(neon("fsqrt"), biostatis_sums)
    assert count(neon("fdiv"), biostatis_update) and count(neon("fsqrt"), biostatis_update)
    hvp = omp_body(aarch64_disassembly, "ce_hvp_f32")
    assert count(neon("fmla"), hvp) >= 8  # exp's polynomial
    for name, code in [
        ("pass_a", hysterograd_a),
        ("pass_b", hysterograd_b),
        ("sums", biostatis_sums),
        ("update", biostatis_update),
        ("ce_hvp", hvp),
    ]:
        assert not re.search(libm, code), f"{name}: a libm call in the loop"


# --- x86-64: every ISA version, forced ---------------------------------------------------------------

# Runs each kernel family through fused="cpp" (an invalid CURVKERN_CPU_CAPABILITY raises at the first
# kernel call) and saves what it computed and the capability that ran (argv[1]).
RUN_KERNELS = """
import sys
import torch
import curvkern
from curvkern._dispatch import cpu_capability
from curvkern.optim import BiostatisV6, HysteroGrad

results = {}
for dtype in (torch.float64, torch.float32):
    for name, optimizer in (("hysterograd", HysteroGrad), ("biostatis", BiostatisV6)):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen, dtype=dtype, requires_grad=True) for n in (1, 17, 20000)]
        opt = optimizer(params, lr=1e-2, fused="cpp")
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            opt.step()
        results[f"{name} {dtype}"] = [p.detach() for p in params]
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3000, generator=gen, dtype=dtype)
    target = torch.randint(0, 3000, (6,), generator=gen)
    u = torch.randn(6, 3000, generator=gen, dtype=dtype)
    results[f"cross_entropy {dtype}"] = [curvkern.cross_entropy(logits, target, reduction="none", fused="cpp"),
                                         curvkern.ce_hvp(logits, target, u, fused="cpp")]
results["capability"] = cpu_capability()
torch.save(results, sys.argv[1])
"""


def run_forced(capability: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{CAPABILITY_VARIABLE: capability})
    return subprocess.run(
        [sys.executable, "-c", RUN_KERNELS, *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def forced_results(tmp_path_factory) -> dict[str, dict]:
    """{capability: what the kernels computed with CURVKERN_CPU_CAPABILITY=capability}."""
    out = tmp_path_factory.mktemp("forced")
    results = {}
    for capability in cpu_capabilities():
        done = run_forced(capability, str(out / f"{capability}.pt"))
        assert done.returncode == 0, f"{CAPABILITY_VARIABLE}={capability}:\n{done.stderr[-4000:]}"
        results[capability] = torch.load(out / f"{capability}.pt")
    return results


@needs_cpp
def test_capabilities_are_ascending_and_known():
    capabilities = cpu_capabilities()
    assert capabilities == [c for c in ALL_CAPABILITIES if c in capabilities] and capabilities[0] == "default"
    if os.uname().machine != "x86_64":
        assert capabilities == ["default"]


@needs_cpp
@pytest.mark.slow  # a process per ISA version
def test_every_supported_capability_can_be_forced(forced_results):
    for capability, results in forced_results.items():
        assert results["capability"] == capability


@needs_cpp
@pytest.mark.slow
def test_forced_capabilities_compute_the_same_bits(forced_results):
    """Every version rounds alike (explicit std::fma only, -ffp-contract=off, 16 fixed lanes per sum), so
    the optimizers' results are bit-identical across ISAs, fp64 and fp32. The cross-entropy's row sums
    are `omp simd` reductions whose order follows the vector width: equal to rounding only."""
    (reference, *others) = forced_results.values()
    for results in others:
        for key, tensors in reference.items():
            if key == "capability":
                continue
            for expected, got in zip(tensors, results[key]):
                if key.startswith("cross_entropy"):
                    torch.testing.assert_close(got, expected, msg=lambda m, key=key: f"{key}: {m}")
                else:
                    assert torch.equal(got, expected), (key, results["capability"])


def assert_clean_error(done: subprocess.CompletedProcess, capability: str) -> None:
    assert done.returncode == 1, f"exit code {done.returncode} (negative: killed by a signal)\n{done.stderr[-2000:]}"
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: ") and f"{CAPABILITY_VARIABLE}={capability}" in last_line, last_line
    for supported in cpu_capabilities():
        assert supported in last_line


@needs_cpp
def test_a_capability_this_cpu_lacks_is_a_clean_error():
    missing = [c for c in ALL_CAPABILITIES if c not in cpu_capabilities()]
    if not missing:
        pytest.skip(f"this CPU runs every capability ({', '.join(ALL_CAPABILITIES)})")
    assert_clean_error(run_forced(missing[0], os.devnull), missing[0])


@needs_cpp
def test_an_unknown_capability_is_a_clean_error():
    assert_clean_error(run_forced("avx1024", os.devnull), "avx1024")
