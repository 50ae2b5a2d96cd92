"""Data-parallel training with PyTorch's own engine (torchrun + DistributedDataParallel).

`torchrun --nproc_per_node=N -m qatkd distill ...` sets WORLD_SIZE/RANK/LOCAL_RANK; everything
else works unchanged: gloo on CPUs, nccl with one GPU per process (its local rank's) on GPUs.
Rank 0 alone writes logs, plots and checkpoints.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qatkd.device import resolve_device


@dataclass(frozen=True)
class World:
    """This process's rank among `size` and the device it trains on."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str) -> World:
    """Join the process group that torchrun describes in the environment (once), or run alone,
    on `device` (`train.device`, resolved for this process's local rank)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if size == 1:
        return World(device=resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    return World(dist.get_rank(), dist.get_world_size(), resolved)


def _leave_process_group() -> None:
    """Destroy the process group while the interpreter is still whole: left to its teardown,
    gloo's worker threads can release tensors after Python is gone and the rank aborts
    ("terminate called without an active exception", SIGABRT) after a finished run
    (pytorch/pytorch#179291 proposed the same atexit handler inside PyTorch)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's `value` on every rank (a path, or an error message to raise everywhere)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank if `flag` is true on any: ranks decide together to skip a step, since
    a rank that skipped alone would leave the others waiting in the gradient all-reduce."""
    if not world.distributed:
        return flag
    value = torch.tensor(float(flag), device=world.device)  # nccl reduces GPU tensors only
    dist.all_reduce(value)
    return bool(value.item() > 0)


def mean_over_ranks(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over every rank, on every rank."""
    if not world.distributed:
        return value
    value = value.to(world.device).clone()  # nccl reduces GPU tensors only
    dist.all_reduce(value)
    return value / world.size


def average_gradients(world: World, module: nn.Module) -> None:
    """All-reduce the gradients of a module that DDP does not wrap (the balancer), so its
    parameters stay identical on every rank."""
    if not world.distributed:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world.size
