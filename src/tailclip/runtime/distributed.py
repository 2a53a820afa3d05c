"""Distributed helpers: the same code runs as one process or under `torchrun --nproc_per_node=N` (DDP).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; the first collective call initialises the process group
(gloo on CPU, NCCL on CUDA). Everything degrades to no-ops in a single process, so callers never branch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """What torchrun (or any launcher following its env contract) says about this process."""
    return DistInfo(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    )


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Initialise the default process group once when launched with WORLD_SIZE > 1; return this rank's info."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        log.info("process group initialised: rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else env_info().rank


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True in a single process and on rank 0; only the main process writes files."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across ranks (in place and returned); identity in a single process."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled; for per-rank prediction shards of uneven length)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(indices: np.ndarray, rank_: int, world: int) -> np.ndarray:
    """Contiguous, as-even-as-possible share of `indices` for `rank_` (sizes differ by at most one; no padding)."""
    return np.array_split(np.asarray(indices), world)[rank_]


__all__ = [
    "DistInfo", "all_gather_objects", "all_reduce_sum", "barrier", "broadcast_object", "env_info", "init_distributed",
    "is_initialized", "is_main_process", "rank", "shard", "world_size",
]
