"""Top Hessian eigenvalues of a tiny language model with hessian-eigenthings, the loss computed by
``curvkern.linear_cross_entropy`` on the final hidden states: the (tokens × vocabulary) logits are never formed.

    python examples/lm_head_hessian.py            # Lanczos on the full Hessian, head included
    python examples/lm_head_hessian.py --check    # also against F.cross_entropy on materialised logits

``HessianOperator`` differentiates the loss twice with autograd; ``linear_cross_entropy``'s double backward is the
exact tiled Hessian-vector product with respect to the hidden states, the head's weight and its bias, cross terms
included, so the operator is the full Hessian of every parameter, the head's too. With ``--check`` one matvec and
the eigenvalues are compared with the same operator on ``F.cross_entropy(head(hidden))`` (fp64), and the
Gauss-Newton matrix of the backbone is computed with ``hf_lm_hidden_loss_of_output`` (docs/linear_cross_entropy.md).
"""

import argparse

import hessian_eigenthings as he
import torch
import torch.nn.functional as F

import curvkern
from curvkern.integrations.eigenthings import hf_lm_hidden_loss_of_output

VOCAB, WIDTH, BATCH, LENGTH = 257, 12, 4, 10


class TinyLM(torch.nn.Module):
    """Embedding, a causal running mean, an MLP and a norm (the backbone), and a head with a bias."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(), torch.nn.Linear(2 * WIDTH, WIDTH)
        )
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        """The final hidden states (B, T, d); the head is applied by the loss."""
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        x = x.cumsum(1) / steps
        return self.norm(x + self.mlp(x))


def shifted(labels):
    """Position t predicts label t + 1; the last position is ignored."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def hidden_loss(model, batch):
    """The loss without logits: linear_cross_entropy on the hidden states and the head's parameters."""
    return curvkern.linear_cross_entropy(
        model(batch["input_ids"]), model.head.weight, shifted(batch["labels"]), model.head.bias
    )


def logits_loss(model, batch):
    logits = model.head(model(batch["input_ids"]))
    return F.cross_entropy(logits.reshape(-1, VOCAB), shifted(batch["labels"]).reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with F.cross_entropy on the logits")
    parser.add_argument("-k", type=int, default=3, help="number of eigenvalues")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyLM().double()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
        labels = ids.clone()
        labels[0, :3] = -100  # e.g. a prompt that is not scored
        batches.append({"input_ids": ids, "labels": labels})

    hessian = he.HessianOperator(model, batches, hidden_loss)
    result = he.lanczos(hessian, k=args.k, seed=0)
    print(f"{hessian.size} parameters, top eigenvalues of the Hessian: {result.eigenvalues.tolist()}")

    if args.check:
        reference = he.HessianOperator(model, batches, logits_loss)
        v = torch.randn(hessian.size, dtype=torch.float64, generator=gen)
        expected = reference.matvec(v)
        error = ((hessian.matvec(v) - expected).norm() / expected.norm()).item()
        print(f"Hessian matvec against F.cross_entropy on logits: relative error {error:.1e}")
        assert error < 1e-12
        reference_values = he.lanczos(reference, k=args.k, seed=0).eigenvalues
        print(f"through the logits: {reference_values.tolist()}")
        torch.testing.assert_close(result.eigenvalues, reference_values, rtol=1e-8, atol=1e-10)

        # The Gauss-Newton matrix of the backbone (every parameter but the head's) from the hidden states. The
        # forward_fn calls the model itself: GGNOperator substitutes its parameters only in that call.
        ggn = he.GGNOperator(
            model,
            batches,
            lambda m, batch: m(batch["input_ids"]),
            hf_lm_hidden_loss_of_output(model),
            param_filter=lambda name, _: not name.startswith("head."),
        )
        print(f"top eigenvalues of the backbone's GGN: {he.lanczos(ggn, k=args.k, seed=0).eigenvalues.tolist()}")


if __name__ == "__main__":
    main()
