"""``python -m curvkern.bench`` (or ``curvkern-bench``): measure the bandwidth ceiling, time every case
of :mod:`curvkern.bench.cases`, print the table, write bench-report.json and bench-report.png."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from curvkern.bandwidth import PROBE_DESCRIPTION, measure_bandwidth
from curvkern.bench.cases import build_cases, probe_numel
from curvkern.bench.memory import extra_peak_bytes
from curvkern.bench.report import build_report, collect_machine_info, make_record, publish
from curvkern.bench.timing import BUDGET_S, QUICK_BUDGET_S, time_callable


def measure_ceiling(device: torch.device, quick: bool) -> float:
    return measure_bandwidth(device, probe_numel(device, quick))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m curvkern.bench",
        description="Time every curvkern backend against its eager reference and its peer (fused AdamW for the "
        "optimizers, PyTorch's own double backward for the cross-entropy kernels).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, measures nothing")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path.cwd(),
        metavar="DIR",
        help="where bench-report.json and bench-report.png go (default: the current directory)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--filter",
        default="",
        metavar="SUBSTR",
        help="only cases whose name (kernel/backend/shape/dtype) contains SUBSTR",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cases = [case for case in build_cases(device, args.quick) if args.filter in case.name]
    if not cases:
        parser.error(f"no case name contains {args.filter!r}")

    ceiling_before = measure_ceiling(device, args.quick)
    budget_s = QUICK_BUDGET_S if args.quick else BUDGET_S

    records = []
    progress = tqdm(cases, unit="case")
    for case in progress:
        progress.set_postfix_str(case.name)
        step = case.setup()
        timing = time_callable(step, device, budget_s)
        peak = None if case.input_bytes is None else extra_peak_bytes(step, device)
        records.append(make_record(case.describe(), timing, peak, case.input_bytes))
        del step  # frees this case's tensors before the next case allocates its own

    machine = collect_machine_info(device)
    # The ceiling is the best the machine achieves: measured again after the cases, so one dip (a busy
    # neighbour on a shared host halves it here at times) does not inflate every fraction of it.
    machine["bandwidth_ceiling_gbps"] = max(ceiling_before, measure_ceiling(device, args.quick))
    machine["bandwidth_probe"] = PROBE_DESCRIPTION[device.type]
    publish(build_report(machine, records, source="curvkern.bench"), args.out)


if __name__ == "__main__":
    main()
