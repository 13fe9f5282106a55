"""A vocabulary-parallel cross-entropy and its Hessian-vector product, on the CPU with gloo.

    torchrun --nproc-per-node 2 examples/vocab_parallel_hvp.py

The logits are a DTensor sharded on the class dimension (``Shard(1)``): each rank holds a slice of every
row's vocabulary. ``curvkern.cross_entropy`` reduces the row statistics over the shards, so the loss, the
gradient and the double backward's HVP are those of one process holding the whole logits, which every rank
also computes here to compare. (torch's own ``F.cross_entropy`` under ``loss_parallel()`` gives an HVP of
about zero on such logits.)
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import curvkern


def loss_and_hvp_norm(logits, target, u):
    loss = curvkern.cross_entropy(logits, target, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, logits, u)  # one fused HVP kernel per rank, on its shard
    if isinstance(hvp, DTensor):  # the loss replicated, the HVP sharded like the logits: gather them
        loss, hvp = loss.full_tensor(), hvp.full_tensor()
    return loss.item(), hvp.norm().item()


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(0)
    batch, vocabulary = 8, 1001  # V need not divide by the number of ranks
    logits = 3 * torch.randn(batch, vocabulary, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocabulary, (batch,), generator=gen)
    target[3] = -100  # an ignored row
    u = torch.randn(batch, vocabulary, generator=gen, dtype=torch.float64)

    sharded = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_(True)
    loss, norm = loss_and_hvp_norm(sharded, target, distribute_tensor(u, mesh, [Shard(1)]))
    one_loss, one_norm = loss_and_hvp_norm(logits.clone().requires_grad_(True), target, u)
    print(
        f"rank {dist.get_rank()}: loss {loss:.12f} hvp norm {norm:.12e} "
        f"one process: loss {one_loss:.12f} hvp norm {one_norm:.12e}",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
