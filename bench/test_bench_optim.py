"""Every optimizer backend that can run here, its eager reference and fused AdamW, on the same cases."""

from curvkern.bench.timing import plan_repeats, synchronized

SUITE = "optim"  # the cases of curvkern.bench.cases this module times


def test_optimizer_step(benchmark, case, device, budget_s):
    step = case.setup()
    benchmark.group = case.workload
    benchmark.extra_info.update(case.describe())
    rounds = plan_repeats(step, device, budget_s)
    benchmark.pedantic(synchronized(step, device), rounds=rounds, iterations=1)
