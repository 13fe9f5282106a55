"""hessian-eigenthings on hidden states: ``hf_lm_hidden_loss_of_output`` (the loss through
``curvkern.linear_cross_entropy``, ``.hvp`` through ``linear_ce_ggn_vp``) gives the GGN of the parameters upstream
of the LM head, equal to the GGN through the logits (``hf_lm_loss_of_output`` on head(hidden), the head frozen)
restricted to them, fp64 to 1e-12 relative; untied and tied heads, a tiny LM and a random-init GPT-2.
``HessianOperator`` with ``linear_cross_entropy`` on hidden states equals it with ``F.cross_entropy`` on logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tolerance import relative_error

import curvkern
from curvkern import _dispatch
from curvkern.families import get_family
from curvkern.integrations import eigenthings as ck_eigenthings
from curvkern.linear_ce import cpp, eager

he = pytest.importorskip("hessian_eigenthings")

FAMILY = get_family("linear_cross_entropy")
BACKENDS = _dispatch.available_backends(FAMILY.name, "cpu")
ON_EACH_BACKEND = pytest.mark.parametrize("backend", BACKENDS)
FP64_BOUND = 1e-12
VOCAB, WIDTH = 13, 6
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 4 rows × 8 classes: the 15 rows of a batch span 4 row tiles, the 13 classes 2 class tiles."""
    for module in (eager, cpp):
        monkeypatch.setattr(module, "N_TILE", 4)
        monkeypatch.setattr(module, "V_TILE", 8)


class TinyLM(torch.nn.Module):
    """Embedding, a causal running mean, a nonlinearity, a norm and a head (tied to the embedding or with a bias)."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.mix = torch.nn.Linear(WIDTH, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=not tied)
        if tied:
            self.head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, hidden_only=False, **_):
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[:, None]
        x = self.norm(torch.tanh(self.mix(x.cumsum(1) / steps)))
        return x if hidden_only else SimpleNamespace(logits=self.head(x))


def lm_batches(seed=0, vocab=VOCAB, shape=(3, 5)):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, vocab, shape, generator=gen)
        labels = ids.clone()
        labels[0, 2] = -100
        labels[-1, -1] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def tiny_hidden_forward(model, batch):
    return model(batch["input_ids"], hidden_only=True)


def upstream_of(head_names):
    return lambda name, _: name not in head_names


def frozen_head_forward(hidden_forward, head):
    """logits = head(hidden) with the head's parameters as constants: the logits path restricted to upstream."""
    weight = head.weight.detach().clone()
    bias = None if head.bias is None else head.bias.detach().clone()
    return lambda model, batch: F.linear(hidden_forward(model, batch), weight, bias)


def assert_fp64_equal(actual, expected, label):
    error = relative_error(actual, expected)
    assert error <= FP64_BOUND, f"{label}: relative error {error:.2e}"
    assert expected.norm() > 0, label
    return error


def ggn_matvecs(model, batches, hidden_forward, head, backend, param_filter):
    torch.manual_seed(1)
    v = torch.randn(sum(p.numel() for _, p in model.named_parameters() if param_filter(_, p)), dtype=torch.float64)
    hidden_loss = ck_eigenthings.hf_lm_hidden_loss_of_output(model, fused=backend)
    assert hidden_loss.lm_head is head
    ours = he.GGNOperator(model, batches, hidden_forward, hidden_loss, param_filter=param_filter).matvec(v)
    through_logits = he.GGNOperator(
        model,
        batches,
        frozen_head_forward(hidden_forward, head),
        he.hf_lm_loss_of_output(),
        param_filter=param_filter,
    ).matvec(v)
    return ours, through_logits, v


@ON_EACH_BACKEND
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_ggn_of_hidden_states_is_the_logits_ggn_restricted_upstream(backend, tied):
    model = TinyLM(tied).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # LayerNorm's unit weight and zero bias perturbed too
    batches = lm_batches()
    # Tied: the embedding is the head; it stays a parameter, seen through its input use only.
    head_names = () if tied else ("head.weight", "head.bias")
    ours, through_logits, v = ggn_matvecs(
        model, batches, tiny_hidden_forward, model.head, backend, upstream_of(head_names)
    )
    assert_fp64_equal(ours, through_logits, f"GGN {backend} tied={tied}")
    if tied:
        # Through the live (tied) head the logits GGN also sees the weight's head use: it differs.
        live = he.GGNOperator(model, batches, he.hf_lm_forward(), he.hf_lm_loss_of_output()).matvec(v)
        assert relative_error(ours, live) > 1e-3


@ON_EACH_BACKEND
def test_hvp_is_w_transpose_h_w_u(backend):
    """``.hvp(hidden, batch, u)`` (the 1.0.0a6 protocol) = the autograd Hessian of the logits loss in hidden."""
    model = TinyLM(tied=False).double()
    batch = lm_batches()[0]
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, WIDTH, generator=gen, dtype=torch.float64)
    u = torch.randn(3, 5, WIDTH, generator=gen, dtype=torch.float64)
    loss_fn = ck_eigenthings.hf_lm_hidden_loss_of_output(model.head, fused=backend)
    reference_loss = he.hf_lm_loss_of_output()

    leaf = hidden.clone().requires_grad_(True)
    loss = reference_loss(model.head(leaf), batch)
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    (expected,) = torch.autograd.grad(grad, leaf, u)
    assert_fp64_equal(loss_fn(hidden, batch), loss.detach(), "loss")
    hvp = loss_fn.hvp(hidden, batch, u)
    assert hvp.shape == hidden.shape and hvp.dtype == hidden.dtype
    assert_fp64_equal(hvp, expected, "hvp")
    assert torch.count_nonzero(hvp[:, -1]) == 0 and torch.count_nonzero(hvp[0, 1]) == 0  # last step; label ignored

    # The GGN assembled with .hvp, as hessian-eigenthings 1.0.0a6 does: equal to the autograd path's.
    batches = lm_batches()
    params = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    fixed = {n: p for n, p in model.named_parameters() if n.startswith("head.")}

    def call(p):
        return torch.func.functional_call(model, {**fixed, **p}, (batches[0]["input_ids"],), {"hidden_only": True})

    out, jv = torch.func.jvp(call, (params,), (v,))
    _, vjp = torch.func.vjp(call, params)
    via_hvp = torch.cat([g.reshape(-1) for g in vjp(loss_fn.hvp(out.detach(), batches[0], jv))[0].values()])
    operator = he.GGNOperator(model, batches[:1], tiny_hidden_forward, loss_fn, param_filter=lambda n, _: n in params)
    assert_fp64_equal(via_hvp, operator.matvec(torch.cat([t.reshape(-1) for t in v.values()])), "GGN via .hvp")


def test_head_argument_and_tangent_are_checked():
    model = TinyLM(tied=False).double()
    assert ck_eigenthings.hf_lm_hidden_loss_of_output(model).lm_head is model.head
    assert ck_eigenthings.hf_lm_hidden_loss_of_output(model.head).lm_head is model.head
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ck_eigenthings.hf_lm_hidden_loss_of_output(model.head.weight)
    with pytest.raises(ValueError, match=r"\(V, d\) weight"):
        ck_eigenthings.hf_lm_hidden_loss_of_output(torch.nn.LayerNorm(4))
    model.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="no LM head"):
        ck_eigenthings.hf_lm_hidden_loss_of_output(model)
    with pytest.raises(ValueError, match="fused must be one of"):
        ck_eigenthings.hf_lm_hidden_loss_of_output(torch.nn.Linear(4, 5), fused="fast")
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed\.ProcessGroup"):
        ck_eigenthings.hf_lm_hidden_loss_of_output(torch.nn.Linear(4, 5), process_group=object())
    loss_fn = ck_eigenthings.hf_lm_hidden_loss_of_output(torch.nn.Linear(4, 5).double())
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="u of shape"):
        loss_fn.hvp(hidden, {"labels": torch.zeros(2, 3, dtype=torch.int64)}, torch.randn(2, 3, 5, dtype=torch.float64))


def test_no_tensor_of_n_times_v_elements_in_a_ggn_matvec():
    """The GGN matvec through hidden states (eager backend, whose ATen ops a dispatch mode sees) never creates a
    tensor of N·V elements; through the logits it does, so the check can fail."""
    from test_linear_cross_entropy import LargestAllocation

    vocab = 64  # N·V = 15·64 = 960 > every tile (4·8 = 32 here) and every parameter (64·6 = 384)
    model = TinyLM(tied=True).double()
    model.embed = torch.nn.Embedding(vocab, WIDTH).double()
    model.head = torch.nn.Linear(WIDTH, vocab, bias=False).double()
    model.head.weight = model.embed.weight
    batches = lm_batches(vocab=vocab)[:1]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    loss_fn = ck_eigenthings.hf_lm_hidden_loss_of_output(model, fused="eager")
    with LargestAllocation() as recorder:
        he.GGNOperator(model, batches, tiny_hidden_forward, loss_fn).matvec(v)
    assert recorder.largest < 15 * vocab
    with LargestAllocation() as recorder:
        he.GGNOperator(model, batches, he.hf_lm_forward(), he.hf_lm_loss_of_output()).matvec(v)
    assert recorder.largest >= 15 * vocab


# --- GPT-2 (transformers), random init -----------------------------------------------------------------------


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    config._attn_implementation = "eager"  # torch.func.jvp (the GGN) has no forward AD through SDPA on CPU
    return transformers.GPT2LMHeadModel(config).double().eval()  # eval: no dropout


@ON_EACH_BACKEND
def test_gpt2_ggn_and_hessian_equal_through_both_paths(backend):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    batches = lm_batches(vocab=50, shape=(2, 6))
    hidden_forward = ck_eigenthings.hf_lm_hidden_forward()
    everything = upstream_of(())  # the tied weight is named once, transformer.wte.weight

    ours, through_logits, v = ggn_matvecs(model, batches, hidden_forward, model.lm_head, backend, everything)
    assert_fp64_equal(ours, through_logits, f"GPT-2 GGN {backend}")

    def hidden_loss(m, batch):
        hidden = hidden_forward(m, batch)
        labels = batch["labels"]
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        return curvkern.linear_cross_entropy(hidden, m.lm_head.weight, shifted, fused=backend)

    def logits_loss(m, batch):
        return he.hf_lm_loss_of_output()(he.hf_lm_forward()(m, batch), batch)

    hessian = [he.HessianOperator(model, batches, loss).matvec(v) for loss in (hidden_loss, logits_loss)]
    assert_fp64_equal(hessian[0], hessian[1], f"GPT-2 Hessian {backend}")
    assert relative_error(hessian[1], through_logits) > 1e-3  # the Hessian is not the GGN: the test has teeth


def test_gpt2_hidden_forward_computes_no_logits():
    model = tiny_gpt2()
    batch = lm_batches(vocab=50, shape=(2, 6))[0]
    hidden = ck_eigenthings.hf_lm_hidden_forward()(model, batch)
    torch.testing.assert_close(
        model.lm_head(hidden), he.hf_lm_forward()(model, batch), rtol=0, atol=0
    )  # the final hidden states, after ln_f


def test_hidden_forward_refuses_a_model_that_computes_logits():
    class IgnoresLogitsToKeep(torch.nn.Module):
        def forward(self, input_ids, **_):
            hidden = torch.zeros(*input_ids.shape, 4)
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 7), hidden_states=(hidden,))

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.int64), "labels": torch.zeros(2, 3, dtype=torch.int64)}
    with pytest.raises(ValueError, match="despite logits_to_keep"):
        ck_eigenthings.hf_lm_hidden_forward()(IgnoresLogitsToKeep(), batch)


# --- The example -------------------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess running the example
def test_lm_head_hessian_example_runs():
    """The example with ``--check``, importing this checkout's curvkern (not another installed copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lm_head_hessian.py"), "--check", "-k", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "top eigenvalues" in result.stdout and "relative error" in result.stdout
    assert time.perf_counter() - start < 120
