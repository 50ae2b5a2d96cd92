"""The detection task: FCOS-style losses, the detection KD of `kd` and mAP (torchmetrics, COCO).

L_TS (the detector's own loss, averaged over the positive locations): sigmoid focal loss on the
class logits of every location, GIoU loss on the decoded boxes and BCE on the centerness of the
positives. L_KD: `qatkd.tasks.detection.kd` (`kd.form`), one term or one per teacher
(`per_teacher`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from qatkd.device import module_device
from qatkd.errors import QatkdError
from qatkd.tasks.detection.boxes import assign, centerness, decode, detections, locations, split
from qatkd.tasks.detection.config import DetectionKDConfig
from qatkd.tasks.detection.data import unpadded
from qatkd.tasks.detection.kd import detection_kd
from qatkd.train.task import TeacherOutputs

Batch = tuple[Tensor, ...]
"""(images, boxes [B, MAX_OBJECTS, 4], labels [B, MAX_OBJECTS] with -1 padding)."""


class DetectionTask:
    main_metric = "map50"
    maximize = True
    eval_batch_size = 64
    unit = "img"

    def __init__(
        self, num_classes: int, kd: DetectionKDConfig | None = None, per_teacher: bool = False
    ) -> None:
        kd = kd or DetectionKDConfig(temperature=1.0)
        if kd.loss != "kl":
            raise QatkdError(
                f"kd.loss={kd.loss}: detection distills with its own terms (kd.form, "
                "kd.*_weight); leave kd.loss=kl"
            )
        self.num_classes = num_classes
        self.kd = detection_kd(kd, per_teacher)

    def inputs(self, batch: Batch) -> Tensor:
        return batch[0]

    def units(self, batch: Batch) -> int:
        return len(batch[0])

    def _assigned(self, outputs: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Per location of the batch: ground-truth index into the flattened boxes (-1 background),
        and the flattened boxes and labels."""
        points = locations(*outputs.shape[-2:], device=outputs.device)
        indices, all_boxes, all_labels, offset = [], [], [], 0
        for boxes, labels in zip(batch[1], batch[2], strict=True):
            boxes, labels = unpadded(boxes, labels)
            index = assign(points, boxes)
            indices.append(torch.where(index >= 0, index + offset, index))
            all_boxes.append(boxes)
            all_labels.append(labels)
            offset += len(boxes)
        return torch.cat(indices), torch.cat(all_boxes), torch.cat(all_labels)

    def task_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        logits, box_values, ctr = split(outputs)
        logits, box_values, ctr = (
            logits.reshape(-1, self.num_classes),
            box_values.reshape(-1, 4),
            ctr.reshape(-1),
        )
        index, boxes, labels = self._assigned(outputs, batch)
        positive = index >= 0
        num_positive = max(int(positive.sum()), 1)
        target = torch.zeros_like(logits)
        target[positive, labels[index[positive]]] = 1.0
        loss = sigmoid_focal_loss(logits, target, reduction="sum") / num_positive
        if positive.any():
            grid = locations(*outputs.shape[-2:], device=outputs.device)
            points = grid.repeat(len(outputs), 1)[positive]
            gt = boxes[index[positive]]
            predicted = decode(box_values[positive], points)
            loss = loss + generalized_box_iou_loss(predicted, gt, reduction="mean")
            loss = loss + F.binary_cross_entropy_with_logits(ctr[positive], centerness(points, gt))
        return loss

    def kd_parts(
        self, student: nn.Module, teacher_outputs: TeacherOutputs, example: Batch
    ) -> nn.Module | None:
        """The feature term's adapters (and the hooks on `student` that feed it)."""
        return self.kd.parts(student, teacher_outputs, example, self.inputs(example))

    def kd_loss(self, outputs: Tensor, teacher_outputs: list[Any]) -> Tensor | list[Tensor]:
        return self.kd(outputs, teacher_outputs)

    @torch.no_grad()
    def batch_metrics(self, outputs: Tensor, batch: Batch) -> dict[str, float]:
        """train_acc: % of positive locations whose top class is their box's class."""
        logits = split(outputs)[0].reshape(-1, self.num_classes)
        index, _, labels = self._assigned(outputs, batch)
        positive = index >= 0
        if not positive.any():
            return {"train_acc": 0.0}
        hits = logits[positive].argmax(-1) == labels[index[positive]]
        return {"train_acc": hits.float().mean().item() * 100}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, loader: DataLoader, split: str = "test"
    ) -> dict[str, float]:
        """mAP@0.5 and mAP@0.5:0.95 (%) from torchmetrics' MeanAveragePrecision (COCO protocol,
        pycocotools backend)."""
        was_training = model.training
        model.eval()
        from torchmetrics.detection import MeanAveragePrecision  # slow import: see family.py

        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", sync_on_compute=False)
        for images, boxes, labels in loader:
            truth = [
                dict(zip(("boxes", "labels"), unpadded(*target), strict=True))
                for target in zip(boxes, labels, strict=True)
            ]
            found = detections(model(images.to(module_device(model))).cpu())
            metric.update(found, truth)
        model.train(was_training)
        result = metric.compute()
        return {"map50": result["map_50"].item() * 100, "map": result["map"].item() * 100}
