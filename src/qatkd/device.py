"""Where training runs: `train.device` resolved to a torch device, and what follows from it.

`auto` (the default) takes this process's GPU when CUDA is available (under torchrun, the GPU of
its local rank) and the CPU otherwise. Checkpoints are always read onto the CPU first
(`load_checkpoint`) and then moved, so a run trained on a GPU loads on a CPU-only machine and the
other way round.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qatkd.errors import QatkdError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
GPU_LOADER_WORKERS = 4


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto`, `cpu`, `cuda` (this process's GPU: the local rank's under torchrun) or `cuda:N`."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise QatkdError(
            f"train.device={spec}: no CUDA device is available here (torch {torch.__version__}, "
            f"{built}); use train.device=cpu or auto"
        )
    index = local_rank if spec in ("auto", "cuda") else int(spec.partition(":")[2])
    count = torch.cuda.device_count()
    if index >= count:
        raise QatkdError(
            f"train.device={spec}: this process needs GPU {index}, but there are only {count}"
        )
    return torch.device("cuda", index)


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensors in tuples, lists and dicts) on `device`; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def device_name(device: torch.device) -> str:
    """`cpu`, or the GPU's name: what a run's metrics.json records it was trained on."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device


@dataclass(frozen=True)
class Precision:
    """Mixed precision on a device: `dtype` for autocast, and whether gradients need loss
    scaling (float16 underflows where bfloat16 does not)."""

    enabled: bool
    dtype: torch.dtype
    scaled: bool


def mixed_precision(device: torch.device, bf16: bool) -> Precision:
    """`train.bf16`: bfloat16 autocast, or on a GPU without bfloat16, float16 with a grad scaler."""
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(True, torch.float16, scaled=True)
    return Precision(bf16, torch.bfloat16, scaled=False)


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader options: on a GPU, pinned memory and worker processes feed it while it
    computes; on the CPU, workers would only take cores from the training threads. Workers start
    anew each epoch, seeded from the epoch's seed, so a resumed run sees the same data."""
    if device.type != "cuda":
        return {}
    return {"pin_memory": True, "num_workers": min(GPU_LOADER_WORKERS, os.cpu_count() or 1)}
