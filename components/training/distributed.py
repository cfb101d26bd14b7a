"""Rank helpers over torch.distributed, valid in a plain process (rank 0 of a world of 1).

Every rank decision in genpipe goes through here (EDM's `torch_utils/distributed.py` plays the same
role), so components such as quantizers and the training loop read the same rank and world size
whether they run under Ray Train's DDP process group or in a unit test.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the one process that writes logs, checkpoints and samples."""
    return rank() == 0


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks, as a new tensor (x itself when alone); NCCL needs x on the GPU."""
    if world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks, as a new tensor (x itself when alone)."""
    if world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a picklable object; for rare, small messages)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op when alone)."""
    if world_size() > 1:
        dist.barrier()
