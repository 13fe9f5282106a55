"""The optimizers on DTensor parameters (FSDP2's layout: Shard(0) over a 1-D mesh of 2 gloo ranks on this
machine) against one process stepping the whole model: the step time per rank and the bytes each step
communicates.

pytest-benchmark times the one-process step; the 2-rank run is timed inside its ranks (median of warm steps,
each rank one thread, as the one process has one thread per core) and recorded in the record's
``extra_info``: ``rank_step_s`` (per rank), ``bytes_sent_per_step`` and ``bytes_received_per_step`` (per rank,
counted at the ``all_gather`` calls the optimizers make), and their ``world_size``.

    pytest bench/test_bench_distributed.py --benchmark-json=distributed.json
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from curvkern.bench.timing import plan_repeats
from curvkern.optim import BiostatisV6, HysteroGrad

OPTIMIZERS = {"HysteroGrad": HysteroGrad, "BiostatisV6": BiostatisV6}
WORLD_SIZE = 2
TENSORS = 8
TIMED_STEPS = 20


def shapes(quick: bool) -> list[tuple[int, int]]:
    """Eight weight-like tensors: 8 × 2^19 fp32 elements (16 MiB of parameters) by default."""
    rows = 16 if quick else 512
    return [(rows + 1, 1024)] * TENSORS  # one row more than splits evenly: uneven shards, as FSDP2 often has


def make_params(quick: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for shape in shapes(quick)]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g


class CountingAllGather:
    """dist.all_gather, counting the bytes this rank sends and receives."""

    def __init__(self):
        self.sent = self.received = 0
        self.inner = dist.all_gather

    def __call__(self, outputs, tensor, *args, **kwargs):
        size = tensor.numel() * tensor.element_size()
        self.sent += size
        self.received += size * (len(outputs) - 1)
        return self.inner(outputs, tensor, *args, **kwargs)


def _rank_main(rank: int, port: int, out_dir: str, name: str, quick: bool) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        whole = make_params(quick)
        params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)], src_data_rank=None)) for p in whole]
        grads = [distribute_tensor(p * 1e-3, mesh, [Shard(0)], src_data_rank=None) for p in whole]
        set_grads(params, grads)
        optimizer = OPTIMIZERS[name](params, fused="cpp")
        for _ in range(3):  # warm: state allocated, pages touched
            optimizer.step()
        counter = CountingAllGather()
        dist.all_gather = counter
        times = []
        for _ in range(TIMED_STEPS):
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        dist.all_gather = counter.inner
        result = dict(
            step_s=statistics.median(times),
            bytes_sent=counter.sent / TIMED_STEPS,
            bytes_received=counter.received / TIMED_STEPS,
        )
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sharded_steps(name: str, quick: bool, out_dir: str) -> list[dict]:
    torch.multiprocessing.start_processes(
        _rank_main, args=(free_port(), out_dir, name, quick), nprocs=WORLD_SIZE, join=True, start_method="spawn"
    )
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sharded_step_against_one_process(benchmark, name, device, quick, budget_s, tmp_path):
    if device.type != "cpu":
        pytest.skip("the gloo run is a CPU benchmark")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ranks = sharded_steps(name, quick, str(tmp_path))
    params = [torch.nn.Parameter(p) for p in make_params(quick)]
    set_grads(params, [p.detach() * 1e-3 for p in params])
    optimizer = OPTIMIZERS[name](params, fused="cpp")
    for _ in range(3):
        optimizer.step()
    benchmark.group = f"distributed {name}"
    benchmark.extra_info.update(
        optimizer=name,
        backend="cpp",
        shapes=[list(shape) for shape in shapes(quick)],
        dtype="float32",
        world_size=WORLD_SIZE,
        layout="Shard(0) DTensors on a 1-D gloo mesh",
        rank_step_s=[rank["step_s"] for rank in ranks],
        bytes_sent_per_step=[rank["bytes_sent"] for rank in ranks],
        bytes_received_per_step=[rank["bytes_received"] for rank in ranks],
    )
    benchmark.pedantic(optimizer.step, rounds=plan_repeats(optimizer.step, device, budget_s), iterations=1)
