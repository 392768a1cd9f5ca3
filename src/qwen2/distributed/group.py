"""The process group tensor parallelism runs on, and the collectives it calls.

Every collective has a timeout (the group's), so a rank that died or hangs makes the others raise
`TensorParallelError` instead of waiting forever: gloo notices a closed peer at once and a silent one after
the timeout; nccl only through the timeout (its watchdog).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds: long enough for a slow prefill of a large batch on the CPU


class TensorParallelError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the group is misconfigured."""


def init_process_group(timeout: float = DEFAULT_TIMEOUT) -> None:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): nccl when this process
    has a GPU, gloo otherwise. Nothing is done when a group already exists (the caller chose its options)."""
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise TensorParallelError(
            f"tp_plan='auto' needs torch.distributed, but {', '.join(missing)} is not set: launch the script with "
            f"`torchrun --nproc-per-node N script.py` (or call torch.distributed.init_process_group first)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    logger.info("Joined a %s group as rank %d of %d.", backend, dist.get_rank(), dist.get_world_size())


def device_for_rank() -> torch.device:
    """This rank's GPU under nccl (LOCAL_RANK), else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(what: str, err: Exception) -> TensorParallelError:
    rank = dist.get_rank() if dist.is_initialized() else "?"
    return TensorParallelError(f"rank {rank}: {what} failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                               f"another tensor-parallel rank has probably died or stopped responding")


def all_reduce(tensor: Tensor) -> Tensor:
    """Sum `tensor` over the ranks in place (the partial products of a row-wise split)."""
    try:
        dist.all_reduce(tensor)
    except RuntimeError as err:  # gloo/nccl raise DistBackendError and plain RuntimeErrors
        raise _failed("all_reduce", err) from err
    return tensor


def all_gather_last(tensor: Tensor) -> Tensor:
    """Every rank's `tensor` concatenated along the last dimension, in rank order (the vocabulary slices)."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(parts, tensor)
    except RuntimeError as err:
        raise _failed("all_gather", err) from err
    return torch.cat(parts, dim=-1)


def broadcast_object(value: Any = None, src: int = 0, group: Any = None) -> Any:
    """`value` from rank `src` on every rank (pickled: for small messages such as a serving step's inputs)."""
    box = [value]
    try:
        dist.broadcast_object_list(box, src=src, group=group)
    except RuntimeError as err:
        raise _failed("broadcast", err) from err
    return box[0]
