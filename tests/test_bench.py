"""The benchmark machinery at --quick size: the report's schema, the table, the PNG, the converter from
pytest-benchmark's JSON, the compulsory-byte counts, and the baseline each speedup is taken against."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from curvkern._dispatch import BACKENDS
from curvkern.bench import report
from curvkern.bench.__main__ import main
from curvkern.bench.cases import KERNELS, Case, Shape, build_cases, dtype_name
from curvkern.bench.timing import Timing

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def identity(record: dict) -> tuple:
    return record["kernel"], record["backend"], record["shape"], record["dtype"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``python -m curvkern.bench --quick`` run: (its output directory, what it printed)."""
    out_dir = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--quick", "--out", str(out_dir)])
    return out_dir, printed.getvalue()


@pytest.fixture(scope="module")
def quick_report(quick_run) -> dict:
    out_dir, _ = quick_run
    return json.loads((out_dir / report.JSON_NAME).read_text())


@pytest.mark.slow  # a --quick benchmark run (~45 s), and pytest-benchmark's for the converter
def test_report_has_one_record_per_case_in_the_schema(quick_report):
    assert quick_report["schema"] == report.SCHEMA
    assert quick_report["source"] == "curvkern.bench"
    machine = quick_report["machine"]
    assert tuple(machine) == report.MACHINE_FIELDS
    assert machine["torch_version"] == torch.__version__
    ceiling = machine["bandwidth_ceiling_gbps"]
    assert ceiling > 0

    expected = [(c.kernel.name, c.backend, c.shape.label, dtype_name(c.dtype)) for c in build_cases(CPU, quick=True)]
    assert [identity(r) for r in quick_report["records"]] == expected
    for record in quick_report["records"]:
        assert tuple(record) == report.RECORD_FIELDS
        assert record["device"] == "cpu"
        assert 0 < record["min_s"] <= record["median_s"]
        assert record["repeats"] >= 3
        assert record["gbps"] == pytest.approx(record["bytes"] / record["median_s"] / 1e9)
        assert record["fraction_of_ceiling"] == pytest.approx(record["gbps"] / ceiling)
        assert record["speedup_vs_peer"] > 0  # the peer runs on every workload
        if record["kernel"] in ("adamw", "ce-hvp-k8", "lce-ggn-vp-k8"):
            # torch's AdamW has no curvkern eager reference; K tangents run the compiled backend only.
            assert record["speedup_vs_eager"] is None
        else:
            assert record["speedup_vs_eager"] > 0
        if record["backend"] == "eager":
            assert record["speedup_vs_eager"] == 1.0
        linear_ce = record["kernel"].startswith("lce-")
        assert (record["flops"] is not None) == linear_ce
        assert (record["output_bytes"] is not None) == linear_ce
        if linear_ce:
            assert record["flops"] > 0 and 0 < record["output_bytes"] <= record["bytes"]
            assert record["peak_bytes"] is not None


@pytest.mark.slow  # a --quick benchmark run (~45 s), and pytest-benchmark's for the converter
def test_table_prints_every_record_and_the_paths(quick_run, quick_report):
    out_dir, printed = quick_run
    lines = printed.splitlines()
    for record in quick_report["records"]:
        # The backend column holds the display name, which has spaces: match the fixed-width columns.
        kernel, backend, shape, dtype = identity(record)
        row_start = f"{kernel:<18} {report.backend_name(backend):<{report.NAME_WIDTH}} {shape:<12} {dtype:<9} "
        rows = [line for line in lines if line.startswith(row_start)]
        assert len(rows) == 1, f"no single table row for {identity(record)}"
        assert f"{record['gbps']:.1f}" in rows[0].split()
    assert f"{quick_report['machine']['bandwidth_ceiling_gbps']:.1f} GB/s" in printed
    # The linear + cross-entropy rows again, by GFLOP/s and peak against one (N, V) copy.
    section = printed[printed.index("linear + cross-entropy: N x d x V") :].splitlines()
    linear_ce = [r for r in quick_report["records"] if r["kernel"].startswith("lce-")]
    for record in linear_ce:
        row_start = f"{record['kernel']:<18} {report.backend_name(record['backend']):<{report.NAME_WIDTH}} "
        rows = [line for line in section if line.startswith(row_start + f"{record['shape']:<18} ")]
        assert len(rows) == 1, f"no single GFLOP/s row for {identity(record)}"
        assert f"{record['flops'] / record['median_s'] / 1e9:.1f}" in rows[0].split()
    assert str(out_dir / report.JSON_NAME) in printed
    assert str(out_dir / report.PNG_NAME) in printed


@pytest.mark.slow  # a --quick benchmark run (~45 s), and pytest-benchmark's for the converter
def test_png_is_a_readable_image(quick_run):
    out_dir, _ = quick_run
    png = out_dir / report.PNG_NAME
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    height, width, channels = imread(png).shape
    assert height > 100 and width > 100 and channels in (3, 4)


@pytest.mark.slow  # a --quick benchmark run (~45 s), and pytest-benchmark's for the converter
def test_pytest_benchmark_json_converts_to_the_same_records(quick_report, tmp_path):
    benchmark_json = tmp_path / "pytest-benchmark.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "bench/",
            "--quick",
            f"--benchmark-json={benchmark_json}",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=REPO,
        # Not an xdist worker's variables: pytest-benchmark reads PYTEST_XDIST_WORKER and then times nothing.
        env={key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")},
        capture_output=True,
        text=True,
        timeout=300,  # every suite at --quick, the linear + cross-entropy one included, on a shared host
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr

    converted = report.report_from_pytest_benchmark(json.loads(benchmark_json.read_text()))
    assert converted["schema"] == report.SCHEMA
    assert converted["source"] == "pytest-benchmark"
    assert tuple(converted["machine"]) == report.MACHINE_FIELDS
    assert converted["machine"]["bandwidth_ceiling_gbps"] > 0
    assert sorted(identity(r) for r in converted["records"]) == sorted(identity(r) for r in quick_report["records"])
    for record in converted["records"]:
        assert tuple(record) == report.RECORD_FIELDS
        assert record["speedup_vs_peer"] > 0

    report.main(["--from-pytest-benchmark", str(benchmark_json), "--out", str(tmp_path / "rendered")])
    assert json.loads((tmp_path / "rendered" / report.JSON_NAME).read_text()) == converted
    assert (tmp_path / "rendered" / report.PNG_NAME).read_bytes().startswith(b"\x89PNG")


def test_speedups_are_taken_against_the_same_workloads_baselines():
    def record(kernel, backend, dtype, median_s):
        fields = {
            "kernel": kernel,
            "backend": backend,
            "shape": "4x4096",
            "dtype": dtype,
            "device": "cpu",
            "bytes": 10**9,
        }
        return report.make_record(fields, Timing(median_s=median_s, min_s=median_s, repeats=3))

    records = [
        record("adamw", "torch-fused", "float32", 1.0),
        record("hysterograd", "eager", "float32", 4.0),
        record("hysterograd", "cpp", "float32", 0.5),
        record("biostatis", "cpp", "float32", 2.0),  # its eager reference was filtered out
        record("adamw", "torch-fused", "bfloat16", 2.0),
        record("hysterograd", "eager", "bfloat16", 10.0),
        record("hysterograd", "cpp", "bfloat16", 1.0),
    ]
    machine = {"bandwidth_ceiling_gbps": 4.0}
    derived = {
        (*identity(r)[:2], r["dtype"]): (r["speedup_vs_eager"], r["speedup_vs_peer"], r["fraction_of_ceiling"])
        for r in report.build_report(machine, records, source="synthetic")["records"]
    }
    assert derived == {
        ("adamw", "torch-fused", "float32"): (None, 1.0, 0.25),
        ("hysterograd", "eager", "float32"): (1.0, 0.25, 0.0625),
        ("hysterograd", "cpp", "float32"): (8.0, 2.0, 0.5),
        ("biostatis", "cpp", "float32"): (None, 0.5, 0.125),
        ("adamw", "torch-fused", "bfloat16"): (None, 1.0, 0.125),
        ("hysterograd", "eager", "bfloat16"): (1.0, 0.2, 0.025),
        ("hysterograd", "cpp", "bfloat16"): (10.0, 2.0, 0.25),
    }


def test_every_backend_has_its_own_display_name():
    benchmarked = {case.backend for quick in (True, False) for case in build_cases(CPU, quick=quick)}
    assert set(BACKENDS) | benchmarked <= set(report.BACKEND_NAMES)
    names = list(report.BACKEND_NAMES.values())
    assert len(set(names)) == len(names)
    assert report.backend_name("eager") != report.backend_name("torch-eager")


def test_chart_and_table_name_the_backends_and_the_peers(tmp_path):
    def record(kernel, backend, median_s, shape="200x500000"):
        fields = {
            "kernel": kernel,
            "backend": backend,
            "shape": shape,
            "dtype": "float32",
            "device": "cuda",
            "bytes": 10**9,
        }
        return report.make_record(fields, Timing(median_s=median_s, min_s=median_s, repeats=3))

    records = [
        record("adamw", "torch-fused", 2e-3),
        record("hysterograd", "eager", 9e-3),
        record("hysterograd", "triton", 1.5e-3),
        record("biostatis", "triton", 3e-3),
        record("ce-hvp", "triton", 4e-4, shape="16384x50304"),  # its peer filtered out: no speed-up
    ]
    machine = {
        **dict.fromkeys(report.MACHINE_FIELDS),
        "date": "2026-12-01",
        "cpu_model": "Some CPU",
        "cpu_cores": 16,
        "torch_threads": 16,
        "gpu_name": "Some GPU",
        "torch_version": "2.13.0",
        "triton_version": "3.9.0",
        "bandwidth_ceiling_gbps": 4000.0,
        "bandwidth_probe": "copy",
    }
    synthetic = report.build_report(machine, records, source="synthetic")

    table = report.format_table(synthetic)
    assert table.splitlines()[0] == "Some GPU, Some CPU (16 cores, 16 torch threads); 2026-12-01"
    for name in ("torch.optim.AdamW(fused=True)", "curvkern eager (reference)", "curvkern triton"):
        assert name in table
    assert table.splitlines()[-1] == (
        "vs ref: against curvkern eager (reference); vs peer: against torch.optim.AdamW(fused=True) for adamw, "
        "hysterograd, biostatis; PyTorch eager double backward for ce-hvp."
    )

    png = tmp_path / report.PNG_NAME
    report.plot_report(synthetic, png)
    height, width, _ = imread(png).shape
    assert width > 1000 and height > 400


def test_a_recorded_report_renders_again(tmp_path):
    # Written before the report recorded peak memory and the CPU code paths.
    recorded = REPO / "bench/results/2026-11-24-cpu-2core-cpp.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report.main(["--from-report", str(recorded), "--out", str(tmp_path)])
    assert json.loads((tmp_path / report.JSON_NAME).read_text()) == json.loads(recorded.read_text())
    assert "adamw              torch.optim.AdamW(fused=True)  40x1048576" in printed.getvalue()
    assert (tmp_path / report.PNG_NAME).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "kernel_name,dtype,bytes_per_element",
    [
        ("adamw", torch.float32, 7 * 4),
        ("hysterograd", torch.float32, 7 * 4),
        ("biostatis", torch.float32, 12 * 4),
        # bf16: AdamW keeps bf16 state; curvkern keeps fp32 state, only p and g are bf16.
        ("adamw", torch.bfloat16, 7 * 2),
        ("hysterograd", torch.bfloat16, 4 * 2 + 3 * 4),  # p, g: g, g, p, p; G: G, G, G
        ("biostatis", torch.bfloat16, 4 * 2 + 8 * 4),  # p, g: g, g, p, p; state: the other eight
    ],
)
def test_compulsory_bytes_follow_the_traffic_table(kernel_name, dtype, bytes_per_element):
    kernel = next(k for k in KERNELS if k.name == kernel_name)
    case = Case(kernel, "eager", Shape(num_tensors=3, numel=10), dtype, CPU)
    assert case.compulsory_bytes == 3 * 10 * bytes_per_element


def test_cross_entropy_cases_count_copies_of_the_logits_and_take_pytorch_as_peer():
    from curvkern.bench.cases import peer_of
    from curvkern.bench.ce_cases import CrossEntropyCase, CrossEntropyKernel, RowsShape

    def case(kernel, dtype):
        return CrossEntropyCase(CrossEntropyKernel(kernel), "cpp", RowsShape(8, 100), dtype, CPU)

    assert case("ce-hvp", torch.float32).compulsory_bytes == 3 * 8 * 100 * 4  # read z, u; write Hu
    assert case("ce-double-backward", torch.bfloat16).compulsory_bytes == 6 * 8 * 100 * 2
    assert case("ce-hvp", torch.float32).input_bytes == 2 * 8 * 100 * 4
    assert case("ce-hvp-k8", torch.float32).compulsory_bytes == 17 * 8 * 100 * 4  # z once, each u_k and H u_k
    assert case("ce-hvp-k8", torch.float32).input_bytes == 9 * 8 * 100 * 4
    assert peer_of("ce-hvp") == ("ce-hvp", "torch-eager")
    assert peer_of("ce-hvp-k8") == ("ce-hvp-k8", "calls")
    assert peer_of("ce-eigenthings-hvp") == ("ce-eigenthings-hvp", "eigenthings-autograd")
    assert peer_of("hysterograd") == ("adamw", "torch-fused")
    quick = [c for c in build_cases(CPU, quick=True) if c.suite == "cross_entropy"]
    assert {(c.kernel.name, c.backend) for c in quick} >= {
        ("ce-hvp", "torch-eager"),
        ("ce-hvp", "cpp"),
        ("ce-double-backward", "cpp"),
        ("ce-hvp-k8", "calls"),
        ("ce-hvp-k8", "cpp"),
    }
    k8 = next(c for c in quick if c.kernel.name == "ce-hvp-k8" and c.backend == "calls")
    assert len(k8.setup(warmup_calls=0)()) == 8  # eight calls of one tangent each


def test_extra_peak_bytes_sees_what_a_call_allocates():
    from curvkern.bench.memory import extra_peak_bytes

    size = 64 * 2**20
    peak = extra_peak_bytes(lambda: torch.ones(size // 4), CPU)  # touched pages count, freed or not
    assert peak is not None and 0.9 * size <= peak <= 1.5 * size
    assert extra_peak_bytes(lambda: None, CPU) < 0.1 * size


def test_linear_cross_entropy_cases_count_gemm_passes_and_skip_what_does_not_fit():
    from curvkern.bench.cases import peer_of
    from curvkern.bench.linear_ce_cases import (
        GGN,
        GGN_TANGENTS,
        HVP,
        TANGENTS,
        HeadShape,
        LinearCrossEntropyCase,
        LinearCrossEntropyKernel,
        build_linear_cross_entropy_cases,
    )

    shape = HeadShape(rows=8, features=4, classes=100)

    def case(kernel, backend):
        return LinearCrossEntropyCase(LinearCrossEntropyKernel(kernel), backend, shape, CPU)

    one_pass = 2 * 8 * 4 * 100
    assert case(HVP, "cpp").flops == 14 * one_pass  # forward 1, backward 3, double backward 3 + 7
    assert case(HVP, "torch-eager").flops == case(HVP, "materialised").flops == 9 * one_pass
    assert case(GGN, "eager").flops == 8 * one_pass and case(GGN, "materialised").flops == 5 * one_pass
    assert case(GGN_TANGENTS, "cpp").flops == (2 + 4 * TANGENTS) * one_pass
    assert case(GGN_TANGENTS, "calls").flops == 6 * TANGENTS * one_pass
    # inputs: hidden, weight and a tangent of each (K hidden tangents for K8); outputs: the results
    assert case(HVP, "cpp").input_bytes == 2 * (8 + 100) * 4 * 4
    assert case(HVP, "cpp").output_bytes == 2 * (8 + 100) * 4 * 4  # gradient and HVP to hidden and weight
    assert case(GGN_TANGENTS, "cpp").input_bytes == ((8 + 100) + TANGENTS * 8) * 4 * 4
    assert case(GGN_TANGENTS, "cpp").output_bytes == TANGENTS * (8 + 100) * 4 * 4
    assert case(GGN, "cpp").compulsory_bytes == case(GGN, "cpp").input_bytes + case(GGN, "cpp").output_bytes
    assert shape.logits_copy_bytes == 8 * 100 * 4
    assert peer_of(HVP) == (HVP, "torch-eager")
    assert peer_of(GGN) == (GGN, "materialised")
    assert peer_of(GGN_TANGENTS) == (GGN_TANGENTS, "calls")

    default = {(c.kernel.name, c.backend, c.shape.label) for c in build_linear_cross_entropy_cases(CPU)}
    assert {(HVP, b, "2048x768x50257") for b in ("torch-eager", "materialised", "eager", "cpp")} <= default
    # (N, V) = (4096, 262144): one fp32 copy of the logits is 4 GiB; the materialised paths are not run,
    # nor the eager reference (minutes per case).
    big = {(kernel, backend) for kernel, backend, label in default if label == "4096x128x262144"}
    assert big == {(HVP, "cpp"), (GGN, "cpp")}
    assert {(b, label) for k, b, label in default if k == GGN_TANGENTS} == {
        ("calls", "1024x768x50257"),
        ("cpp", "1024x768x50257"),
    }
    quick = [c for c in build_cases(CPU, quick=True) if c.suite == "linear_cross_entropy"]
    assert {c.kernel.name for c in quick} == {HVP, GGN, GGN_TANGENTS}
    assert all(c.shape.materialised_fits() for c in quick)  # every peer runs at --quick


@pytest.mark.parametrize("backend", ["torch-eager", "materialised", "eager", "cpp"])
def test_linear_cross_entropy_paths_agree(backend):
    """Every timed path computes the same loss, gradient and HVP (and GGN product), so the timings compare
    equal work."""
    from curvkern.bench.linear_ce_cases import (
        GGN,
        GGN_TANGENTS,
        HVP,
        HeadShape,
        LinearCrossEntropyCase,
        LinearCrossEntropyKernel,
    )

    shape = HeadShape(rows=24, features=8, classes=300)

    def results(kernel, name):
        return LinearCrossEntropyCase(LinearCrossEntropyKernel(kernel), name, shape, CPU).setup(warmup_calls=0)()

    for got, want in zip(results(HVP, backend), results(HVP, "torch-eager"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if backend != "torch-eager":
        # (prod_hidden, prod_weight); the fused paths add prod_bias, None without a bias
        for got, want in zip(results(GGN, backend)[:2], results(GGN, "materialised"), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    batched, separate = results(GGN_TANGENTS, "cpp"), results(GGN_TANGENTS, "calls")
    for part in (0, 1):  # (K, N, d) and (K, V, d)
        stacked = torch.stack([products[part] for products in separate])
        torch.testing.assert_close(batched[part], stacked, rtol=1e-4, atol=1e-6)


def test_extra_peak_bytes_sees_temporaries_that_reuse_freed_memory():
    """After larger blocks were freed, glibc's default keeps smaller ones on its heap, where a call's
    temporaries could reuse pages already resident and not count: the measure pins its thresholds."""
    from curvkern.bench.memory import extra_peak_bytes

    size = 8 * 2**20

    def call():
        return torch.ones(size // 4).sum()  # an 8 MiB temporary, freed inside the call

    extra_peak_bytes(call, CPU)  # the warm-up, as in the benchmarks (the first call allocates more)
    for _ in range(3):
        torch.ones(3 * size // 4)  # 24 MiB, freed at once (with glibc's default, the call measured 0)
        peak = extra_peak_bytes(call, CPU)
        assert peak is not None and 0.9 * size <= peak <= 1.5 * size
