"""HysteroGrad and BiostatisV6 under torch.distributed's ZeroRedundancyOptimizer, on the CPU with gloo.

    torchrun --nproc-per-node 2 examples/zero_optimizers.py

Each rank steps whole tensors of every param group; ``process_group=`` sums the group statistics over the
ranks, so the model moves as it would in one process. ZeroRedundancyOptimizer takes ``process_group=``
itself, so the optimizer's goes in through ``functools.partial``. Every rank prints the same line.
"""

import functools

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from curvkern.optim import BiostatisV6, HysteroGrad


def main() -> None:
    dist.init_process_group("gloo")  # before the optimizers: dist.group.WORLD is None until then
    rank = dist.get_rank()
    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    for optimizer_class in (HysteroGrad, BiostatisV6):
        torch.manual_seed(0)  # a fresh model for each optimizer, the same on every rank
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        optimizer = ZeroRedundancyOptimizer(
            model.parameters(),
            optimizer_class=functools.partial(optimizer_class, process_group=dist.group.WORLD),
            lr=1e-2,
        )
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(data), target).backward()  # the same batch: DDP's gradients
            returned = optimizer.step()
        loss = torch.nn.functional.mse_loss(model(data), target).item()
        print(
            f"rank {rank}: {optimizer_class.__name__} loss {loss:.6f}" + (f" {returned}" if returned else ""),
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
