"""The benchmark report: its record format, a fixed-width table, a PNG bar chart, and a converter from
pytest-benchmark's ``--benchmark-json`` output, so one renderer serves the main job and the suites.

``bench-report.json``::

    {"schema": "curvkern-bench-report/1", "source": "curvkern.bench" | "pytest-benchmark",
     "machine": {cpu_model, cpu_cores, torch_threads, device, gpu_name, platform, python_version,
                 torch_version, triton_version, curvkern_version, torch_cpu_capability, curvkern_cpu_capability,
                 bandwidth_ceiling_gbps, bandwidth_probe},
     "records": [{kernel, backend, shape, dtype, device, bytes, median_s, min_s, repeats,
                  gbps, fraction_of_ceiling, speedup_vs_eager, speedup_vs_peer, peak_bytes, input_bytes}, ...]}

``gbps`` is compulsory bytes (:data:`curvkern.bench.cases.TRAFFIC`) over the median time. The speedups
are the baseline's median time over the record's, on the same shape, dtype and device: the baseline is
the same kernel's eager reference, or its peer (:func:`curvkern.bench.cases.peer_of`: the optimizers'
``torch.optim.AdamW(fused=True)``, the cross-entropy kernels' PyTorch or hessian-eigenthings path); null
where that baseline was not run (``--filter``) or does not exist (AdamW has no curvkern eager reference).
``peak_bytes`` is a call's peak allocation beyond its inputs and ``input_bytes`` the inputs' size
(cross-entropy cases; null for the optimizers).

Render a pytest-benchmark run: ``python -m curvkern.bench.report --from-pytest-benchmark FILE [--out DIR]``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import curvkern
from curvkern._dispatch import cpp_unavailable_reason, cpu_capability
from curvkern.bench.cases import REFERENCE_BACKEND, peer_of
from curvkern.bench.timing import Timing

SCHEMA = "curvkern-bench-report/1"
JSON_NAME = "bench-report.json"
PNG_NAME = "bench-report.png"
MACHINE_FIELDS = (
    "cpu_model", "cpu_cores", "torch_threads", "device", "gpu_name", "platform", "python_version",
    "torch_version", "triton_version", "curvkern_version", "torch_cpu_capability", "curvkern_cpu_capability",
    "bandwidth_ceiling_gbps", "bandwidth_probe",
)
RECORD_FIELDS = (
    "kernel", "backend", "shape", "dtype", "device", "bytes", "median_s", "min_s", "repeats",
    "gbps", "fraction_of_ceiling", "speedup_vs_eager", "speedup_vs_peer", "peak_bytes", "input_bytes",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _installed_version(distribution: str) -> str | None:
    # Read from the metadata: importing triton only to print its version costs seconds.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_machine_info(device: torch.device) -> dict:
    """What the numbers were measured on, less the bandwidth ceiling (measured by the caller)."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "triton_version": _installed_version("triton"),
        "curvkern_version": curvkern.__version__,
        # Which code paths ran: torch's kernels (ATEN_CPU_CAPABILITY) and curvkern's (CURVKERN_CPU_CAPABILITY).
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "curvkern_cpu_capability": _curvkern_cpu_capability(),
    }


def _curvkern_cpu_capability() -> str | None:
    """The ISA version curvkern's C++ kernels run, or None without the extension."""
    return None if cpp_unavailable_reason() is not None else cpu_capability()


def make_record(case_fields: dict, timing: Timing, peak_bytes: int | None = None, input_bytes: int | None = None) -> dict:
    """A record before :func:`build_report` derives its bandwidth and speedups. ``peak_bytes`` is the
    call's peak allocation beyond its inputs (:mod:`curvkern.bench.memory`); with the inputs counted it
    is ``peak_bytes + input_bytes``."""
    return {**case_fields, "median_s": timing.median_s, "min_s": timing.min_s, "repeats": timing.repeats,
            "peak_bytes": peak_bytes, "input_bytes": input_bytes}


def _workload(record: dict) -> tuple:
    return record["shape"], record["dtype"], record["device"]


def _speedup(baseline: dict | None, record: dict) -> float | None:
    return None if baseline is None else baseline["median_s"] / record["median_s"]


def build_report(machine: dict, records: list[dict], source: str) -> dict:
    """Derive GB/s, the fraction of the ceiling and both speedups; assemble the report."""
    ceiling = machine["bandwidth_ceiling_gbps"]
    by_identity = {(r["kernel"], r["backend"], *_workload(r)): r for r in records}
    completed = []
    for record in records:
        gbps = record["bytes"] / record["median_s"] / 1e9
        eager = by_identity.get((record["kernel"], REFERENCE_BACKEND, *_workload(record)))
        peer = by_identity.get((*peer_of(record["kernel"]), *_workload(record)))
        record = dict(record)
        peak = {key: record.pop(key) for key in ("peak_bytes", "input_bytes")}  # kept last, as in RECORD_FIELDS
        completed.append({
            **record,
            "gbps": gbps,
            "fraction_of_ceiling": None if ceiling is None else gbps / ceiling,
            "speedup_vs_eager": _speedup(eager, record),
            "speedup_vs_peer": _speedup(peer, record),
            **peak,
        })
    return {"schema": SCHEMA, "source": source, "machine": machine, "records": completed}


def report_from_pytest_benchmark(data: dict) -> dict:
    """The report of a ``pytest bench/ --benchmark-json`` run.

    The suites put a case's :meth:`~curvkern.bench.cases.Case.describe` fields in ``extra_info``, the
    bandwidth probe its bytes and description, and the conftest adds :func:`collect_machine_info` to
    ``machine_info["curvkern"]``. The ceiling is the probe's best time, as in the main job.
    """
    benchmarks = data["benchmarks"]
    probes = [b for b in benchmarks if "probe" in b["extra_info"]]
    machine = dict(data["machine_info"]["curvkern"])
    best_probe = max(probes, key=lambda b: b["extra_info"]["bytes"] / b["stats"]["min"], default=None)
    machine["bandwidth_ceiling_gbps"] = (
        None if best_probe is None else best_probe["extra_info"]["bytes"] / best_probe["stats"]["min"] / 1e9
    )
    machine["bandwidth_probe"] = None if best_probe is None else best_probe["extra_info"]["probe"]
    records = [
        make_record(
            {key: b["extra_info"][key] for key in ("kernel", "backend", "shape", "dtype", "device", "bytes")},
            Timing(median_s=b["stats"]["median"], min_s=b["stats"]["min"], repeats=b["stats"]["rounds"]),
            b["extra_info"].get("peak_bytes"),
            b["extra_info"].get("input_bytes"),
        )
        for b in benchmarks
        if "kernel" in b["extra_info"]
    ]
    return build_report(machine, records, source="pytest-benchmark")


def _number(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else format(value, fmt) + unit


def format_table(report: dict) -> str:
    machine = report["machine"]
    ceiling = machine["bandwidth_ceiling_gbps"]
    lines = [
        f"{machine['cpu_model']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads)"
        + (f", {machine['gpu_name']}" if machine["gpu_name"] else ""),
        f"torch {machine['torch_version']}, triton {machine['triton_version'] or '-'}; bandwidth ceiling "
        f"{_number(ceiling, '.1f')} GB/s ({machine['bandwidth_probe'] or 'not measured'})",
        "",
        f"{'kernel':<18} {'backend':<20} {'shape':<12} {'dtype':<9} {'median ms':>10} {'GB/s':>7} "
        f"{'of ceil':>8} {'vs eager':>9} {'vs peer':>9} {'peak MiB':>9}",
    ]
    for r in report["records"]:
        fraction = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        lines.append(
            f"{r['kernel']:<18} {r['backend']:<20} {r['shape']:<12} {r['dtype']:<9} {1e3 * r['median_s']:>10.2f} "
            f"{r['gbps']:>7.1f} {_number(fraction, '.0f', '%'):>8} "
            f"{_number(r['speedup_vs_eager'], '.2f', 'x'):>9} {_number(r['speedup_vs_peer'], '.2f', 'x'):>9} "
            f"{_number(None if r['peak_bytes'] is None else r['peak_bytes'] / 2**20, '.0f'):>9}"
        )
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    """Horizontal bars of compulsory GB/s per record, coloured by backend, with the ceiling as a line."""
    records = report["records"]
    ceiling = report["machine"]["bandwidth_ceiling_gbps"]
    backends = list(dict.fromkeys(r["backend"] for r in records))
    colours = {backend: f"C{i}" for i, backend in enumerate(backends)}
    figure = Figure(figsize=(10, 1.5 + 0.3 * len(records)), layout="constrained")
    axes = figure.subplots()
    positions = range(len(records))
    axes.barh(positions, [r["gbps"] for r in records], color=[colours[r["backend"]] for r in records])
    axes.set_yticks(positions, [f"{r['kernel']} {r['backend']} | {r['shape']} {r['dtype']}" for r in records])
    axes.invert_yaxis()  # first record on top, as in the table
    legend = [Patch(color=colour, label=backend) for backend, colour in colours.items()]
    if ceiling is not None:
        legend.append(axes.axvline(ceiling, color="black", linestyle="--", label=f"ceiling {ceiling:.1f} GB/s"))
    axes.set_xlabel("GB/s of compulsory traffic (median step)")
    axes.set_title(f"curvkern benchmarks on {report['machine']['gpu_name'] or report['machine']['cpu_model']}")
    axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(path, dpi=100)


def publish(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Print the table, write the JSON and the PNG into ``out_dir``, print their paths."""
    print(format_table(report))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / JSON_NAME, out_dir / PNG_NAME
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, png_path)
    print(f"\nwrote {json_path}\nwrote {png_path}")
    return json_path, png_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m curvkern.bench.report",
        description="Render a pytest-benchmark JSON of the bench/ suites as the curvkern benchmark report.",
    )
    parser.add_argument("--from-pytest-benchmark", type=Path, required=True, metavar="FILE",
                        help="the file written by `pytest bench/ --benchmark-json=FILE`")
    parser.add_argument("--out", type=Path, default=Path.cwd(), metavar="DIR",
                        help="where bench-report.json and bench-report.png go (default: the current directory)")
    args = parser.parse_args(argv)
    publish(report_from_pytest_benchmark(json.loads(args.from_pytest_benchmark.read_text())), args.out)


if __name__ == "__main__":
    main()
