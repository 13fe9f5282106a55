"""hessian-eigenthings' DDPHessianOperator with curvkern's loss objects on 2 and 4 gloo ranks (127.0.0.1) whose
batches hold different numbers of valid tokens: with ``process_group=`` the matvec equals one process's
over the union of the batches (fp64, 1e-12), and ``.hvp``'s rows are the union's rows times the world size.
Without it the operator averages per-rank means, which differ: the comparison has teeth."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from multiprocess_ranks import init_gloo, rank_output, run_ranks
from test_cross_entropy import TinyCausalLM

from curvkern import available_backends
from curvkern.families import get_family
from curvkern.integrations import eigenthings as ck_eigenthings

# Spawned gloo ranks: `make test` runs these; `make test-fast` leaves them out (they are most of its time).
pytestmark = pytest.mark.slow

he = pytest.importorskip("hessian_eigenthings")

FAMILY = get_family("cross_entropy")
WORLD_SIZE = 2
TIMEOUT_S = 120
FP64 = dict(rtol=1e-12, atol=1e-14)


# Ignored label positions per rank: after the causal shift 10, 4, 12 and 8 valid tokens of 12.
MASKED = (
    [(0, 2), (2, 4)],
    [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 4), (2, 1), (2, 2)],
    [],
    [(1, 1), (1, 2), (1, 3), (1, 4)],
)


def rank_batches(world_size: int = WORLD_SIZE) -> list[dict[str, torch.Tensor]]:
    """One (3, 5) batch per rank, holding different numbers of valid tokens (:data:`MASKED`)."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for masked in MASKED[:world_size]:
        ids = torch.randint(0, 13, (3, 5), generator=gen)
        labels = ids.clone()
        for row, column in masked:
            labels[row, column] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def union(batches):
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def model_and_vector():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    return model, v


def _rank_main(rank: int, port: int, out_dir: str, backends: list[str], world_size: int) -> None:
    init_gloo(rank, world_size, port, TIMEOUT_S)
    try:
        torch.set_num_threads(1)
        model, v = model_and_vector()
        batch = rank_batches(world_size)[rank]
        forward = he.hf_lm_forward()
        logits = forward(model, batch).detach()
        u = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(2 + rank))
        results = {}
        for backend in backends:
            for grouped in (True, False):
                loss = ck_eigenthings.hf_lm_loss_of_output(
                    fused=backend, process_group=dist.group.WORLD if grouped else None
                )
                operator = he.DDPHessianOperator(model, [batch], lambda m, b, loss=loss: loss(forward(m, b), b))
                results[backend, grouped, "matvec"] = operator.matvec(v)
                results[backend, grouped, "hvp"] = loss.hvp(logits, batch, u)
        torch.save({"u": u, "results": results}, rank_output(out_dir, rank))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def rank_results(request, tmp_path_factory):
    """Every CPU backend on 2 ranks; on 4 (the reduction is the same Python for every backend) eager and cpp,
    as the Triton interpreter would double the time."""
    backends = available_backends(FAMILY.name, "cpu")
    if request.param > WORLD_SIZE:
        backends = [backend for backend in backends if backend != "triton"]
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    return backends, run_ranks(_rank_main, request.param, TIMEOUT_S, out_dir, backends, request.param)


def test_uneven_valid_tokens_give_one_process_matvec(rank_results):
    backends, ranks = rank_results
    model, v = model_and_vector()
    forward = he.hf_lm_forward()
    torch_loss = he.hf_lm_loss_of_output()
    batch = union(rank_batches(len(ranks)))
    expected = he.HessianOperator(model, [batch], lambda m, b: torch_loss(forward(m, b), b)).matvec(v)
    assert expected.norm() > 0
    for backend in backends:
        for rank in ranks:
            torch.testing.assert_close(rank["results"][backend, True, "matvec"], expected, **FP64)
        # Per-rank means averaged: not the union's Hessian when the counts differ.
        local = ranks[0]["results"][backend, False, "matvec"]
        assert (local - expected).norm() > 1e-3 * expected.norm(), backend


def test_uneven_valid_tokens_give_one_process_hvp_rows(rank_results):
    """``.hvp`` on each rank, averaged over the ranks as DDPHessianOperator averages, row by row: the
    union's ``.hvp`` rows (the rows of one rank's batch are independent of the others')."""
    backends, ranks = rank_results
    model, _ = model_and_vector()
    batch = union(rank_batches(len(ranks)))
    logits = he.hf_lm_forward()(model, batch).detach()
    u = torch.cat([rank["u"] for rank in ranks])
    for backend in backends:
        expected = ck_eigenthings.hf_lm_loss_of_output(fused=backend).hvp(logits, batch, u)
        got = torch.cat([rank["results"][backend, True, "hvp"] for rank in ranks]) / len(ranks)
        torch.testing.assert_close(got, expected, **FP64)
        local = torch.cat([rank["results"][backend, False, "hvp"] for rank in ranks]) / len(ranks)
        assert (local - expected).norm() > 1e-3 * expected.norm(), backend


def test_process_group_is_checked():
    for factory in (ck_eigenthings.cross_entropy_loss_of_output, ck_eigenthings.hf_lm_loss_of_output):
        with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed\.ProcessGroup"):
            factory(process_group=object())


# --- hf_lm_hidden_loss_of_output: hidden states, the LM head held, family linear_cross_entropy -----------------

HIDDEN_FAMILY = get_family("linear_cross_entropy")


class HiddenTinyCausalLM(TinyCausalLM):
    """TinyCausalLM that returns its final hidden states on request (through its own call, as GGNOperator's
    functional adapter needs)."""

    def forward(self, input_ids, hidden_only=False, **_):
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[:, None]
        x = torch.tanh(self.mix(x.cumsum(1) / steps))
        return x if hidden_only else super().forward(input_ids)


def hidden_model_and_vector():
    torch.manual_seed(0)
    model = HiddenTinyCausalLM().double()
    backbone = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}
    v = torch.randn(sum(p.numel() for p in backbone.values()), dtype=torch.float64)
    return model, v


def hidden_forward(model, batch):
    return model(batch["input_ids"], hidden_only=True)


def backbone_only(name, _):
    return not name.startswith("head.")


def _hidden_rank_main(rank: int, port: int, out_dir: str, backends: list[str]) -> None:
    init_gloo(rank, WORLD_SIZE, port, TIMEOUT_S)
    try:
        torch.set_num_threads(1)
        model, v = hidden_model_and_vector()
        batch = rank_batches()[rank]
        hidden = hidden_forward(model, batch).detach()
        u = torch.randn(hidden.shape, dtype=hidden.dtype, generator=torch.Generator().manual_seed(2 + rank))
        results = {}
        for backend in backends:
            for grouped in (True, False):
                loss = ck_eigenthings.hf_lm_hidden_loss_of_output(
                    model.head, fused=backend, process_group=dist.group.WORLD if grouped else None
                )
                ggn = he.GGNOperator(model, [batch], hidden_forward, loss, param_filter=backbone_only).matvec(v)
                dist.all_reduce(ggn)  # the ranks' average, as DDPHessianOperator averages
                results[backend, grouped, "ggn"] = ggn / WORLD_SIZE
                operator = he.DDPHessianOperator(
                    model, [batch], lambda m, b, loss=loss: loss(hidden_forward(m, b), b), param_filter=backbone_only
                )
                results[backend, grouped, "hessian"] = operator.matvec(v)
                results[backend, grouped, "hvp"] = loss.hvp(hidden, batch, u)
        torch.save({"u": u, "results": results}, rank_output(out_dir, rank))
    finally:
        dist.destroy_process_group()


def test_hidden_loss_uneven_valid_tokens_give_one_process_results(tmp_path):
    """GGN and Hessian matvecs (ranks averaged) and ``.hvp`` rows with ``process_group=``: one process's over
    the union of the ranks' batches; without it they differ."""
    backends = available_backends(HIDDEN_FAMILY.name, "cpu")
    ranks = run_ranks(_hidden_rank_main, WORLD_SIZE, TIMEOUT_S, str(tmp_path), backends)
    model, v = hidden_model_and_vector()
    batch = union(rank_batches())
    hidden = hidden_forward(model, batch).detach()
    u = torch.cat([rank["u"] for rank in ranks])
    for backend in backends:
        loss = ck_eigenthings.hf_lm_hidden_loss_of_output(model.head, fused=backend)

        def hessian_loss(m, b, loss=loss):
            return loss(hidden_forward(m, b), b)

        expected = {
            "ggn": he.GGNOperator(model, [batch], hidden_forward, loss, param_filter=backbone_only).matvec(v),
            "hessian": he.HessianOperator(model, [batch], hessian_loss, param_filter=backbone_only).matvec(v),
        }
        for kind, value in expected.items():
            assert value.norm() > 0
            for rank in ranks:
                torch.testing.assert_close(rank["results"][backend, True, kind], value, **FP64)
            local = ranks[0]["results"][backend, False, kind]
            assert (local - value).norm() > 1e-3 * value.norm(), (backend, kind)
        got = torch.cat([rank["results"][backend, True, "hvp"] for rank in ranks]) / WORLD_SIZE
        torch.testing.assert_close(got, loss.hvp(hidden, batch, u), **FP64)
