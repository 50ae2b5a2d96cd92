"""What a task family gives the engine (`Task`) and how the teachers' outputs reach it
(`TeacherOutputs`): the engine's only view of images, boxes or tokens, in a module of its own so
that the engine's helpers (the balancer's held-out pass) can name it too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

TeacherOutputs = Callable[[Any], list[Any]]
"""The teachers' outputs for a training batch: live (an ensemble) or looked up in a cache."""


class Task(Protocol):
    """What a task family gives the engine. `maximize`: whether a larger `main_metric` is better
    (accuracy, mAP) or a smaller one (perplexity); `unit` names what `units(batch)` counts for
    the throughput in the progress bar (img, tok)."""

    main_metric: str
    maximize: bool
    eval_batch_size: int
    unit: str

    def units(self, batch: Any) -> int: ...

    def inputs(self, batch: Any) -> torch.Tensor: ...

    def task_loss(self, outputs: Any, batch: Any) -> torch.Tensor: ...

    def kd_loss(
        self, outputs: Any, teacher_outputs: list[Any]
    ) -> torch.Tensor | list[torch.Tensor]: ...

    def kd_parts(
        self, student: nn.Module, teacher_outputs: TeacherOutputs, example: Any
    ) -> nn.Module | None:
        """The KD loss's own trainable modules for this student and these teachers (feature
        adapters), or None; called once before training, with `example` a batch of one training
        sample on the training device. The task may hook `student` here to read its features."""
        ...

    def batch_metrics(self, outputs: Any, batch: Any) -> dict[str, float]: ...

    def evaluate(
        self, model: nn.Module, loader: DataLoader, split: str = "test"
    ) -> dict[str, float]:
        """Metrics by their plain names (`main_metric` among them); `split` ("val" or "test")
        says which data `loader` holds."""
        ...
