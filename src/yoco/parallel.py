"""Data parallelism for training, kept out of the model files.

Launched with ``torchrun --nproc_per_node=N -m yoco.train ...`` (the ``yoco train`` flags): each
process takes an equal share of every global batch's rows and the gradients are averaged, so N
processes follow the same trajectory as one process on the same global batch. ``ddp`` replicates the
model (DistributedDataParallel); ``fsdp`` shards parameters, gradients and optimizer state with
FSDP2 (``fully_shard`` on every residual block, then on the model). Checkpoints always hold full
(unsharded) tensors, gathered to the first process. The backend is gloo on CPU and NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import YocoError


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


class ParallelError(YocoError, ValueError):
    """A parallel setting that cannot work (an unknown mode, a batch the processes cannot split)."""


MODES = ("ddp", "fsdp")


def sharded(world: World, mode: str) -> bool:
    return world.size > 1 and mode == "fsdp"


def wrap(model: nn.Module, world: World, mode: str = "ddp") -> nn.Module:
    """The module to run forward/backward with. Under FSDP2 the model itself is sharded in place, so
    build the optimizer after this call."""
    if mode not in MODES:
        raise ParallelError(f"unknown parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    if world.size == 1:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from .models.base import Block

        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def full_state(model: nn.Module, optimizer, world: World, mode: str) -> tuple[dict | None, dict | None]:
    """Unsharded (model, optimizer) state dicts on the first process (None on the others). A
    collective under FSDP: every process must call it."""
    if sharded(world, mode):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        return (model_state, optim_state) if world.main else (None, None)
    if not world.main:
        return None, None
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer, state: dict, world: World, mode: str) -> None:
    if sharded(world, mode):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def scalar(value) -> float:
    """A Python float from a tensor that may be a DTensor (FSDP2's gradient norm)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def shard_rows(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This process's rows of a global batch (equal shares)."""
    if world.size == 1:
        return batch
    if batch.shape[0] % world.size:
        raise ParallelError(f"batch size {batch.shape[0]} must be divisible by the {world.size} processes")
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
