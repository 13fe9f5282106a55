"""The benchmark cases as data: which kernel, on which backend, at which shape and dtype, and how many
bytes one call must move at the least.

The main job (``python -m curvkern.bench``) and the pytest-benchmark suites under ``bench/`` both take
their cases from :func:`build_cases`, one kernel per optimizer family of :data:`curvkern.families.FAMILIES`
(each with its row in :data:`TRAFFIC`) beside fused AdamW, so a backend registered with
:mod:`curvkern._dispatch` shows up in both the day it lands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from curvkern import available_backends
from curvkern.bandwidth import PROBE_NUMEL
from curvkern.bench.ce_cases import PEER_BACKENDS as CE_PEER_BACKENDS, CrossEntropyCase, build_cross_entropy_cases
from curvkern.bench.linear_ce_cases import (
    PEER_BACKENDS as LINEAR_CE_PEER_BACKENDS,
    LinearCrossEntropyCase,
    build_linear_cross_entropy_cases,
)
from curvkern.families import OPTIMIZER, Family, families_of_kind
from curvkern.optim._common import state_dtype

REFERENCE_BACKEND = "eager"
PEER_KERNEL = "adamw"
PEER_BACKEND = "torch-fused"

# Arrays one optimizer step must stream per parameter element, in the order the kernels touch them.
# ``p`` and ``g`` have the parameter's dtype, every other name is optimizer state. A name listed twice
# is a second pass over that array, which no kernel can avoid: the whole group's reduction sits between
# the passes. Sources:
# - AdamW (fused): reads p, g, m, v and writes p, m, v; the issue counts "about 7 arrays per element".
# - HysteroGrad, docs/hysterograd.md ("Traffic floor"): pass A reads g, G and writes G; pass B reads g, G again
#   (to recompute u) and p, and writes p: 7, as the issue counts.
# - BiostatisV6, docs/biostatis.md ("Traffic floor"): the group statistics need every g read once before any
#   parameter moves; then each tensor's moment sums (g, m, v) and its update (g, m, v, both EMAs and p
#   read; m, v, both EMAs and p written) can run back to back while g, m, v are still in cache: 12
#   arrays (two plain passes over the group would move 14: 9 reads and 5 writes).
TRAFFIC: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "adamw": (("p", "g", "m", "v"), ("p", "m", "v")),
    "hysterograd": (("g", "G", "g", "G", "p"), ("G", "p")),
    "biostatis": (("g", "g", "m", "v", "ema1", "ema2", "p"), ("m", "v", "ema1", "ema2", "p")),
}
PARAMETER_DTYPE_ARRAYS = ("p", "g")

# The quick bandwidth-probe size only checks the plumbing.
QUICK_PROBE_NUMEL = 2**20


@dataclass(frozen=True)
class Shape:
    num_tensors: int
    numel: int

    @property
    def label(self) -> str:
        return f"{self.num_tensors}x{self.numel}"


# The C++ issue's three workloads:
# (a) 40 fp32 tensors of 2^20: AdamW's p, g, m, v take 640 MiB, past this machine's 480 MiB last-level
#     cache, so the figures are DRAM bandwidth;
# (b) 1000 tensors of 1000 elements: per-tensor overheads (launches, Python loops) dominate;
# (c) (a) in bf16, where curvkern keeps fp32 state and fused AdamW keeps bf16 state.
DEFAULT_WORKLOADS = (
    (Shape(40, 2**20), torch.float32),
    (Shape(1000, 1000), torch.float32),
    (Shape(40, 2**20), torch.bfloat16),
)
# On a GPU (--device cuda) instead, the Triton issue's sizes: 100M fp32 parameters in 200 tensors (DRAM
# bandwidth) and in 20,000 tensors (per-tensor overheads: the Triton kernels' launches do not grow with
# the count), and the first in bf16.
GPU_WORKLOADS = (
    (Shape(200, 500_000), torch.float32),
    (Shape(20_000, 5_000), torch.float32),
    (Shape(200, 500_000), torch.bfloat16),
)
QUICK_WORKLOADS = ((Shape(4, 4096), torch.float32), (Shape(50, 100), torch.float32), (Shape(4, 4096), torch.bfloat16))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _curvkern_state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return state_dtype(torch.empty(0, dtype=param_dtype))


@dataclass(frozen=True)
class Kernel:
    name: str
    make_optimizer: Callable[[list[torch.Tensor], str], torch.optim.Optimizer]
    state_dtype: Callable[[torch.dtype], torch.dtype]
    family: str | None  # the family's name in curvkern.families.FAMILIES; None for the torch peer

    def backends(self, device: torch.device) -> list[str]:
        if self.family is None:
            return [PEER_BACKEND]
        # Triton on CPU tensors runs in its interpreter, a correctness tool: timing it says nothing.
        return [b for b in available_backends(self.family, device) if not (b == "triton" and device.type == "cpu")]

    def bytes_per_element(self, param_dtype: torch.dtype) -> int:
        reads, writes = TRAFFIC[self.name]
        state_itemsize = self.state_dtype(param_dtype).itemsize
        return sum(
            param_dtype.itemsize if array in PARAMETER_DTYPE_ARRAYS else state_itemsize for array in reads + writes
        )


def _family_kernel(family: Family) -> Kernel:
    """An optimizer family's kernel: its optimizer with the default hyperparameters."""
    return Kernel(
        family.name, lambda params, backend: family.api(params, fused=backend), _curvkern_state_dtype, family.name
    )


KERNELS = (
    Kernel(PEER_KERNEL, lambda params, _backend: torch.optim.AdamW(params, fused=True), lambda dtype: dtype, None),
    *map(_family_kernel, families_of_kind(OPTIMIZER)),
)


@dataclass(frozen=True)
class Case:
    kernel: Kernel
    backend: str
    shape: Shape
    dtype: torch.dtype
    device: torch.device
    suite = "optim"  # which bench/ module times it
    input_bytes = None  # peak memory is measured for the cross-entropy cases only

    @property
    def name(self) -> str:
        return f"{self.kernel.name}/{self.backend}/{self.shape.label}/{dtype_name(self.dtype)}"

    @property
    def workload(self) -> str:
        """What the cases compared with each other share: the pytest-benchmark group."""
        return f"{self.shape.label}/{dtype_name(self.dtype)}/{self.device.type}"

    @property
    def compulsory_bytes(self) -> int:
        return self.shape.num_tensors * self.shape.numel * self.kernel.bytes_per_element(self.dtype)

    def describe(self) -> dict:
        """The fields that identify the case in a report record (and in pytest-benchmark's extra_info)."""
        return {
            "kernel": self.kernel.name,
            "backend": self.backend,
            "shape": self.shape.label,
            "dtype": dtype_name(self.dtype),
            "device": self.device.type,
            "bytes": self.compulsory_bytes,
        }

    def setup(self, warmup_steps: int = 2) -> Callable[[], object]:
        """Build parameters with gradients and the optimizer; return its ``step``, already warmed up.

        The warm-up steps create the optimizer state, so the timed steps only stream it.
        """
        generator = torch.Generator(self.device).manual_seed(0)

        def random_tensor() -> torch.Tensor:
            return torch.randn(self.shape.numel, generator=generator, device=self.device).to(self.dtype)

        params = [random_tensor() for _ in range(self.shape.num_tensors)]
        for param in params:
            param.grad = random_tensor()
        optimizer = self.kernel.make_optimizer(params, self.backend)
        for _ in range(warmup_steps):
            optimizer.step()
        return optimizer.step


def build_cases(device: torch.device, quick: bool = False) -> list[Case | CrossEntropyCase | LinearCrossEntropyCase]:
    """Every kernel on every backend that can run on ``device``, for each workload: the optimizers, then
    the cross-entropy cases of :mod:`curvkern.bench.ce_cases` and the fused linear + cross-entropy cases of
    :mod:`curvkern.bench.linear_ce_cases`."""
    workloads = QUICK_WORKLOADS if quick else GPU_WORKLOADS if device.type == "cuda" else DEFAULT_WORKLOADS
    optimizer_cases = [
        Case(kernel, backend, shape, dtype, device)
        for shape, dtype in workloads
        for kernel in KERNELS
        for backend in kernel.backends(device)
    ]
    return optimizer_cases + build_cross_entropy_cases(device, quick) + build_linear_cross_entropy_cases(device, quick)


def peer_of(kernel: str) -> tuple[str, str]:
    """The (kernel, backend) a record's ``speedup_vs_peer`` is taken against: fused AdamW for the
    optimizers, PyTorch's (or hessian-eigenthings') own path for the cross-entropy kernels, and for the
    linear + cross-entropy kernels PyTorch's double backward, the materialised GGN or K separate calls."""
    peers = {**CE_PEER_BACKENDS, **LINEAR_CE_PEER_BACKENDS}
    if kernel in peers:
        return kernel, peers[kernel]
    return PEER_KERNEL, PEER_BACKEND


def probe_numel(device: torch.device, quick: bool) -> int:
    return QUICK_PROBE_NUMEL if quick else PROBE_NUMEL[device.type]
