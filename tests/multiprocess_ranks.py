"""Multi-process tests: gloo ranks on 127.0.0.1, spawned, each bounded in time."""

from __future__ import annotations

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
