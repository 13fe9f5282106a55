"""The fused linear + cross-entropy cases of :mod:`curvkern.bench.linear_ce_cases`: loss, gradient and one
double-backward HVP through ``curvkern.linear_cross_entropy`` against PyTorch's and the materialised
logits' double backward; the GGN product of the head; K tangents in one call against K calls. Time, peak
memory beyond the inputs (``peak_bytes``) and the results' size (``output_bytes``).

CPU: ``pytest bench/test_bench_linear_cross_entropy.py --benchmark-json=lce.json`` (the default sizes take
tens of seconds per call on two cores; ``--quick`` for tiny ones).
"""

from curvkern.bench.memory import extra_peak_bytes
from curvkern.bench.timing import plan_repeats, synchronized

SUITE = "linear_cross_entropy"


def test_linear_cross_entropy(benchmark, case, device, budget_s):
    call = case.setup()
    benchmark.group = case.workload
    rounds = plan_repeats(call, device, budget_s)  # its call is the warm-up, before the peak is measured
    peak = extra_peak_bytes(call, device)
    benchmark.extra_info.update({**case.describe(), "peak_bytes": peak, "input_bytes": case.input_bytes})
    benchmark.pedantic(synchronized(call, device), rounds=rounds, iterations=1)
