"""Measured memory bandwidth: the ceiling every kernel's GB/s is reported against."""
from __future__ import annotations

import time

import torch

from curvkern._dispatch import cpp_unavailable_reason


def _require_extension() -> None:
    reason = cpp_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"curvkern.bandwidth needs the C++ extension: {reason}")


if cpp_unavailable_reason() is None:

    @torch.library.register_fake("curvkern::stream_triad_")
    def _stream_triad_fake(out, a, b, scalar):
        torch._check(a.shape == b.shape == out.shape, lambda: "out, a and b must have one shape")
        torch._check(a.dtype == b.dtype == out.dtype, lambda: "out, a and b must share one dtype")


def stream_triad_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scalar: float) -> torch.Tensor:
    """``out = a + scalar * b`` in one OpenMP region (the STREAM triad); returns ``out``."""
    _require_extension()
    torch.ops.curvkern.stream_triad_(out, a, b, scalar)
    return out


def triad_bytes(numel: int, dtype: torch.dtype) -> int:
    """Compulsory traffic of one triad: read a and b, write out."""
    return 3 * numel * torch.empty((), dtype=dtype).element_size()


def measure_cpu_bandwidth(numel: int = 64 * 2**20, repeats: int = 10) -> float:
    """Best triad bandwidth in GB/s on float32 arrays of ``numel`` elements.

    The default (3 x 256 MiB) exceeds this machine's several-hundred-MiB last-level cache, so the
    figure is DRAM bandwidth, not cache bandwidth.
    """
    _require_extension()
    a = torch.rand(numel)
    b = torch.rand(numel)
    out = torch.empty(numel)
    stream_triad_(out, a, b, 0.5)  # first touch of out's pages
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        stream_triad_(out, a, b, 0.5)
        best = min(best, time.perf_counter() - start)
    return triad_bytes(numel, out.dtype) / best / 1e9


def measure_cuda_bandwidth(numel: int = 256 * 2**20, repeats: int = 20, device: str = "cuda") -> float:
    """Best device-to-device copy bandwidth in GB/s (read + write), timed with CUDA events."""
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / best / 1e9
