"""Timing one callable: a warm-up, then repeats; CUDA events on a GPU, ``time.perf_counter`` on the CPU.

The number of repeats follows from a time budget per case, so a 20 ms fused step gets many repeats
and a 2 s eager reference a few, and the whole default run stays within minutes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

BUDGET_S = 3.0  # per case, at the default size
QUICK_BUDGET_S = 0.0  # --quick: just the minimum number of repeats
MIN_REPEATS = 3
MAX_REPEATS = 30


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    repeats: int


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def plan_repeats(fn: Callable[[], object], device: torch.device, budget_s: float) -> int:
    """Call ``fn`` once as a warm-up and return how many timed calls fit in ``budget_s``."""
    warmup_s = time_once(fn, device)
    return max(MIN_REPEATS, min(MAX_REPEATS, int(budget_s / warmup_s)))


def time_callable(fn: Callable[[], object], device: torch.device, budget_s: float) -> Timing:
    repeats = plan_repeats(fn, device, budget_s)
    times = [time_once(fn, device) for _ in range(repeats)]
    return Timing(median_s=statistics.median(times), min_s=min(times), repeats=repeats)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronize, for timers that only read the host clock (pytest-benchmark)."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call
