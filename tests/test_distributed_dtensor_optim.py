"""The optimizers on DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism, hybrid meshes), gloo ranks
on 127.0.0.1: each rank steps its local shards, and every per-tensor and per-group partial of pass A is summed
over the mesh dimensions its tensor is sharded on (docs/distributed.md). Equal to one process holding the whole
model after 10 steps (fp64 ≤ 1e-12, fp32 within the tolerance policy), HysteroGrad's returned tuple identical on
every rank, for every CPU backend; uneven and empty shards included. With the sums left local the results
differ, so the comparison has teeth. Distributed checkpoints (torch.distributed.checkpoint) resume bit for bit,
and a one-process checkpoint loads into the sharded optimizer."""

from __future__ import annotations

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

from curvkern import available_backends
from curvkern.optim import BiostatisV6, HysteroGrad

# Spawned gloo ranks: `make test` runs these; `make test-fast` leaves them out (they are most of its time).
pytestmark = pytest.mark.slow

STEPS = 10
TIMEOUT_S = 300
OPTIMIZERS = {
    "HysteroGrad": (HysteroGrad, dict(lr=0.02, grad_clip=1.0), HYSTEROGRAD_OPS),
    "BiostatisV6": (BiostatisV6, dict(lr=0.01, weight_decay=0.01), BIOSTATIS_OPS),
}
DTYPES = (torch.float64, torch.float32)
# Per param group, (global shape, placements by name). On 2 ranks: Shard(0) of 3 rows splits 2 + 1, Shard(0)
# of 1 row leaves rank 1 an empty shard, Shard(1) shards columns, and a Replicate tensor is held whole by both.
TENSOR_PARALLEL = (
    [((6, 5), ("S0",)), ((5, 7), ("S1",)), ((3,), ("S0",)), ((1, 4), ("S0",)), ((4,), ("R",))],
    [((7,), ("S0",))],
)
# A 2 × 2 mesh (4 ranks): every mix of sharded and replicated mesh dimensions.
HYBRID = (
    [
        ((6, 5), ("R", "S0")),
        ((5, 7), ("S0", "S1")),
        ((3,), ("S0", "R")),
        ((1, 4), ("R", "S0")),
        ((4,), ("R", "R")),
    ],
    [((7,), ("S0", "S0"))],
)
LAYOUTS = {"tensor_parallel": ((2,), TENSOR_PARALLEL), "hybrid": ((2, 2), HYBRID)}
# (step, group, tensor) without a gradient: group 0's tensor 1 at step 3; group 1 (skipped) at step 5.
NO_GRAD_AT = {(3, 0, 1), (5, 1, 0)}


def placements(names):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if name == "R" else Shard(int(name[1:])) for name in names]


def full_params(layout, dtype):
    gen = torch.Generator().manual_seed(0)
    return [
        [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape, _ in group] for group in layout
    ]


def full_grads(layout, step: int, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    return [
        [
            None if (step, g, t) in NO_GRAD_AT else torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            for t, (shape, _) in enumerate(group)
        ]
        for g, group in enumerate(layout)
    ]


def sharded(mesh, layout, tensors):
    """Each rank keeps its part of the whole tensors it holds (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return [
        [
            None if t is None else distribute_tensor(t, mesh, placements(names), src_data_rank=None)
            for t, (_, names) in zip(group, spec)
        ]
        for group, spec in zip(tensors, layout)
    ]


def train(optimizer, params, layout, steps, dtype, mesh=None) -> list:
    """Steps with the layout's gradients (sharded when ``mesh`` is given); HysteroGrad is shocked half-way."""
    returned = []
    for step in steps:
        grads = full_grads(layout, step, dtype)
        if mesh is not None:
            grads = sharded(mesh, layout, grads)
        for group_params, group_grads in zip(params, grads):
            for p, grad in zip(group_params, group_grads):
                p.grad = grad
        returned.append(optimizer.step())
        if step == STEPS // 2 and hasattr(optimizer, "shock"):
            optimizer.shock(0.5)
    return returned


def sharded_run(name, backend, dtype, mesh, layout, steps=range(STEPS)):
    cls, hyperparameters, _ = OPTIMIZERS[name]
    params = [[torch.nn.Parameter(t) for t in group] for group in sharded(mesh, layout, full_params(layout, dtype))]
    optimizer = cls([{"params": g} for g in params], fused=backend, **hyperparameters)
    with default_dtype(dtype):
        returned = train(optimizer, params, layout, steps, dtype, mesh)
    return params, optimizer, returned


def gathered(params) -> list[torch.Tensor]:
    return [p.detach().full_tensor() for group in params for p in group]


class LocalStatistics:
    """A stand-in for ShardReduction that sums nothing: each rank's statistics stay its shards' own."""

    def __init__(self, process_group, counted):
        self.counted = None

    def __call__(self, partials):
        return partials

    def tensor_and_group_sums(self, rows):
        return rows, rows.sum(0)


def _rank_main(rank: int, port: int, out_dir: str, world_size: int, layout_name: str, backends: list[str]) -> None:
    from torch.distributed.tensor import init_device_mesh

    init_gloo(rank, world_size, port, TIMEOUT_S)
    try:
        torch.set_num_threads(1)
        mesh_shape, layout = LAYOUTS[layout_name]
        mesh = init_device_mesh("cpu", mesh_shape)
        results = {}
        for name in OPTIMIZERS:
            for backend in backends:
                for dtype in DTYPES:
                    params, _, returned = sharded_run(name, backend, dtype, mesh, layout)
                    results[name, backend, dtype] = (gathered(params), returned)
            if layout_name == "tensor_parallel":
                results[name, "local statistics"] = local_statistics_run(name, mesh, layout)
                results[name, "dcp"] = resumed_from_distributed_checkpoint(name, mesh, layout, out_dir)
                results[name, "one-process checkpoint"] = resumed_from_one_process(name, mesh, layout)
            # fully_shard over every rank: on 4, the bias of 3 leaves one rank an empty shard
            flat = mesh if mesh.ndim == 1 else init_device_mesh("cpu", (world_size,))
            results[name, "fsdp2"] = {
                (backend, dtype): fsdp2_run(name, backend, dtype, flat) for backend in backends for dtype in DTYPES
            }
        torch.save(results, rank_output(out_dir, rank))
    finally:
        dist.destroy_process_group()


def local_statistics_run(name, mesh, layout):
    import curvkern.optim._common as common

    saved, common.ShardReduction = common.ShardReduction, LocalStatistics
    try:
        params, _, _ = sharded_run(name, "cpp", torch.float64, mesh, layout)
    finally:
        common.ShardReduction = saved
    return gathered(params)


def resumed_from_distributed_checkpoint(name, mesh, layout, out_dir) -> list[float]:
    """Per tensor, how far a run interrupted half-way (optimizer state saved with torch.distributed.checkpoint,
    loaded into a new optimizer) ends from the uninterrupted run: same code on the same data, so 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def module_of(params):
        module = torch.nn.Module()
        module.weights = torch.nn.ParameterList([p for group in params for p in group])
        return module

    uninterrupted, _, _ = sharded_run(name, "cpp", torch.float64, mesh, layout)
    first, optimizer, _ = sharded_run(name, "cpp", torch.float64, mesh, layout, range(STEPS // 2))
    checkpoint_dir = f"{out_dir}/dcp-{name}"
    dcp.save(get_optimizer_state_dict(module_of(first), optimizer), checkpoint_id=checkpoint_dir)

    cls, hyperparameters, _ = OPTIMIZERS[name]
    second = [[torch.nn.Parameter(p.detach().clone()) for p in group] for group in first]
    resumed = cls([{"params": g} for g in second], fused="cpp", **hyperparameters)
    module = module_of(second)
    # The template dcp.load fills comes from a first step of the new optimizer, in which HysteroGrad creates its
    # group scalars in the default dtype: fp64 here, as in the run that saved them.
    with default_dtype(torch.float64):
        state = get_optimizer_state_dict(module, resumed)
        dcp.load(state, checkpoint_id=checkpoint_dir)
        set_optimizer_state_dict(module, resumed, state)
        train(resumed, second, layout, range(STEPS // 2, STEPS), torch.float64, mesh)
    return [(a - b).abs().max().item() for a, b in zip(gathered(uninterrupted), gathered(second))]


def resumed_from_one_process(name, mesh, layout) -> list[torch.Tensor]:
    """A one-process checkpoint (plain tensors) loaded into the sharded optimizer half-way."""
    cls, hyperparameters, _ = OPTIMIZERS[name]
    whole = [list(group) for group in full_params(layout, torch.float64)]
    optimizer = cls([{"params": g} for g in whole], fused="cpp", **hyperparameters)
    with default_dtype(torch.float64):
        train(optimizer, whole, layout, range(STEPS // 2), torch.float64)
    params = [[torch.nn.Parameter(t) for t in group] for group in sharded(mesh, layout, whole)]
    resumed = cls([{"params": g} for g in params], fused="cpp", **hyperparameters)
    resumed.load_state_dict(optimizer.state_dict())
    with default_dtype(torch.float64):
        train(resumed, params, layout, range(STEPS // 2, STEPS), torch.float64, mesh)
    return gathered(params)


def fsdp2_run(name, backend, dtype, mesh):
    """The MLP under fully_shard (Shard(0); on 2 ranks 7 rows split 4 + 3 and a bias of 3 split 2 + 1), each rank
    on its part of every batch; FSDP2 averages the gradients, so one process on the whole batch is the reference."""
    from torch.distributed.fsdp import fully_shard

    cls, hyperparameters, _ = OPTIMIZERS[name]
    model = mlp(dtype)
    fully_shard(model, mesh=mesh)
    optimizer = cls(model.parameters(), fused=backend, **hyperparameters)
    half = mlp_batch(0, dtype).shape[0] // mesh.size()
    rank = mesh.get_local_rank()
    returned = train_mlp(model, optimizer, slice(rank * half, (rank + 1) * half), dtype, STEPS)
    return [p.detach().full_tensor() for p in model.parameters()], returned


def one_process(name, backend, dtype, layout):
    cls, hyperparameters, _ = OPTIMIZERS[name]
    params = [list(group) for group in full_params(layout, dtype)]
    optimizer = cls([{"params": g} for g in params], fused=backend, **hyperparameters)
    with default_dtype(dtype):
        returned = train(optimizer, params, layout, range(STEPS), dtype)
    return [p for group in params for p in group], returned


def assert_equals_one_process(name, dtype, got_params, got_returned, want_params, want_returned):
    _, _, ops = OPTIMIZERS[name]
    length = sum(p.numel() for p in want_params)
    for got, want in zip(got_params, want_params, strict=True):
        assert_fused_close(got, want, dtype=dtype, ops=ops, reduction_length=length, steps=STEPS)
    if name == "HysteroGrad" and got_returned is not None:
        for (status, g_norm, h), (want_status, want_g_norm, want_h) in zip(got_returned, want_returned, strict=True):
            assert status == want_status
            assert_fused_close([g_norm, h], [want_g_norm, want_h], dtype=dtype, ops=ops, steps=STEPS)


def ranks_of(layout_name, world_size, tmp_path_factory):
    backends = available_backends("hysterograd", "cpu")
    out_dir = str(tmp_path_factory.mktemp(layout_name))
    return backends, run_ranks(_rank_main, world_size, TIMEOUT_S, out_dir, world_size, layout_name, backends)


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory):
    return ranks_of("tensor_parallel", 2, tmp_path_factory)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return ranks_of("hybrid", 4, tmp_path_factory)


def check_layout(ranks, name, layout):
    backends, per_rank = ranks
    for backend in backends:
        for dtype in DTYPES:
            want_params, want_returned = one_process(name, backend, dtype, layout)
            for rank in per_rank:
                got_params, got_returned = rank[name, backend, dtype]
                assert_equals_one_process(name, dtype, got_params, got_returned, want_params, want_returned)
                if name == "HysteroGrad":  # identical on every rank
                    assert got_returned == per_rank[0][name, backend, dtype][1]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_parallel_equals_one_process(tensor_parallel, name):
    check_layout(tensor_parallel, name, TENSOR_PARALLEL)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_hybrid_mesh_equals_one_process(hybrid, name):
    check_layout(hybrid, name, HYBRID)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fully_shard_equals_one_process(tensor_parallel, name):
    check_fully_shard(tensor_parallel, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fully_shard_on_four_ranks_equals_one_process(hybrid, name):
    check_fully_shard(hybrid, name)


def check_fully_shard(ranks, name):
    backends, per_rank = ranks
    for backend in backends:
        for dtype in DTYPES:
            cls, hyperparameters, _ = OPTIMIZERS[name]
            want_params, want_returned = one_process_mlp(cls, backend, dtype, STEPS, **hyperparameters)
            for rank in per_rank:
                got_params, got_returned = rank[name, "fsdp2"][backend, dtype]
                assert_equals_one_process(name, dtype, got_params, got_returned, want_params, want_returned)
                if name == "HysteroGrad":
                    assert got_returned == per_rank[0][name, "fsdp2"][backend, dtype][1]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_local_statistics_are_not_one_process(tensor_parallel, name):
    _, per_rank = tensor_parallel
    want_params, _ = one_process(name, "cpp", torch.float64, TENSOR_PARALLEL)
    got_params = per_rank[0][name, "local statistics"]
    worst = max(((got - want).norm() / want.norm()).item() for got, want in zip(got_params, want_params))
    assert worst > 1e-9, worst


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_distributed_checkpoint_resumes_bit_for_bit(tensor_parallel, name):
    """Same code on the same data, so bit for bit (the tolerance policy's kind d)."""
    _, per_rank = tensor_parallel
    for rank in per_rank:
        assert rank[name, "dcp"] == [0.0] * sum(len(group) for group in TENSOR_PARALLEL)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_process_checkpoint_loads_sharded(tensor_parallel, name):
    _, per_rank = tensor_parallel
    want_params, _ = one_process(name, "cpp", torch.float64, TENSOR_PARALLEL)
    for rank in per_rank:
        assert_equals_one_process(name, torch.float64, rank[name, "one-process checkpoint"], None, want_params, None)


@pytest.mark.parametrize("cls", [HysteroGrad, BiostatisV6])
def test_unsupported_dtensor_layouts_raise(one_rank_mesh, cls):
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = one_rank_mesh
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    with pytest.raises(TypeError, match="mixes DTensor and plain parameters"):
        cls([p, torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="process_group is for ranks that hold whole tensors"):
        cls([p], process_group=dist.group.WORLD)
    pending = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 3), mesh, [Partial()]))
    with pytest.raises(TypeError, match=r"placements \(Partial\(sum\),\)"):
        cls([pending])

    optimizer = cls([p])
    p.grad = DTensor.from_local(torch.ones(4, 3), mesh, [Partial()])
    with pytest.raises(RuntimeError, match=r"gradient of parameter 0 .* placements \(Partial\(sum\),\)"):
        optimizer.step()
    p.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    optimizer.step()
    key = "G" if cls is HysteroGrad else "exp_avg"
    optimizer.state[p][key] = optimizer.state[p][key].to_local().clone()
    with pytest.raises(RuntimeError, match=f"state '{key}' of parameter 0 .* is a plain Tensor"):
        optimizer.step()


def test_fsdp2_example_runs_under_torchrun():
    """examples/fsdp2_optimizers.py, as the README tells users to run it: both ranks print one process's loss."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(free_port()), str(root / "examples" / "fsdp2_optimizers.py")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    # The ranks share one stdout: their lines may interleave, so read the records, not the lines.
    records = re.findall(r"(rank \d|one process): (\w+) loss ([\d.]+)", done.stdout)
    losses = {name: {who: loss for who, other, loss in records if other == name} for name in OPTIMIZERS}
    for name, by_whom in losses.items():
        assert sorted(by_whom) == ["one process", "rank 0", "rank 1"], done.stdout
        assert len(set(by_whom.values())) == 1, (name, by_whom)
