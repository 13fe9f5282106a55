"""The cross-entropy cases of :mod:`curvkern.bench.ce_cases`: ``ce_hvp``, the double backward through
``cross_entropy`` and the hessian-eigenthings ``.hvp``, against PyTorch's eager double backward,
``torch.compile`` of the eager closed form and hessian-eigenthings' own path; time and peak memory.

CPU: ``pytest bench/test_bench_cross_entropy.py --benchmark-json=ce.json``;
GPU: ``pytest bench/test_bench_cross_entropy.py --device cuda --benchmark-json=ce.json``.
"""

from curvkern.bench.memory import extra_peak_bytes
from curvkern.bench.timing import plan_repeats, synchronized

SUITE = "cross_entropy"


def test_cross_entropy(benchmark, case, device, budget_s):
    call = case.setup()
    benchmark.group = case.workload
    peak = extra_peak_bytes(call, device)
    benchmark.extra_info.update({**case.describe(), "peak_bytes": peak, "input_bytes": case.input_bytes})
    rounds = plan_repeats(call, device, budget_s)
    benchmark.pedantic(synchronized(call, device), rounds=rounds, iterations=1)
