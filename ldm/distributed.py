"""The few collectives that sampling and evaluation need, on torch.distributed alone (no Lightning).

Every function here is a no-op on a single process, and every collective is entered by every rank: a
collective run on a subset of ranks (e.g. metrics computed on rank 0 while torchmetrics all-gathers
inside ``compute()``) waits forever.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def shard(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """The contiguous share of ``n`` items that ``rank_`` of ``world`` takes: sizes differ by at most one,
    and concatenating the shares in rank order gives back ``range(n)``."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (1 if rank_ < extra else 0))


def all_gather_objects(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (``[obj]`` on a single process). Objects travel pickled
    between the ranks of this job only: never use it on data read from an untrusted file."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_rank_zero(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on rank 0, its result on every rank. An exception on rank 0 is raised on every rank
    (the others would otherwise wait in the broadcast until the timeout)."""
    if not is_distributed():
        return fn()
    result: Any = None
    error = None
    if rank() == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = f"{type(err).__name__}: {err}"
    result, error = broadcast_object((result, error))
    if error is not None:
        raise RuntimeError(f"{what} failed on rank 0: {error}")
    return result


def init_from_environment(timeout_minutes: float = 30.0) -> bool:
    """Join the process group that ``torchrun`` (or SLURM's srun with torchrun's variables) describes in
    the environment, for the command-line tools that run outside Lightning. Returns whether this process
    is one of several. NCCL with one GPU per local rank where CUDA is available, else gloo."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def local_device() -> torch.device:
    """This rank's device: its CUDA device under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
