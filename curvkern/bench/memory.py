"""Peak memory of one call beyond what was allocated before it.

On a GPU: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus the allocated bytes before.
On the CPU (Linux): the process's peak resident set (``VmHWM``), reset through ``/proc/self/clear_refs``
just before the call, minus the resident set before it. PyTorch's CPU allocator hands every large tensor
to glibc, which maps it afresh and unmaps it when freed, so the resident set follows the live tensors page
by page; ``tracemalloc`` sees none of this and the profiler only counts what passes through its hooks.
Small Python-side allocations land in the figure too, negligible next to an (N, V) tensor.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


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
