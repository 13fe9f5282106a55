"""The optimizers' statistics over a process group (``process_group=``, docs/distributed.md).

With ``process_group`` set, each rank holds whole tensors of a param group (ZeroRedundancyOptimizer's
partition) and the group-level statistics are summed over the ranks between pass A and the scalar stage:
HysteroGrad's Σu² and BiostatisV6's group column sums (its per-tensor statistics stay local). With DTensor
parameters (FSDP2, tensor parallelism) each rank holds shards, and the per-tensor statistics are summed too,
over the mesh dimensions each tensor is sharded on. Every sum is gathered and added in rank order, so every
rank computes the same bits whatever order messages arrive in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from curvkern._dispatch import is_dtensor


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
    """Sums a param group's partials over the ranks of ``process_group``, in rank order: the ``reduce_partials``
    the backends call between pass A and the scalar stage, for ranks that each hold whole tensors (ZeRO).

    One ``all_gather`` of the packed partials per group and step. HysteroGrad sums its accumulator (Σu² of
    every tensor it holds: :attr:`counted` is None) with :meth:`__call__`; BiostatisV6 keeps its per-tensor
    rows local and sums their column sums (:meth:`tensor_and_group_sums`).
    """

    counted: list[bool] | None = None

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

    def tensor_and_group_sums(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows``: [n, k] float64, one row of partials per tensor this rank steps (BiostatisV6: the element
        count, then the six sums), in parameter order. Returns the rows the scalar stage reads and the group's
        column sums, both summed over the ranks as far as the tensors are spread over them."""
        return rows, self(rows.sum(0))

    def any_rank(self, local: list[bool]) -> list[bool]:
        """Per param group: whether it has a gradient on any rank (one ``all_reduce`` per step)."""
        flags = torch.tensor(local, dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        return [bool(flag) for flag in flags.tolist()]


class ShardReduction(GroupReduction):
    """The reduction of a param group of DTensors (FSDP2, tensor parallelism, hybrid meshes): each rank holds a
    shard of every tensor, and each tensor's partials are summed over the mesh dimensions it is sharded on.

    A rank whose coordinate is not 0 on a mesh dimension a tensor is replicated on holds a copy of another
    rank's shard: its partials of that tensor are left out (:attr:`counted` False; the rows are zeroed), so one
    rank-ordered sum over every rank of the mesh adds each shard once. One ``all_gather`` per group and step.
    """

    def __init__(self, process_group: dist.ProcessGroup, counted: list[bool]):
        super().__init__(process_group)
        self.counted = counted

    def tensor_and_group_sums(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counted = torch.tensor(self.counted, dtype=torch.bool, device=rows.device).reshape(-1, 1)
        rows = self(torch.where(counted, rows, torch.zeros_like(rows)))
        return rows, rows.sum(0)


def mesh_group(mesh) -> dist.ProcessGroup:
    """A process group of every rank of ``mesh``: its own for a 1-D mesh, the default group for a mesh that
    spans all ranks. NotImplementedError for a multi-dimensional mesh over some of the ranks only."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise NotImplementedError(
        f"DTensor parameters on a {mesh.ndim}-D device mesh of {mesh.size()} of the {dist.get_world_size()} ranks "
        "are not supported: the group statistics are summed over a process group of the whole mesh, which exists "
        "for 1-D meshes and for meshes over every rank"
    )


def counts_here(param) -> bool:
    """Whether this rank's shard of DTensor ``param`` enters the sums: its coordinate is 0 on every mesh
    dimension ``param`` is replicated on."""
    coordinate = param.device_mesh.get_coordinate()
    return all(coordinate[dim] == 0 for dim, placement in enumerate(param.placements) if placement.is_replicate())


def refuse_reduction_under_compile(reduce_partials, optimizer: str) -> None:
    """The Triton steps run as one opaque op under torch.compile, which cannot call back into a collective
    between its passes: raise rather than step on local statistics."""
    if reduce_partials is not None:
        raise NotImplementedError(
            f"{optimizer}(fused='triton', process_group=...) cannot run under torch.compile: its step is one "
            "opaque op there; use fused='eager' or 'cpp', or step outside the compiled region"
        )


def sharded_group_mesh(name: str, params: list[torch.Tensor], group_index: int):
    """The device mesh of a param group of DTensors, or None for a group of plain tensors.

    TypeError for a group that mixes DTensors and plain tensors, spreads over several meshes, or has a
    placement other than ``Shard`` or ``Replicate`` (``Partial``: a parameter is never a pending sum).
    """
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return None
    where = f"param group {group_index}"
    if not all(sharded):
        plain = sharded.index(False)
        raise TypeError(
            f"{name}: {where} mixes DTensor and plain parameters (parameter {plain} is a plain tensor); "
            "put them in separate param groups, or make every parameter of the group a DTensor"
        )
    mesh = params[0].device_mesh
    for index, param in enumerate(params):
        if param.device_mesh != mesh:
            raise TypeError(
                f"{name}: {where} holds DTensors on two device meshes ({mesh} and, at parameter {index}, "
                f"{param.device_mesh}); the group's statistics are summed over one mesh: one group per mesh"
            )
        for placement in param.placements:
            if not (placement.is_shard() or placement.is_replicate()):
                raise TypeError(
                    f"{name}: parameter {index} in {where} has placements {tuple(param.placements)}; DTensor "
                    "parameters are supported sharded (Shard) or replicated (Replicate) on each mesh dimension"
                )
    return mesh


def same_layout(tensor: object, param: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor laid out as DTensor ``param``: mesh, placements and global shape."""
    return (
        is_dtensor(tensor)
        and tensor.device_mesh == param.device_mesh
        and tuple(tensor.placements) == tuple(param.placements)
        and tensor.shape == param.shape
    )


def layout_name(tensor: object) -> str:
    if is_dtensor(tensor):
        return f"a DTensor of shape {tuple(tensor.shape)} with placements {tuple(tensor.placements)}"
    return f"a plain {type(tensor).__name__}"


def local_tensors(value):
    """DTensors replaced by their local shards (the same tensor object on every call, outside autograd), in
    lists and tuples too; anything else as it is."""
    if is_dtensor(value):
        return value.to_local()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(map(local_tensors, value))
    return value


def local_gradients(name: str, group_index: int, params: list[torch.Tensor], grads: list) -> list:
    """The local shards of the gradients of a group of DTensor parameters (None stays None). RuntimeError for a
    gradient not laid out like its parameter (e.g. ``Partial``: not yet reduced)."""
    for index, (param, grad) in enumerate(zip(params, grads)):
        if grad is not None and not same_layout(grad, param):
            raise RuntimeError(
                f"{name}: the gradient of parameter {index} in param group {group_index} is {layout_name(grad)}, "
                f"its parameter {layout_name(param)}; the step takes gradients laid out like their parameters"
            )
    return [None if grad is None else grad.to_local() for grad in grads]


def local_state_entry(name: str, where: str, param: torch.Tensor, entry: dict) -> dict:
    """``entry`` (the state of DTensor ``param``) with each tensor of the parameter's shape as its local shard.

    Such state is kept as a DTensor laid out like the parameter, so that torch.distributed.checkpoint saves
    and loads it sharded; RuntimeError for one that is not (a plain tensor, other placements). 0-dim state
    (step counts, HysteroGrad's group scalars) is plain.
    """

    def local(key: str, value):
        if isinstance(value, list):
            return [local(f"{key}[{j}]", item) for j, item in enumerate(value)]
        if not isinstance(value, torch.Tensor) or (not is_dtensor(value) and value.dim() == 0):
            return value
        if not same_layout(value, param):
            raise RuntimeError(
                f"{name}: state '{key}' of {where} is {layout_name(value)}, its parameter {layout_name(param)}; "
                "the state of a DTensor parameter is a DTensor laid out like it"
            )
        return value.to_local()

    return {key: local(str(key), value) for key, value in entry.items()}


def state_like(param: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A loaded state tensor as the step keeps it: a copy in ``dtype`` on ``param``'s device, and for a DTensor
    ``param`` a DTensor laid out like it (a DTensor is redistributed; a plain tensor, the whole state as a
    one-process checkpoint holds it, is sharded here, each rank keeping its own part)."""
    if not is_dtensor(param):
        return value.to(device=param.device, dtype=dtype, copy=True)
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(value):
        value = value.redistribute(param.device_mesh, param.placements)
    else:
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value.to(dtype=dtype, copy=True)
