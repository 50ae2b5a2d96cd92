"""Task families. Each provides data, models, its task loss, its KD loss and its metrics.

Image families (classification, detection) share `qatkd.pipeline` and the ONNX exporter: they
declare an `IMAGE_FAMILY` in their package. A family that works differently (language) has its
own `run` module with the command functions instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from qatkd.config import DataConfig
    from qatkd.distill import KDConfig
    from qatkd.tasks.classification.data import ImageData
    from qatkd.train.engine import Task


@dataclass(frozen=True)
class ImageFamily:
    """What an image task family gives the shared pipeline and exporter.

    `parity(model, runner, batches, desc=..., trained=None)` compares an exported runtime with the
    PyTorch model on labelled batches (classification: `qatkd.tasks.classification.parity`)."""

    load_data: Callable[[DataConfig], ImageData]
    build_model: Callable[[str, int, int, Sequence[float], Sequence[float]], nn.Module]
    check_model_name: Callable[[str], None]
    make_task: Callable[[int, KDConfig | None, bool], Task]
    parity: Callable[..., dict[str, Any]]


def image_family(task: str) -> ImageFamily | None:
    """The image family named `task`, or None for a family with its own run module."""
    return getattr(importlib.import_module(f"qatkd.tasks.{task}"), "IMAGE_FAMILY", None)
