"""Peak memory of one call beyond what was allocated before it.

On a GPU: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus the allocated bytes before.
On the CPU (Linux): the process's peak resident set (``VmHWM``), reset through ``/proc/self/clear_refs``
just before the call, minus the resident set before it. PyTorch's CPU allocator hands every large tensor
to glibc, which maps it afresh and unmaps it when freed (below: how that is made to hold for every block),
so the resident set follows the live tensors page by page; ``tracemalloc`` sees none of this and the
profiler only counts what passes through its hooks.
Small Python-side allocations land in the figure too, negligible next to an (N, V) tensor.

glibc's own threshold for mapping a block afresh moves up after each mapped block is freed (to at most
32 MiB), and freed heap memory below 2× that stays resident: tens of MiB of a call's temporaries (the fused
linear cross-entropy's 16 MiB tiles) could then reuse pages resident before the call and not count, and
freed leftovers of an earlier call could leave during this one. So the first measurement pins glibc's
thresholds (:func:`pin_allocator_thresholds`): from then on every block of 64 KiB or more is mapped when
allocated and unmapped when freed, and the resident set follows the live tensors to a few pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
PINNED_THRESHOLD_BYTES = 64 * 2**10


@functools.cache
def pin_allocator_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds at 64 KiB (which also stops their adjustment): True where that
    was done, False without glibc. Once per process."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, PINNED_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, PINNED_THRESHOLD_BYTES)
    )


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def extra_peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one ``fn()`` call on top of what was live before; None where it cannot
    be measured (a CPU without /proc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    pin_allocator_thresholds()
    try:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) * 1024
