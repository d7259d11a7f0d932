"""Process-group plumbing for ``torchrun --nproc-per-node N -m gfgp_cli train ...``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op for a
single process. Backend: NCCL for CUDA devices, gloo for CPU. Only rank 0 writes files and
prints progress; metrics are summed over ranks with :func:`all_reduce_sum`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist

from ..errors import BadInputError, WorkFailedError

__all__ = ["DistInfo", "SINGLE_PROCESS", "init_distributed", "cleanup_distributed", "all_reduce_sum", "all_reduce_max", "all_gather_object",
           "run_on_main"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``world_size`` processes, this one is ``rank``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: The DistInfo of a run without torchrun (frozen, so safe as a default argument).
SINGLE_PROCESS = DistInfo()


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes in the environment (or stay single-process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_world_size(), dist.get_rank(), local_rank, owns_group=False)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(world_size, rank, local_rank, owns_group=True)


def cleanup_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (no-op for one process)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: T, info: DistInfo) -> List[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    gathered: List[T] = [None] * info.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, obj)
    return gathered


def run_on_main(fn: Callable[[], T], info: DistInfo) -> Optional[T]:
    """Run ``fn`` on rank 0 only; a bad-input error (or a failed-work error) there is raised on
    every rank, as the same kind, so no rank is left waiting in a collective for one that gave up."""
    if not info.enabled:
        return fn()
    message, result, kind = None, None, BadInputError
    if info.is_main:
        try:
            result = fn()
        except (ValueError, OSError, WorkFailedError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            kind = WorkFailedError if isinstance(e, WorkFailedError) else BadInputError
    box = [(message, kind is WorkFailedError)]
    dist.broadcast_object_list(box, src=0)
    message, failed = box[0]
    if message is not None:
        kind = WorkFailedError if failed else BadInputError
        raise kind(message if info.is_main else f"rank 0: {message}")
    return result
