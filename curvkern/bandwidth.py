"""The bandwidth probe: the operation whose best time gives the ceiling every kernel's GB/s is
reported against.

On the CPU it is curvkern._C's in-place ``a += s·b`` over arrays larger than the last-level cache:
2 reads and 1 write per element, the access pattern of an optimizer step, with no hidden
write-allocate read, so the bytes it counts are the bytes it moves. On a GPU it is a
device-to-device copy (read + write), timed with CUDA events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from curvkern._dispatch import cpp_unavailable_reason

# 3 x 256 MiB on the CPU exceeds this machine's 480 MiB last-level cache; 1 GiB per array on a GPU
# dwarfs any L2.
PROBE_NUMEL = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}
PROBE_DESCRIPTION = {"cpu": "in-place a += s*b, curvkern._C", "cuda": "CUDA device-to-device copy"}


if cpp_unavailable_reason() is None:

    @torch.library.register_fake("curvkern::stream_axpy_")
    def _stream_axpy_fake(a, b, scalar):
        torch._check(a.shape == b.shape, lambda: "a and b must have one shape")
        torch._check(a.dtype == b.dtype, lambda: "a and b must share one dtype")


def stream_axpy_(a: torch.Tensor, b: torch.Tensor, scalar: float) -> torch.Tensor:
    """``a += scalar * b`` in place, in one OpenMP region; returns ``a``."""
    reason = cpp_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU bandwidth probe needs the C++ extension: {reason}")
    torch.ops.curvkern.stream_axpy_(a, b, scalar)
    return a


@dataclass(frozen=True)
class BandwidthProbe:
    run: Callable[[], object]
    bytes_moved: int  # per call
    description: str


def bandwidth_probe(device: torch.device | str = "cpu", numel: int | None = None) -> BandwidthProbe:
    """The probe on ``device`` over arrays of ``numel`` float32 elements (default: past any cache)."""
    device = torch.device(device)
    numel = PROBE_NUMEL[device.type] if numel is None else numel
    if device.type == "cuda":
        src = torch.empty(numel, device=device).uniform_()
        dst = torch.empty_like(src)
        return BandwidthProbe(lambda: dst.copy_(src), 2 * numel * src.itemsize, PROBE_DESCRIPTION["cuda"])
    a, b = torch.rand(numel), torch.rand(numel)
    # A tiny scale keeps a finite over any number of calls.
    return BandwidthProbe(lambda: stream_axpy_(a, b, 1e-12), 3 * numel * a.itemsize, PROBE_DESCRIPTION["cpu"])


def measure_bandwidth(device: torch.device | str = "cpu", numel: int | None = None, repeats: int = 10) -> float:
    """Best GB/s of the probe over ``repeats`` timed calls, after one warm-up call."""
    from curvkern.bench.timing import time_once  # the benchmarks' timer: CUDA events or perf_counter

    device = torch.device(device)
    probe = bandwidth_probe(device, numel)
    probe.run()
    best = min(time_once(probe.run, device) for _ in range(repeats))
    return probe.bytes_moved / best / 1e9
