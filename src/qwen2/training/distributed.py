"""Data parallelism on plain `torch.distributed` + DistributedDataParallel.

Why not accelerate: our loop already owns what accelerate's `Accelerator` would wrap (the data order, the
optimizer step, mixed precision by `torch.autocast`, checkpoints that resume step for step), so accelerate
would add a layer without removing code. DDP is the piece that matters (gradient all-reduce overlapped with
backward, `no_sync` for accumulation), and both launchers start processes the same way: `torchrun` and
`accelerate launch --multi_gpu` set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, which
`init_from_environment` reads (accelerate's multi-CPU mode launches through mpirun instead).
gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> bool:
    """Join the process group a launcher described in the environment; True if this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model DDP-wrapped when several processes train, else unchanged."""
    if rank_and_world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over processes (itself alone in one process)."""
    if rank_and_world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_process(flag: bool) -> bool:
    """True in every process if it is true in any (a stop request must stop them all at the same step)."""
    return bool(all_sum(torch.tensor([int(flag)]))[0])


def gather(obj: Any) -> list[Any]:
    """Every process' `obj`, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
