"""Rank/world helpers that work inside and outside a process group (identity in a single process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class FatalError(RuntimeError):
    """An error that a restart would meet again (damaged or refused state, a peer that never delivers, a
    non-finite loss): the worker exits with a code the launcher does not restart."""


@dataclass
class DistContext:
    """This rank's place in its group's world and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (identity outside a multi-rank world): decisions taken from the
    filesystem must be taken once, or ranks may disagree and split collectives."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (a MIN all-reduce): a check one rank fails must stop all of
    them, or the others hang in the next collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    # nccl reduces only CUDA tensors; gloo takes CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
