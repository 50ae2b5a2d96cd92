"""What the CNN speed pages share: the W8A8 model as qatkd exports it, the fastest latency among
a run's records, the issue's targets checked against measured values, and a failure in one line
for the tables."""

from __future__ import annotations

import copy
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from qatkd.export import as_exported
from qatkd.quant import QuantConfig, calibrate, prepare

CALIBRATION_BATCH = 8
MET = {True: "yes", False: "**no**", None: "-"}
"""How a targets table shows `meets`."""


def w8a8(
    model: nn.Module, images: Sequence[np.ndarray], shape: Sequence[int], skip: Sequence[str] = ()
) -> nn.Module:
    """A W8A8 copy of `model` (min-max; the modules matching `skip` left float), calibrated on
    `images` (each a batch of one, as the peers read them), with its biases aligned to the int32
    grid as `qatkd export` does: the PyTorch model the int8 graph computes."""
    config = QuantConfig(bits="W8A8", method="minmax", skip=list(skip))
    quantized = prepare(copy.deepcopy(model), config)
    batches = [
        torch.from_numpy(np.concatenate(images[i : i + CALIBRATION_BATCH]))
        for i in range(0, len(images), CALIBRATION_BATCH)
    ]
    calibrate(quantized, batches, len(images), progress=True)
    return as_exported(quantized, shape).eval()


def latency(records: list[dict[str, Any]], model: str, batch: int, **match: str) -> float:
    """The fastest latency among `model`'s records at `batch` matching `match` (backend /
    precision; PyTorch eager is never a deployment backend here)."""
    return min(
        r["latency_ms"]
        for r in records
        if (r["model"], r["batch"]) == (model, batch)
        and r["backend"] != "pytorch"
        and all(r[k] == v for k, v in match.items())
    )


def meets(value: float, goal: str) -> bool | None:
    """Whether `value` meets `goal` ('<= x' or '>= x'); None for no goal ('-')."""
    if goal == "-":
        return None
    op, bound = goal.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def one_line(e: Exception) -> str:
    """`e` in one line for the page's tables; its traceback goes to stderr, for the log."""
    traceback.print_exc()
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}".replace("|", "\\|")
