"""The optimizers' statistics over a process group (``process_group=``, docs/distributed.md).

With ``process_group`` set, each rank holds whole tensors of a param group (ZeroRedundancyOptimizer's
partition) and the group-level statistics are summed over the ranks between pass A and the scalar stage:
HysteroGrad's Σu² and BiostatisV6's group column sums (its per-tensor statistics stay local). The sum is
gathered and added in rank order, so every rank computes the same bits whatever order messages arrive in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def check_process_group(process_group: object, owner: str) -> None:
    """Raise unless ``process_group`` is None or a group of an initialized ``torch.distributed``: TypeError for
    anything else, RuntimeError for a group whose default group is gone (``destroy_process_group``).

    None means "no communication". Before ``init_process_group``, ``dist.group.WORLD`` *is* None, so an
    object built then with ``process_group=dist.group.WORLD`` would never communicate: build it after.
    """
    if process_group is None:
        return
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{owner}: process_group must be a torch.distributed.ProcessGroup or None, got {process_group!r}"
        )
    if not dist.is_initialized():
        raise RuntimeError(f"{owner}: process_group= needs an initialized torch.distributed default group")


def collective_device(process_group: dist.ProcessGroup) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(process_group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class GroupReduction:
    """Sums a param group's small tensor of partials over the ranks of ``process_group``, in rank order.

    Called by the backends between pass A and the scalar stage (``reduce_partials``); one ``all_gather`` of
    the packed partials per group and step.
    """

    def __init__(self, process_group: dist.ProcessGroup):
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.device = collective_device(process_group)

    def __call__(self, partials: torch.Tensor) -> torch.Tensor:
        local = partials.detach().reshape(-1).to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.process_group)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.to(partials.device).reshape(partials.shape)

    def any_rank(self, local: list[bool]) -> list[bool]:
        """Per param group: whether it has a gradient on any rank (one ``all_reduce`` per step)."""
        flags = torch.tensor(local, dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        return [bool(flag) for flag in flags.tolist()]


def refuse_reduction_under_compile(reduce_partials, optimizer: str) -> None:
    """The Triton steps run as one opaque op under torch.compile, which cannot call back into a collective
    between its passes: raise rather than step on local statistics."""
    if reduce_partials is not None:
        raise NotImplementedError(
            f"{optimizer}(fused='triton', process_group=...) cannot run under torch.compile: its step is one "
            "opaque op there; use fused='eager' or 'cpp', or step outside the compiled region"
        )
