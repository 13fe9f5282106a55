"""Multi-process tests: gloo ranks on 127.0.0.1, spawned, each bounded in time; and the small model the
data-parallel ones (DDP, FSDP2) train against one process."""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """This rank's default process group: gloo on 127.0.0.1, collectives failing after ``timeout_s``."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def rank_output(out_dir: str, rank: int) -> str:
    """Where rank ``rank`` saves its results (``torch.save``) for the test process to read."""
    return os.path.join(out_dir, f"rank{rank}.pt")


def run_ranks(target, world_size: int, timeout_s: float, out_dir: str, *args) -> list:
    """Runs ``target(rank, port, out_dir, *args)`` in ``world_size`` spawned processes (the target calls
    :func:`init_gloo` and saves to :func:`rank_output`), kills any still running after ``timeout_s``, fails
    unless every rank exited 0, and returns what each saved. Skips without gloo."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=target, args=(r, port, out_dir, *args)) for r in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout_s)
    for process in processes:
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in processes] == [0] * world_size, "a rank failed or timed out"
    return [torch.load(rank_output(out_dir, r)) for r in range(world_size)]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """HysteroGrad keeps its group scalars in the default dtype, as the original: fp64 runs make it fp64, so
    that the whole step is fp64."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def mlp(dtype: torch.dtype) -> torch.nn.Module:
    """The same small model in every rank and in the one-process reference: 7 hidden rows and an output bias of
    3, which split unevenly (FSDP2's Shard(0) leaves one of 4 ranks an empty bias shard)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def mlp_batch(step: int, dtype: torch.dtype) -> torch.Tensor:
    """Step ``step``'s whole batch, 8 rows: each of W ranks trains on 8/W of them."""
    gen = torch.Generator().manual_seed(200 + step)
    return torch.randn(8, 5, generator=gen, dtype=torch.float64).to(dtype)


def train_mlp(model, optimizer, rows: slice, dtype: torch.dtype, steps: int) -> list:
    """``steps`` steps of a mean-squared loss on ``rows`` of each batch; what each ``step()`` returned."""
    returned = []
    with default_dtype(dtype):
        for step in range(steps):
            model(mlp_batch(step, dtype)[rows]).pow(2).mean().backward()
            returned.append(optimizer.step())
            optimizer.zero_grad()
    return returned


def one_process_mlp(optimizer_class, backend: str, dtype: torch.dtype, steps: int, **hyperparameters):
    """The reference of the data-parallel runs: one process training :func:`mlp` on every row of each batch.
    Returns the final parameters and what each ``step()`` returned."""
    model = mlp(dtype)
    optimizer = optimizer_class(model.parameters(), fused=backend, **hyperparameters)
    returned = train_mlp(model, optimizer, slice(None), dtype, steps)
    return [p.detach() for p in model.parameters()], returned
