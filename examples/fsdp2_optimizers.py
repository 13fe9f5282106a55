"""HysteroGrad and BiostatisV6 on a model sharded by FSDP2 (``fully_shard``), on the CPU with gloo.

    torchrun --nproc-per-node 2 examples/fsdp2_optimizers.py

``fully_shard`` turns every parameter into a DTensor sharded on dim 0 over the mesh. The optimizers step each
rank's shards and sum every statistic over the shards (one ``all_gather`` per param group and step), so the
model moves as it would in one process: every rank prints the same loss, and so does one process holding the
whole model and the whole batch (printed by rank 0 as "one process").
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from curvkern.optim import BiostatisV6, HysteroGrad


def model_and_data():
    torch.manual_seed(0)  # the same model on every rank and in the one-process run
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 4))
    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    return model, data, target


def train(model, optimizer, data, target) -> float:
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(data), target).backward()
        optimizer.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(data), target).item()


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world_size,))
    for optimizer_class in (HysteroGrad, BiostatisV6):
        model, data, target = model_and_data()
        fully_shard(model, mesh=mesh)  # 33 rows do not split evenly: uneven shards are fine
        rows = data.shape[0] // world_size  # each rank its part of the batch; FSDP2 averages the gradients
        mine = slice(rank * rows, (rank + 1) * rows)
        optimizer = optimizer_class(model.parameters(), lr=1e-2)
        train(model, optimizer, data[mine], target[mine])
        with torch.no_grad():  # the loss on the whole batch: forward on the full data on every rank
            loss = torch.nn.functional.mse_loss(model(data), target).item()
        print(f"rank {rank}: {optimizer_class.__name__} loss {loss:.6f}", flush=True)
        if rank == 0:
            whole, data, target = model_and_data()
            loss = train(whole, optimizer_class(whole.parameters(), lr=1e-2), data, target)
            print(f"one process: {optimizer_class.__name__} loss {loss:.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
