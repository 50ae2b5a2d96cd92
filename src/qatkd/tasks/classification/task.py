"""The classification task family: cross-entropy as the task loss, accuracy as the metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from qatkd.device import module_device
from qatkd.distill import KDConfig, build_kd_loss
from qatkd.train.task import TeacherOutputs

Batch = tuple[torch.Tensor, ...]
"""(images, labels), plus the sample indices when teacher logits come from a cache."""
EVAL_BATCH_SIZE = 512


class ClassificationTask:
    main_metric = "acc"
    maximize = True
    eval_batch_size = EVAL_BATCH_SIZE
    unit = "img"

    def __init__(self, num_classes: int, kd: KDConfig | None = None, per_teacher: bool = False):
        self.num_classes = num_classes
        self.kd = build_kd_loss(kd or KDConfig(), per_teacher=per_teacher)

    def inputs(self, batch: Batch) -> torch.Tensor:
        return batch[0]

    def units(self, batch: Batch) -> int:
        return len(batch[0])

    def task_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(outputs, batch[1])

    def kd_loss(
        self, outputs: torch.Tensor, teacher_outputs: list[torch.Tensor]
    ) -> torch.Tensor | list[torch.Tensor]:
        return self.kd(outputs, teacher_outputs)

    def kd_parts(
        self, student: nn.Module, teacher_outputs: TeacherOutputs, example: Batch
    ) -> nn.Module | None:
        """Logit KD has no trainable parts."""
        return None

    def batch_metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
        return {"train_acc": (outputs.argmax(1) == batch[1]).float().mean().item() * 100}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, loader: DataLoader, split: str = "test"
    ) -> dict[str, float]:
        """Top-1 accuracy in percent (torchmetrics), with the model in eval mode."""
        was_training = model.training
        model.eval()
        # Rank 0 alone evaluates under torchrun: no cross-process sync of the metric.
        from torchmetrics.classification import MulticlassAccuracy  # slow import: see family.py

        accuracy = MulticlassAccuracy(self.num_classes, average="micro", sync_on_compute=False)
        device = module_device(model)
        accuracy.to(device)
        for x, y, *_ in loader:
            accuracy.update(model(x.to(device)), y.to(device))
        model.train(was_training)
        return {self.main_metric: accuracy.compute().item() * 100}
