"""Benchmarks: ``python -m curvkern.bench`` times every optimizer backend against the eager reference
and against ``torch.optim.AdamW(fused=True)``, and reports GB/s of compulsory traffic against the
machine's measured bandwidth.

- :mod:`curvkern.bench.cases`: the cases as data (shared with the pytest-benchmark suites in ``bench/``)
- :mod:`curvkern.bench.timing`: how one case is timed
- :mod:`curvkern.bench.report`: the record format, the table, the PNG, the pytest-benchmark converter
"""
