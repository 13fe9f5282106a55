"""The bandwidth probe whose best time is the report's ceiling (see report_from_pytest_benchmark)."""

from curvkern.bandwidth import bandwidth_probe
from curvkern.bench.cases import probe_numel
from curvkern.bench.timing import plan_repeats, synchronized


def test_bandwidth_probe(benchmark, device, quick, budget_s):
    probe = bandwidth_probe(device, probe_numel(device, quick))
    benchmark.group = "bandwidth"
    benchmark.extra_info.update({"probe": probe.description, "bytes": probe.bytes_moved, "device": device.type})
    rounds = plan_repeats(probe.run, device, budget_s)
    benchmark.pedantic(synchronized(probe.run, device), rounds=rounds, iterations=1)
