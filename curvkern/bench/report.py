"""The benchmark report: its record format, a fixed-width table, a PNG bar chart, and a converter from
pytest-benchmark's ``--benchmark-json`` output, so one renderer serves the main job and the suites.

``bench-report.json``::

    {"schema": "curvkern-bench-report/1", "source": "curvkern.bench" | "pytest-benchmark",
     "machine": {date, cpu_model, cpu_cores, torch_threads, device, gpu_name, platform, python_version,
                 torch_version, triton_version, curvkern_version, torch_cpu_capability, curvkern_cpu_capability,
                 bandwidth_ceiling_gbps, bandwidth_probe},
     "records": [{kernel, backend, shape, dtype, device, bytes, median_s, min_s, repeats,
                  gbps, fraction_of_ceiling, speedup_vs_eager, speedup_vs_peer, peak_bytes, input_bytes,
                  output_bytes, flops}, ...]}

``gbps`` is compulsory bytes (:data:`curvkern.bench.cases.TRAFFIC`) over the median time. The speedups
are the baseline's median time over the record's, on the same shape, dtype and device: the baseline is
the same kernel's eager reference, or its peer (:func:`curvkern.bench.cases.peer_of`: the optimizers'
``torch.optim.AdamW(fused=True)``, the cross-entropy kernels' PyTorch or hessian-eigenthings path); null
where that baseline was not run (``--filter``) or does not exist (AdamW has no curvkern eager reference).
``peak_bytes`` is a call's peak allocation beyond its inputs and ``input_bytes`` the inputs' size
(cross-entropy cases; null for the optimizers). ``output_bytes`` (the results' size) and ``flops`` (GEMM
FLOPs of one call) are set for the fused linear + cross-entropy cases only, whose peak is also compared
beyond inputs and outputs (``peak_bytes - output_bytes``) with one (N, V) fp32 copy of the logits; reports
written before they existed lack both. ``date`` is the UTC day of the run (``YYYY-MM-DD``; absent
from reports written before it was recorded).

The table and the chart name every backend by :data:`BACKEND_NAMES`, so curvkern's eager reference and
PyTorch's eager path cannot be taken for each other.

Render a pytest-benchmark run: ``python -m curvkern.bench.report --from-pytest-benchmark FILE [--out DIR]``;
render a report again (one of ``bench/results/``): ``python -m curvkern.bench.report --from-report FILE``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

import curvkern
from curvkern._dispatch import cpp_unavailable_reason, cpu_capability
from curvkern.bench.cases import PEER_KERNEL, REFERENCE_BACKEND, peer_of
from curvkern.bench.timing import Timing

SCHEMA = "curvkern-bench-report/1"
JSON_NAME = "bench-report.json"
PNG_NAME = "bench-report.png"
MACHINE_FIELDS = (
    "date",
    "cpu_model",
    "cpu_cores",
    "torch_threads",
    "device",
    "gpu_name",
    "platform",
    "python_version",
    "torch_version",
    "triton_version",
    "curvkern_version",
    "torch_cpu_capability",
    "curvkern_cpu_capability",
    "bandwidth_ceiling_gbps",
    "bandwidth_probe",
)
RECORD_FIELDS = (
    "kernel",
    "backend",
    "shape",
    "dtype",
    "device",
    "bytes",
    "median_s",
    "min_s",
    "repeats",
    "gbps",
    "fraction_of_ceiling",
    "speedup_vs_eager",
    "speedup_vs_peer",
    "peak_bytes",
    "input_bytes",
    "output_bytes",
    "flops",
)

# What the table and the chart call each ``backend`` of a record: curvkern's three, then the peers of
# curvkern.bench.cases, curvkern.bench.ce_cases and curvkern.bench.linear_ce_cases.
BACKEND_NAMES = {
    "cpp": "curvkern cpp",
    "triton": "curvkern triton",
    REFERENCE_BACKEND: "curvkern eager (reference)",
    "torch-fused": "torch.optim.AdamW(fused=True)",
    "torch-eager": "PyTorch eager double backward",
    "torch-compile": "torch.compile(closed-form HVP)",
    "eigenthings-autograd": "hessian-eigenthings autograd",
    "materialised": "materialised logits, curvkern",
    "calls": "curvkern, K separate calls",
}
# curvkern's backends in colour, every peer in grey: the bar labels name them.
BACKEND_COLOURS = {"cpp": "tab:blue", "triton": "tab:orange", REFERENCE_BACKEND: "lightsteelblue"}
PEER_COLOUR = "darkgrey"
NAME_WIDTH = max(map(len, BACKEND_NAMES.values()))  # the table's backend column


def backend_name(backend: str) -> str:
    """The display name of a record's ``backend`` (the key itself for one this version does not know)."""
    return BACKEND_NAMES.get(backend, backend)


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
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
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


def make_record(
    case_fields: dict, timing: Timing, peak_bytes: int | None = None, input_bytes: int | None = None
) -> dict:
    """A record before :func:`build_report` derives its bandwidth and speedups. ``peak_bytes`` is the
    call's peak allocation beyond its inputs (:mod:`curvkern.bench.memory`); with the inputs counted it
    is ``peak_bytes + input_bytes``."""
    return {
        **case_fields,
        "median_s": timing.median_s,
        "min_s": timing.min_s,
        "repeats": timing.repeats,
        "peak_bytes": peak_bytes,
        "input_bytes": input_bytes,
    }


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
        derived = {
            **record,
            "gbps": gbps,
            "fraction_of_ceiling": None if ceiling is None else gbps / ceiling,
            "speedup_vs_eager": _speedup(eager, record),
            "speedup_vs_peer": _speedup(peer, record),
        }
        completed.append({field: derived.get(field) for field in RECORD_FIELDS})  # one order for every suite
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
            {
                **{key: b["extra_info"][key] for key in ("kernel", "backend", "shape", "dtype", "device", "bytes")},
                **{key: b["extra_info"].get(key) for key in ("output_bytes", "flops")},
            },
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


def describe_machine(machine: dict) -> str:
    """One line: the GPU if any, the CPU, its cores and torch threads, the CPU code paths, the date."""
    line = f"{machine['cpu_model']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads)"
    if machine["gpu_name"]:
        line = f"{machine['gpu_name']}, {line}"
    # Reports written before these were recorded lack them.
    paths = [
        f"{who} {machine[key]}"
        for who, key in (("torch", "torch_cpu_capability"), ("curvkern", "curvkern_cpu_capability"))
        if machine.get(key)
    ]
    if paths:
        line += f", CPU code paths {' / '.join(paths)}"
    return line + (f"; {machine['date']}" if machine.get("date") else "")


def _peers_line(records: list[dict]) -> str:
    """Which peer each kernel's ``vs peer`` ratio is taken against."""
    kernels_by_peer: dict[str, list[str]] = {}
    for kernel in dict.fromkeys(r["kernel"] for r in records):
        kernels_by_peer.setdefault(backend_name(peer_of(kernel)[1]), []).append(kernel)
    return "; ".join(f"{peer} for {', '.join(kernels)}" for peer, kernels in kernels_by_peer.items())


def format_table(report: dict) -> str:
    """The report as fixed-width text: the machine, one row per record, and what each ratio is taken against.
    A ratio is the baseline's median time over the row's (above 1: the row is faster)."""
    machine = report["machine"]
    ceiling = machine["bandwidth_ceiling_gbps"]
    records = report["records"]
    lines = [
        describe_machine(machine),
        f"torch {machine['torch_version']}, triton {machine['triton_version'] or '-'}; bandwidth ceiling "
        f"{_number(ceiling, '.1f')} GB/s ({machine['bandwidth_probe'] or 'not measured'})",
        "",
        f"{'kernel':<18} {'backend':<{NAME_WIDTH}} {'shape':<12} {'dtype':<9} {'median ms':>10} {'GB/s':>7} "
        f"{'of ceil':>8} {'vs ref':>7} {'vs peer':>8} {'peak MiB':>9}",
    ]
    for r in records:
        fraction = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        peak = r.get("peak_bytes")  # absent from reports written before peak memory was recorded
        lines.append(
            f"{r['kernel']:<18} {backend_name(r['backend']):<{NAME_WIDTH}} {r['shape']:<12} {r['dtype']:<9} "
            f"{1e3 * r['median_s']:>10.2f} {r['gbps']:>7.1f} {_number(fraction, '.0f', '%'):>8} "
            f"{_number(r['speedup_vs_eager'], '.2f', 'x'):>7} {_number(r['speedup_vs_peer'], '.2f', 'x'):>8} "
            f"{_number(None if peak is None else peak / 2**20, '.0f'):>9}"
        )
    lines += [
        "",
        f"vs ref: against {BACKEND_NAMES[REFERENCE_BACKEND]}; vs peer: against {_peers_line(records)}.",
    ]
    return "\n".join(lines + _compute_bound_lines(records))


def _compute_bound_lines(records: list[dict]) -> list[str]:
    """The fused linear + cross-entropy rows again, by what bounds them: GEMM FLOPs per second, the peak
    beyond inputs and outputs against one (N, V) fp32 copy of the logits, and the time against the
    materialised path's on the same workload. Empty without such records."""
    rows = [r for r in records if r.get("flops") is not None]
    if not rows:
        return []
    materialised = {(r["kernel"], *_workload(r)): r for r in rows if r["backend"] == "materialised"}
    lines = [
        "",
        "linear + cross-entropy: N x d x V, GEMM GFLOP/s, peak beyond inputs and outputs and its fraction of "
        "one (N, V) fp32 copy, time over the materialised path's",
        f"{'kernel':<18} {'backend':<{NAME_WIDTH}} {'shape':<18} {'GFLOP/s':>8} {'peak MiB':>9} {'of NxV':>7} "
        f"{'x mat.':>7}",
    ]
    for r in rows:
        rows_, _, classes = map(int, r["shape"].split("x"))
        beyond = None if r["peak_bytes"] is None else max(0, r["peak_bytes"] - r["output_bytes"])
        reference = materialised.get((r["kernel"], *_workload(r)))
        lines.append(
            f"{r['kernel']:<18} {backend_name(r['backend']):<{NAME_WIDTH}} {r['shape']:<18} "
            f"{r['flops'] / r['median_s'] / 1e9:>8.1f} {_number(None if beyond is None else beyond / 2**20, '.0f'):>9} "
            f"{_number(None if beyond is None else 100 * beyond / (rows_ * classes * 4), '.1f', '%'):>7} "
            f"{_number(None if reference is None else r['median_s'] / reference['median_s'], '.2f', 'x'):>7}"
        )
    return lines


def _comparison_groups(records: list[dict]) -> list[list[dict]]:
    """The records that share a peer and a workload (shape, dtype, device), in the report's order: one row
    of the chart. The optimizers on one workload form one group (their peer is fused AdamW); each
    cross-entropy kernel forms its own."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((peer_of(record["kernel"]), *_workload(record)), []).append(record)
    return list(groups.values())


def _group_title(group: list[dict]) -> str:
    first = group[0]
    if first["shape"].count("x") == 2:  # linear + cross-entropy: N x d x V
        rows, features, classes = first["shape"].split("x")
        return f"{first['kernel']}: {rows} rows x {features} features x {classes} classes, {first['dtype']}"
    count, size = first["shape"].split("x")
    if peer_of(first["kernel"])[0] == PEER_KERNEL:
        return f"optimizer step: {count} tensors x {size} elements, {first['dtype']}"
    return f"{first['kernel']}: {count} rows x {size} classes, {first['dtype']}"


def _bar_label(record: dict, group: list[dict]) -> str:
    """The backend's display name, after the kernel's where the group compares several kernels."""
    name = backend_name(record["backend"])
    several_kernels = len({r["kernel"] for r in group}) > 1
    return f"{record['kernel']}: {name}" if several_kernels and record["kernel"] != PEER_KERNEL else name


def _colour(backend: str) -> str:
    return BACKEND_COLOURS.get(backend, PEER_COLOUR)


def _milliseconds(value: float) -> str:
    """Three significant digits, trailing zeros kept ("2.00"), or the whole milliseconds from 100 up."""
    return f"{value:.0f}" if value >= 99.95 else f"{value:#.3g}"  # 99.96 rounds to "100", not "100."


def _rate(record: dict) -> str:
    """GEMM GFLOP/s for the compute-bound linear + cross-entropy records, GB/s of compulsory traffic otherwise."""
    if record.get("flops") is not None:
        return f"{record['flops'] / record['median_s'] / 1e9:.0f} GFLOP/s"
    return f"{record['gbps']:.1f} GB/s"


def _times_panel(axes, group: list[dict]) -> None:
    """Median milliseconds per call, labelled with the time and its rate (:func:`_rate`)."""
    times_ms = [1e3 * r["median_s"] for r in group]
    axes.barh(range(len(group)), times_ms, color=[_colour(r["backend"]) for r in group])
    for row, (record, time_ms) in enumerate(zip(group, times_ms)):
        axes.annotate(
            f"{_milliseconds(time_ms)} ms  ({_rate(record)})",
            (time_ms, row),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    axes.set_xlim(0, 1.45 * max(times_ms))  # room for the labels
    axes.set_yticks(range(len(group)), [_bar_label(r, group) for r in group])
    axes.set_title(_group_title(group), loc="left", fontsize=10, fontweight="bold")


def _speedup_limits(records: list[dict]) -> tuple[float, float]:
    """One log-scale range for every speed-up panel, so 1x lines up down the figure."""
    speedups = [r["speedup_vs_peer"] for r in records if r["speedup_vs_peer"] is not None]
    return min([*speedups, 1.0]) / 3, max([*speedups, 1.0]) * 3


def _speedups_panel(axes, group: list[dict], limits: tuple[float, float]) -> None:
    """Speed-up over the group's peer on a log scale: a bar from 1x to the speed-up, right when faster,
    left when slower, labelled with its value; the peer's own row says so."""
    peer = peer_of(group[0]["kernel"])
    axes.set_xscale("log")
    axes.set_xlim(*limits)
    axes.axvline(1, color="black", linewidth=0.8)
    for row, record in enumerate(group):
        speedup = record["speedup_vs_peer"]
        if (record["kernel"], record["backend"]) == peer or speedup is None:
            text = "the peer" if speedup is not None else "peer not measured"
            axes.annotate(
                text, (1, row), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8, style="italic"
            )
            continue
        axes.barh(row, abs(speedup - 1), left=min(speedup, 1), color=_colour(record["backend"]))
        faster = speedup >= 1
        axes.annotate(
            f"{speedup:.2f}x" if speedup < 10 else f"{speedup:.1f}x",
            (speedup, row),
            xytext=(3 if faster else -3, 0),
            textcoords="offset points",
            va="center",
            ha="left" if faster else "right",
            fontsize=8,
        )
    decades = math.log10(limits[1] / limits[0])
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5) if decades <= 2.5 else (1, 3)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.tick_params(labelleft=False)
    axes.set_title(f"speed-up over {backend_name(peer[1])}", loc="left", fontsize=10)


def plot_report(report: dict, path: Path) -> None:
    """One row of two panels per comparison group (the optimizers on one workload, each cross-entropy
    kernel): median time per backend and speed-up over the peer, values on the bars, the machine and the
    date in the title."""
    machine = report["machine"]
    groups = _comparison_groups(report["records"])
    rows = [len(group) for group in groups]
    figure = Figure(figsize=(13, 1.0 + sum(0.3 * n + 1.0 for n in rows)), layout="constrained")
    grid = figure.subplots(len(groups), 2, squeeze=False, gridspec_kw={"height_ratios": rows})
    limits = _speedup_limits(report["records"])
    for (times_axes, speedups_axes), group in zip(grid, groups):
        speedups_axes.sharey(times_axes)
        _times_panel(times_axes, group)
        _speedups_panel(speedups_axes, group, limits)
        times_axes.invert_yaxis()  # the report's order, top down (both panels: they share the axis)
    grid[-1, 0].set_xlabel("median time per call, ms (lower is better)")
    grid[-1, 1].set_xlabel("speed-up: the peer's time / this time (higher is better)")
    ceiling = machine["bandwidth_ceiling_gbps"]
    figure.suptitle(
        f"curvkern benchmarks: {describe_machine(machine)}\n"
        f"torch {machine['torch_version']}, triton {machine['triton_version'] or '-'}; GB/s of compulsory traffic, "
        f"bandwidth ceiling {'not measured' if ceiling is None else f'{ceiling:.1f} GB/s'}",
        fontsize=11,
    )
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
        description="Render a pytest-benchmark JSON of the bench/ suites as the curvkern benchmark report, "
        "or render a report again.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-pytest-benchmark",
        type=Path,
        metavar="FILE",
        help="the file written by `pytest bench/ --benchmark-json=FILE`",
    )
    source.add_argument(
        "--from-report",
        type=Path,
        metavar="FILE",
        help="a bench-report.json (one of bench/results/, say) to print and draw again",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path.cwd(),
        metavar="DIR",
        help="where bench-report.json and bench-report.png go (default: the current directory)",
    )
    args = parser.parse_args(argv)
    if args.from_report is not None:
        publish(json.loads(args.from_report.read_text()), args.out)
    else:
        publish(report_from_pytest_benchmark(json.loads(args.from_pytest_benchmark.read_text())), args.out)


if __name__ == "__main__":
    main()
