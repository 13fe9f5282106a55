"""The optimizers over plain-tensor data parallelism on gloo ranks (127.0.0.1): DistributedDataParallel (every
rank steps every tensor, nothing to pass) and ZeroRedundancyOptimizer on 2 and 4 ranks, where
each rank steps whole tensors of every param group and ``process_group=`` sums the group statistics over them.
Equal to one process holding every tensor after 10 steps (fp64 ≤ 1e-12, fp32 within the tolerance policy),
HysteroGrad's returned tuple identical on every rank, for every CPU backend. The partition leaves one rank
without any tensor of a group, and one tensor goes without a gradient for a step; without ``process_group``
the results differ (the statistics stay local), so the comparison has teeth."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiprocess_ranks import (
    default_dtype,
    free_port,
    init_gloo,
    mlp,
    mlp_batch,
    one_process_mlp,
    rank_output,
    run_ranks,
    train_mlp,
)
from tolerance import BIOSTATIS_OPS, HYSTEROGRAD_OPS, assert_fused_close
from torch.distributed.optim import ZeroRedundancyOptimizer

from curvkern import available_backends
from curvkern.optim import BiostatisV6, HysteroGrad

# Spawned gloo ranks: `make test` runs these; `make test-fast` leaves them out (they are most of its time).
pytestmark = pytest.mark.slow

WORLD_SIZE = 2
STEPS = 10
TIMEOUT_S = 240
# ZeroRedundancyOptimizer's partition (largest first, to the rank with fewer elements so far): group 0's
# tensors 0 and 3 on rank 0, 1 and 2 on rank 1; group 1's one tensor on rank 0, so rank 1 holds no tensor
# of group 1.
SHAPES = ([(6, 5), (29,), (3, 4), (5,)], [(7,)])
# (step, group, tensor) without a gradient: at step 3 one of rank 1's tensors; at step 5 group 1 on every
# rank (the group is skipped everywhere); at step 7 all of rank 1's share of group 0 (it must still step).
NO_GRAD_AT = {(3, 0, 1), (5, 1, 0), (7, 0, 1), (7, 0, 2)}
OPTIMIZERS = {
    "HysteroGrad": (HysteroGrad, dict(lr=0.02, grad_clip=1.0), HYSTEROGRAD_OPS),
    "BiostatisV6": (BiostatisV6, dict(lr=0.01, weight_decay=0.01), BIOSTATIS_OPS),
}
DTYPES = (torch.float64, torch.float32)


def make_params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [
        [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for shape in group]
        for group in SHAPES
    ]


def set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for g, group in enumerate(params):
        for t, p in enumerate(group):
            grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * (0.5 + g)
            p.grad = None if (step, g, t) in NO_GRAD_AT else grad


def run(optimizer, params) -> list:
    """STEPS steps; HysteroGrad is shocked once half-way (every rank's group scalars, held or not)."""
    returned = []
    for step in range(STEPS):
        set_grads(params, step)
        returned.append(optimizer.step())
        local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's own optimizer
        if step == STEPS // 2 and hasattr(local, "shock"):
            local.shock(0.5)
    return returned


def cases(backends):
    return [(name, backend, dtype) for name in OPTIMIZERS for backend in backends for dtype in DTYPES]


def _rank_main(rank: int, port: int, out_dir: str, backends: list[str], world_size: int) -> None:
    """ZeRO runs with and without ``process_group`` (the latter and the checkpoint round trip on 2 ranks only),
    and DDP."""
    init_gloo(rank, world_size, port, TIMEOUT_S)
    try:
        torch.set_num_threads(1)
        results = {}
        for name, backend, dtype in cases(backends):
            cls, hyperparameters, _ = OPTIMIZERS[name]
            for grouped in (True, False) if world_size == WORLD_SIZE else (True,):
                params = make_params(dtype)
                group = dist.group.WORLD if grouped else None
                zero = ZeroRedundancyOptimizer(
                    [{"params": group_params} for group_params in params],
                    optimizer_class=functools.partial(cls, fused=backend, process_group=group),
                    **hyperparameters,
                )
                with default_dtype(dtype):
                    returned = run(zero, params)
                results[name, backend, dtype, grouped] = ([p.detach() for g in params for p in g], returned)
            results[name, backend, dtype, "ddp"] = ddp_run(name, backend, dtype)
        if world_size == WORLD_SIZE:
            for name in OPTIMIZERS:
                results[name, "resumed"] = resumed_from_checkpoint(name)
        torch.save(results, rank_output(out_dir, rank))
    finally:
        dist.destroy_process_group()


def ddp_run(name: str, backend: str, dtype: torch.dtype):
    """The MLP under DistributedDataParallel, each rank on its half of every batch: DDP averages the gradients,
    every rank steps every tensor, and the optimizer needs no process_group."""
    cls, hyperparameters, _ = OPTIMIZERS[name]
    model = torch.nn.parallel.DistributedDataParallel(mlp(dtype))
    optimizer = cls(model.parameters(), fused=backend, **hyperparameters)
    half = mlp_batch(0, dtype).shape[0] // dist.get_world_size()
    mine = slice(dist.get_rank() * half, (dist.get_rank() + 1) * half)
    returned = train_mlp(model, optimizer, mine, dtype, STEPS)
    return [p.detach() for p in model.parameters()], returned


def resumed_from_checkpoint(name: str) -> list[float]:
    """Per tensor, how far parameters trained STEPS steps under ZeroRedundancyOptimizer end from the same run
    interrupted half-way: ZeRO's state consolidated on rank 0, sent to every rank, loaded into a new one."""
    cls, hyperparameters, _ = OPTIMIZERS[name]

    def zero_over(params):
        return ZeroRedundancyOptimizer(
            [{"params": g} for g in params],
            optimizer_class=functools.partial(cls, fused="cpp", process_group=dist.group.WORLD),
            **hyperparameters,
        )

    def train(params, optimizer, steps):
        for step in steps:
            set_grads(params, step)
            optimizer.step()

    with default_dtype(torch.float64):
        uninterrupted = make_params(torch.float64)
        train(uninterrupted, zero_over(uninterrupted), range(STEPS))
        first = make_params(torch.float64)
        optimizer = zero_over(first)
        train(first, optimizer, range(STEPS // 2))
        optimizer.consolidate_state_dict(to=0)
        checkpoint = [optimizer.state_dict() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(checkpoint, src=0)
        second = [[p.detach().clone().requires_grad_() for p in g] for g in first]
        resumed = zero_over(second)
        resumed.load_state_dict(checkpoint[0])
        train(second, resumed, range(STEPS // 2, STEPS))
    return [(a - b).abs().max().item() for ga, gb in zip(uninterrupted, second) for a, b in zip(ga, gb)]


def ranks_of(world_size: int, tmp_path_factory):
    backends = available_backends("hysterograd", "cpu")
    out_dir = str(tmp_path_factory.mktemp(f"ranks{world_size}"))
    return backends, run_ranks(_rank_main, world_size, TIMEOUT_S, out_dir, backends, world_size)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return ranks_of(WORLD_SIZE, tmp_path_factory)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return ranks_of(4, tmp_path_factory)


def one_process(name: str, backend: str, dtype: torch.dtype):
    cls, hyperparameters, _ = OPTIMIZERS[name]
    params = make_params(dtype)
    optimizer = cls([{"params": g} for g in params], fused=backend, **hyperparameters)
    with default_dtype(dtype):
        returned = run(optimizer, params)
    return [p.detach() for g in params for p in g], returned


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_with_process_group_equals_one_process(ranks, name):
    check_zero(ranks, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_on_four_ranks_equals_one_process(four_ranks, name):
    check_zero(four_ranks, name)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_equals_one_process(ranks, name):
    check_ddp(ranks, name)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_on_four_ranks_equals_one_process(four_ranks, name):
    check_ddp(four_ranks, name)


def check_ddp(ranks, name):
    backends, per_rank = ranks
    cls, hyperparameters, _ = OPTIMIZERS[name]
    for backend in backends:
        for dtype in DTYPES:
            want_params, want_returned = one_process_mlp(cls, backend, dtype, STEPS, **hyperparameters)
            for rank in per_rank:
                params, returned = rank[name, backend, dtype, "ddp"]
                assert_equals_one_process(name, dtype, params, returned, want_params, want_returned)


def check_zero(ranks, name):
    backends, per_rank = ranks
    for backend in backends:
        for dtype in DTYPES:
            expected_params, expected_returned = one_process(name, backend, dtype)
            for rank in per_rank:
                params, returned = rank[name, backend, dtype, True]
                assert_equals_one_process(name, dtype, params, returned, expected_params, expected_returned)
                if name == "HysteroGrad":
                    assert returned == per_rank[0][name, backend, dtype, True][1]  # identical on every rank


def assert_equals_one_process(name, dtype, params, returned, want_params, want_returned) -> None:
    """Parameters within the tolerance policy of one process's; HysteroGrad's statuses equal, norms and
    barriers within it."""
    _, _, ops = OPTIMIZERS[name]
    length = sum(p.numel() for p in want_params)
    for got, want in zip(params, want_params, strict=True):
        assert_fused_close(got, want, dtype=dtype, ops=ops, reduction_length=length, steps=STEPS)
    if name == "HysteroGrad":
        for (status, g_norm, h), (want_status, want_g_norm, want_h) in zip(returned, want_returned, strict=True):
            assert status == want_status
            assert_fused_close([g_norm, h], [want_g_norm, want_h], dtype=dtype, ops=ops, steps=STEPS)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_without_process_group_is_not_one_process(ranks, name):
    backends, per_rank = ranks
    for backend in backends:
        expected_params, _ = one_process(name, backend, torch.float64)
        params, _ = per_rank[0][name, backend, torch.float64, False]
        worst = max(((got - want).norm() / want.norm()).item() for got, want in zip(params, expected_params))
        assert worst > 1e-9, (backend, worst)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_checkpoint_resumes_bit_for_bit(ranks, name):
    """Same code on the same data, so bit for bit (the tolerance policy's kind d)."""
    _, per_rank = ranks
    for rank in per_rank:
        assert rank[name, "resumed"] == [0.0] * sum(len(g) for g in SHAPES)


def test_process_group_is_checked():
    p = torch.zeros(2, requires_grad=True)
    for cls in (HysteroGrad, BiostatisV6):
        for wrong in (object(), "world"):
            with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed\.ProcessGroup"):
                cls([p], process_group=wrong)


def test_zero_example_runs_under_torchrun():
    """examples/zero_optimizers.py, as docs/distributed.md tells users to run it: every rank prints the same."""
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD_SIZE),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(root / "examples" / "zero_optimizers.py"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    # The ranks share one stdout: their lines may interleave, so read the records, not the lines.
    records = re.findall(r"rank (\d): (\w+) loss ([\d.]+)", done.stdout)
    by_rank = {rank: sorted(record[1:] for record in records if record[0] == rank) for rank in ("0", "1")}
    assert len(by_rank["0"]) == 2 and by_rank["0"] == by_rank["1"], done.stdout


def test_capturable_with_process_group_raises():
    """At construction, and at step() when ``capturable`` is set afterwards (1-rank gloo group in-process)."""
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs gloo and no default process group in this process")
    init_gloo(0, 1, free_port(), TIMEOUT_S)
    try:
        for cls in (HysteroGrad, BiostatisV6):
            p = torch.zeros(3, requires_grad=True)
            with pytest.raises(ValueError, match="capturable=True cannot be combined with process_group"):
                cls([p], capturable=True, process_group=dist.group.WORLD)
            optimizer = cls([p], process_group=dist.group.WORLD)
            p.grad = torch.ones(3)
            optimizer.step()
            optimizer.capturable = True
            with pytest.raises(ValueError, match="capturable=True cannot be combined with process_group"):
                optimizer.step()
    finally:
        dist.destroy_process_group()
