"""Vocabulary-parallel cross-entropy on spawned gloo ranks (127.0.0.1): DTensor logits sharded on the class
dimension (uneven shards, an empty one, labels in every shard), and replicated ones. Loss, gradient, the
double backward's HVP (to the logits and to the incoming gradient) and ``ce_hvp`` equal one process's
(fp64 ≤ 1e-12 relative, fp32 by the tolerance policy's kind (a)) for every CPU backend, reduction, label
smoothing and ignored rows. torch's own ``F.cross_entropy`` under ``loss_parallel()`` is run on the same
problem: its HVP is about zero while the true one is not. Unsupported layouts raise naming the layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiprocess_ranks import free_port, init_gloo, rank_output, run_ranks
from test_cross_entropy import CE_OPS, loss_grad_hvp, ours
from tolerance import assert_fused_close, fused_bound, relative_error

import curvkern
from curvkern import available_backends
from curvkern.families import get_family

FAMILY = get_family("cross_entropy")
TIMEOUT_S = 150
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float64, torch.float32)
FP64_RTOL = 1e-12

# Spawned gloo ranks: `make test` runs these; `make test-fast` leaves them out (they are most of its time).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning"),
]


# (name, logits shape with the classes in dim 1, ignored rows (flat indices of the target), labels forced
# into chosen classes so that every shard holds some). Shapes stay small: Triton runs in its interpreter.
PROBLEMS = (
    ("rows-V7", (6, 7), (1,), {0: 0, 2: 6, 3: 3, 4: 4}),  # shards of 4 and 3 on 2 ranks
    ("spatial-V5", (2, 5, 3), (2,), {0: 0, 1: 4, 3: 2}),  # (N, C, d): class dim 1 is not the last
    ("one-class", (4, 1), (3,), {}),  # V = 1: rank 1's shard is empty
    ("single-row", (9,), (), {}),  # (C) logits, a 0-dim target
    ("no-rows", (0, 5), (), {}),  # an empty batch: no collective on any rank; mean is NaN, as in one process
)


def make_problem(shape, ignored, labels, dtype, seed):
    """Full logits, u and incoming gradient (seeded: the same on every rank and in the test process)."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    logits = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    u = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    target = torch.randint(0, num_classes, target_shape, generator=gen)
    flat = target.view(-1)
    for row, label in labels.items():
        flat[row] = label
    for row in ignored:
        flat[row] = -100
    grad_loss = torch.rand(target_shape, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    return logits, target, u, grad_loss


# Every reduction and label smoothing on the first two problems; the edge cases with two of them (the time
# goes to Triton's interpreter).
EDGE_SETTINGS = (("mean", 0.1), ("none", 0.0))


def cases(backends):
    for index, (name, shape, ignored, labels) in enumerate(PROBLEMS):
        for dtype in DTYPES:
            for reduction in REDUCTIONS:
                for smoothing in (0.0, 0.1):
                    if index >= 2 and (reduction, smoothing) not in EDGE_SETTINGS:
                        continue
                    for backend in backends:
                        yield (name, dtype, reduction, smoothing, backend), (shape, ignored, labels)


def sharded_results(logits, target, u, grad_loss, placements, mesh, backend, reduction, smoothing):
    """Loss, gradient, the double backward's two results and ce_hvp on DTensors laid out by ``placements``,
    gathered to full tensors, and each result's placements (as strings: Placement objects do not load
    with torch.load's weights_only)."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    z = distribute_tensor(logits, mesh, placements).requires_grad_(True)
    ud = distribute_tensor(u, mesh, placements)
    loss = curvkern.cross_entropy(z, target, reduction=reduction, label_smoothing=smoothing, fused=backend)
    g = distribute_tensor(grad_loss if reduction == "none" else grad_loss.sum(), mesh, [Replicate()] * mesh.ndim)
    g.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss, z, g, create_graph=True)
    hvp, grad_grad_loss = torch.autograd.grad(grad, (z, g), ud)
    standalone = curvkern.ce_hvp(z.detach(), target, ud, reduction=reduction, fused=backend)
    results = [loss, grad, hvp, grad_grad_loss, standalone]
    return [r.full_tensor().detach() for r in results], [tuple(map(repr, r.placements)) for r in results]


def torch_loss_parallel_hvp(logits, target, u, mesh):
    """torch's F.cross_entropy on class-sharded logits under loss_parallel(): loss, gradient, its HVP."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    z = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_(True)
    with loss_parallel():
        loss = F.cross_entropy(z, target)
        (grad,) = torch.autograd.grad(loss, z, create_graph=True)
        (hvp,) = torch.autograd.grad(grad, z, distribute_tensor(u, mesh, [Shard(1)]))
    return loss.full_tensor().detach(), grad.full_tensor().detach(), hvp.full_tensor()


def _error(call) -> tuple[str, str] | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001  (recorded for the test process to check type and message)
        return type(exc).__name__, str(exc)
    return None


def layout_errors(mesh, backend):
    """Unsupported layouts and mismatched ``u``: the error each raises (type name, message)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    logits, target, u, _ = make_problem((6, 7), (1,), {}, torch.float64, 3)
    by_class = distribute_tensor(logits, mesh, [Shard(1)])
    by_row = distribute_tensor(logits, mesh, [Shard(0)])
    partial = DTensor.from_local(logits / mesh.size(), mesh, [Partial()], run_check=False)
    sharded_target = distribute_tensor(target, mesh, [Shard(0)])

    def ce(z, y=target):
        return lambda: curvkern.cross_entropy(z, y, fused=backend)

    def hvp(z, v, out=None):
        return lambda: curvkern.ce_hvp(z, target, v, out=out, fused=backend)

    return {
        "partial": _error(ce(partial)),
        "row-shard": _error(ce(by_row)),
        "sharded-target": _error(ce(by_class, sharded_target)),
        "plain-logits-dtensor-target": _error(ce(logits, distribute_tensor(target, mesh, [Replicate()]))),
        "u-replicated": _error(hvp(by_class, distribute_tensor(u, mesh, [Replicate()]))),
        "u-plain": _error(hvp(by_class, u)),
        "out-row-shard": _error(hvp(by_class, distribute_tensor(u, mesh, [Shard(1)]), out=torch.empty_like(by_row))),
        "partial-hvp": _error(hvp(partial, partial)),
    }


def _rank_main(rank, port, out_dir, world_size, backends, full):
    init_gloo(rank, world_size, port, TIMEOUT_S)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world_size,))
        results = {}
        for seed, (key, (shape, ignored, labels)) in enumerate(cases(backends)):
            if not full and key[2:4] != ("mean", 0.1):
                continue
            _, dtype, reduction, smoothing, backend = key
            logits, target, u, grad_loss = make_problem(shape, ignored, labels, dtype, seed)
            class_dim = 0 if len(shape) == 1 else 1
            results[key] = sharded_results(
                logits, target, u, grad_loss, [Shard(class_dim)], mesh, backend, reduction, smoothing
            )
        if full:
            logits, target, u, grad_loss = make_problem((6, 7), (1,), {}, torch.float64, 1)
            for backend in backends:
                results["replicated", backend] = sharded_results(
                    logits, target, u, grad_loss, [Replicate()], mesh, backend, "mean", 0.1
                )
                # A 2-D mesh: Replicate on the first dimension (size 1), the classes sharded on the second.
                mesh_2d = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp", "tp"))
                results["mesh-2d", backend] = sharded_results(
                    logits, target, u, grad_loss, [Replicate(), Shard(1)], mesh_2d, backend, "sum", 0.0
                )
                results["errors", backend] = layout_errors(mesh, backend)
            results["loss_parallel"] = torch_loss_parallel_hvp(logits, target, u, mesh)
            for backend in backends:
                results["loss_parallel_problem", backend] = sharded_results(
                    logits, target, u, torch.tensor(1.0, dtype=torch.float64), [Shard(1)], mesh, backend, "mean", 0.0
                )
        torch.save(results, rank_output(out_dir, rank))
    finally:
        dist.destroy_process_group()


BACKENDS = available_backends(FAMILY.name, "cpu")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_rank_main, 2, TIMEOUT_S, str(tmp_path_factory.mktemp("ranks")), 2, BACKENDS, True)


def one_process(backend, logits, target, u, grad_loss, reduction, smoothing):
    """The same computation on plain tensors: loss, gradient, double backward, ce_hvp."""
    g = grad_loss if reduction == "none" else grad_loss.sum()
    loss, grad, hvp, grad_grad_loss = loss_grad_hvp(
        ours(backend), logits, target, u, g, reduction=reduction, label_smoothing=smoothing
    )
    standalone = curvkern.ce_hvp(logits, target, u, reduction=reduction, fused=backend)
    return [loss, grad, hvp, grad_grad_loss, standalone]


NAMES = ("loss", "grad", "hvp", "grad_grad_loss", "ce_hvp")


def dot_condition(logits, target, u, reduction, smoothing) -> float:
    """κ of the double backward's gradient to the incoming gradient, Σ_r c_r ⟨u_r, p_r − q_r⟩: a difference
    of ⟨p, u⟩ and ⟨q, u⟩, normwise over the rows for ``none`` (fp64, from the inputs)."""
    z = logits.double().movedim(1, -1) if logits.dim() > 2 else logits.double()
    w = u.double().movedim(1, -1) if u.dim() > 2 else u.double()
    z, w, y = z.reshape(-1, z.shape[-1]), w.reshape(-1, w.shape[-1]), target.reshape(-1)
    valid = y != -100
    one_hot = torch.zeros_like(z).scatter_(1, torch.where(valid, y, 0)[:, None], 1.0)
    q = one_hot * (1 - smoothing) + smoothing / z.shape[1]
    p = torch.softmax(z, dim=1)
    magnitude, value = ((p + q) * w.abs()).sum(1) * valid, ((p - q) * w).sum(1) * valid
    if reduction != "none":
        magnitude, value = magnitude.sum(), value.sum()
    return max(1.0, magnitude.norm().item() / max(value.norm().item(), 1e-300))


def assert_equal_to_one_process(got, expected, dtype, num_classes, label, scale=1.0, dot_kappa=1.0):
    """fp64 to 1e-12 relative; fp32 by kind (a) of tests/tolerance.py (two implementations of one formula,
    reductions of V terms; the gradient to the incoming gradient with its condition ``dot_kappa``)."""
    for name, a, b in zip(NAMES, got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, (label, name)
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=FP64_RTOL, atol=1e-15, equal_nan=True, msg=f"{label} {name}")
        elif num_classes == 1:
            # One class: p = 1, so the loss (with label smoothing too), the gradient and the HVP are 0 up to
            # rounding, and a relative error means nothing: bound the difference by the logits' scale.
            bound = fused_bound(dtype, ops=CE_OPS) * max(1.0, scale)
            assert (a - b).abs().max() <= bound, (label, name, (a - b).abs().max().item(), bound)
        else:
            kappa = dot_kappa if name == "grad_grad_loss" else 1.0
            assert_fused_close(
                a, b, dtype=dtype, ops=CE_OPS, reduction_length=num_classes, condition=kappa, label=f"{label} {name}"
            )


def check_ranks(ranks, backends, full):
    worst = {dtype: 0.0 for dtype in DTYPES}
    for seed, (key, (shape, ignored, labels)) in enumerate(cases(backends)):
        if not full and key[2:4] != ("mean", 0.1):
            continue
        _, dtype, reduction, smoothing, backend = key
        logits, target, u, grad_loss = make_problem(shape, ignored, labels, dtype, seed)
        expected = one_process(backend, logits, target, u, grad_loss, reduction, smoothing)
        class_dim = 0 if len(shape) == 1 else 1
        for rank in ranks:
            got, placements = rank[key]
            kappa = dot_condition(logits, target, u, reduction, smoothing)
            scale = logits.abs().amax().item() if logits.numel() else 1.0
            assert_equal_to_one_process(got, expected, dtype, logits.shape[class_dim], key, scale, kappa)
            if logits.shape[class_dim] > 1:
                worst[dtype] = max([worst[dtype]] + [relative_error(a, b) for a, b in zip(got, expected)])
            assert placements[0] == placements[3] == ("Replicate()",), key
            assert placements[1] == placements[2] == placements[4] == (f"Shard(dim={class_dim})",), key
        if logits.shape[class_dim] > 1 and logits.numel():  # one class: p = 1 and the Hessian is 0
            assert expected[2].norm() > 0, key
    return worst


def test_class_sharded_logits_equal_one_process(two_ranks):
    worst = check_ranks(two_ranks, BACKENDS, full=True)
    print(f"worst relative difference to one process: {worst}")


def test_replicated_logits_and_a_2d_mesh_equal_one_process(two_ranks):
    logits, target, u, grad_loss = make_problem((6, 7), (1,), {}, torch.float64, 1)
    for backend in BACKENDS:
        for key, reduction, smoothing in (("replicated", "mean", 0.1), ("mesh-2d", "sum", 0.0)):
            expected = one_process(backend, logits, target, u, grad_loss, reduction, smoothing)
            for rank in two_ranks:
                got, placements = rank[key, backend]
                assert_equal_to_one_process(got, expected, torch.float64, 7, (key, backend))
                shards = ("Replicate()",) if key == "replicated" else ("Replicate()", "Shard(dim=1)")
                assert placements[1] == placements[2] == placements[4] == shards, key
                assert placements[0] == placements[3] == ("Replicate()",) * len(shards), key


def test_torch_loss_parallel_hvp_is_about_zero_and_ours_is_not(two_ranks):
    """torch 2.13's loss_parallel() gives the right loss and gradient but an HVP of rounding noise (its
    backward is not differentiable through the class-sharded softmax); ours is the one-process HVP."""
    logits, target, u, _ = make_problem((6, 7), (1,), {}, torch.float64, 1)
    loss, grad, truth, _ = loss_grad_hvp(F.cross_entropy, logits, target, u)
    torch_loss, torch_grad, torch_hvp = two_ranks[0]["loss_parallel"]
    torch.testing.assert_close(torch_loss, loss, rtol=FP64_RTOL, atol=0)
    torch.testing.assert_close(torch_grad, grad, rtol=FP64_RTOL, atol=1e-15)
    assert truth.norm() > 1e-2
    assert torch_hvp.norm() < 1e-12 * truth.norm()
    for backend in BACKENDS:
        for rank in two_ranks:
            ours_hvp = rank["loss_parallel_problem", backend][0][2]
            torch.testing.assert_close(ours_hvp, truth, rtol=FP64_RTOL, atol=1e-15)
    print(f"loss_parallel HVP norm {torch_hvp.norm():.3g}, true HVP norm {truth.norm():.3g}")


def test_unsupported_layouts_raise_naming_the_layout(two_ranks):
    expected = {
        "partial": ("NotImplementedError", r"placements \(Partial\(sum\)\) are not supported"),
        "row-shard": ("NotImplementedError", r"placements \(Shard\(dim=0\)\) are not supported.*Shard\(1\)"),
        "sharded-target": ("NotImplementedError", r"target must be replicated.*Shard\(dim=0\)"),
        "plain-logits-dtensor-target": ("NotImplementedError", "need DTensor logits"),
        "u-replicated": ("ValueError", r"u has placements \(Replicate\(\)\).*logits \(Shard\(dim=1\)\)"),
        "u-plain": ("ValueError", "u must be a DTensor with the logits' placements"),
        "out-row-shard": ("ValueError", r"out has placements \(Shard\(dim=0\)\)"),
        "partial-hvp": ("NotImplementedError", r"Partial\(sum\)"),
    }
    for backend in BACKENDS:
        for rank in two_ranks:
            errors = rank["errors", backend]
            for case, (kind, pattern) in expected.items():
                assert errors[case] is not None, (backend, case)
                assert errors[case][0] == kind and re.search(pattern, errors[case][1]), (backend, case, errors[case])


def _four_rank_main(rank, port, out_dir, backends):
    _rank_main(rank, port, out_dir, 4, backends, False)


@pytest.mark.slow
def test_four_ranks_with_an_empty_shard_equal_one_process(tmp_path):
    """4 ranks: V = 7 splits 2, 2, 2, 1; V = 5 as 2, 2, 1, 0; V = 1 leaves three shards empty."""
    ranks = run_ranks(_four_rank_main, 4, TIMEOUT_S, str(tmp_path), BACKENDS)
    check_ranks(ranks, BACKENDS, full=False)


def test_vocab_parallel_example_runs_under_torchrun():
    """examples/vocab_parallel_hvp.py, as the README tells users to run it: both ranks print the
    one-process loss and HVP norm."""
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(root / "examples" / "vocab_parallel_hvp.py"),
    ]
    # torchrun puts the script's folder on sys.path, not the working directory: import this checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    number = r"([-+\d.e]+)"
    records = re.findall(
        rf"rank (\d): loss {number} hvp norm {number} one process: loss {number} hvp norm {number}", done.stdout
    )
    assert sorted(r[0] for r in records) == ["0", "1"], done.stdout
    for record in records:
        loss, norm, one_loss, one_norm = map(float, record[1:])
        assert norm > 0 and abs(loss - one_loss) <= 1e-11 * one_loss and abs(norm - one_norm) <= 1e-11 * one_norm
