"""Data parallelism for training, kept out of the model files.

Launched with ``torchrun --nproc_per_node=N -m yoco.train ...`` (the ``yoco train`` flags): each
process takes an equal share of every global batch's rows, and DDP averages the gradients, so N
processes follow the same trajectory as one process on the same global batch. The backend is gloo
on CPU and NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """The process group from torchrun's environment, or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), device)


def wrap(model: nn.Module, world: World) -> nn.Module:
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def shard_rows(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This process's rows of a global batch (equal shares)."""
    if world.size == 1:
        return batch
    if batch.shape[0] % world.size:
        raise ValueError(f"batch size {batch.shape[0]} must be divisible by the {world.size} processes")
    share = batch.shape[0] // world.size
    return batch[world.rank * share:(world.rank + 1) * share]


def mean_over_world(value: float, world: World) -> float:
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.item() / world.size


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def close(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
