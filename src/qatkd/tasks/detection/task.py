"""The detection task family: FCOS-style losses, dense-output KD, mAP (torchmetrics, COCO).

L_TS (the detector's own loss, averaged over the positive locations): sigmoid focal loss on the
class logits of every location, GIoU loss on the decoded boxes and BCE on the centerness of the
positives. L_KD: binary KL between the softened class probabilities of student and teachers at
every location (sigmoid(z / τ)), plus a GIoU loss towards the teachers' boxes at the locations where
the teachers are confident (top class probability > 0.5), weighted by that confidence. Several
teachers: the mean of their class probabilities, and boxes averaged with their confidences as
weights; with `per_teacher` one KD term per teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from qatkd.device import module_device
from qatkd.distill import KDConfig
from qatkd.errors import QatkdError
from qatkd.tasks.detection.boxes import assign, centerness, decode, detections, locations, split
from qatkd.tasks.detection.data import unpadded

Batch = tuple[Tensor, ...]
"""(images, boxes [B, MAX_OBJECTS, 4], labels [B, MAX_OBJECTS] with -1 padding)."""
CONFIDENT = 0.5


def binary_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """Σ over classes of KL(Bernoulli(p_T) || Bernoulli(sigmoid(z_S / τ))), mean over locations,
    times τ²; zero when the student's softened probabilities equal the teacher's."""
    eps = 1e-6
    p = teacher_probs.clamp(eps, 1 - eps)
    z = student_logits / temperature
    log_q, log_not_q = F.logsigmoid(z), F.logsigmoid(-z)
    kl = p * (p.log() - log_q) + (1 - p) * ((1 - p).log() - log_not_q)
    return kl.sum(-1).mean() * temperature**2


class DetectionKD:
    """The KD loss of the module doc, for one (combined) or every (`per_teacher`) teacher."""

    def __init__(self, temperature: float, per_teacher: bool = False) -> None:
        self.temperature = temperature
        self.per_teacher = per_teacher

    def _targets(self, teacher_outputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Softened class probabilities, decoded boxes and confidence of one teacher."""
        logits, box_values, _ = split(teacher_outputs.float())
        points = locations(*teacher_outputs.shape[-2:], device=teacher_outputs.device)
        confidence = logits.sigmoid().amax(-1)
        return (logits / self.temperature).sigmoid(), decode(box_values, points), confidence

    def _distance(
        self, outputs: Tensor, probs: Tensor, boxes: Tensor, confidence: Tensor
    ) -> Tensor:
        logits, box_values, _ = split(outputs)
        class_term = binary_kl(logits, probs, self.temperature)
        weight = torch.where(confidence > CONFIDENT, confidence, torch.zeros_like(confidence))
        if weight.sum() == 0:
            return class_term
        student_boxes = decode(box_values, locations(*outputs.shape[-2:], device=outputs.device))
        giou = generalized_box_iou_loss(student_boxes.reshape(-1, 4), boxes.reshape(-1, 4))
        return class_term + (giou * weight.reshape(-1)).sum() / weight.sum()

    def __call__(self, outputs: Tensor, teacher_outputs: list[Tensor]) -> Tensor | list[Tensor]:
        targets = [self._targets(t) for t in teacher_outputs]
        if self.per_teacher:
            return [self._distance(outputs, *t) for t in targets]
        probs = torch.stack([t[0] for t in targets]).mean(0)
        confidences = torch.stack([t[2] for t in targets])
        weights = confidences / confidences.sum(0).clamp_min(1e-6)
        boxes = (torch.stack([t[1] for t in targets]) * weights[..., None]).sum(0)
        return self._distance(outputs, probs, boxes, confidences.mean(0))


class DetectionTask:
    main_metric = "map50"
    maximize = True
    eval_batch_size = 64
    unit = "img"

    def __init__(
        self, num_classes: int, kd: KDConfig | None = None, per_teacher: bool = False
    ) -> None:
        kd = kd or KDConfig(temperature=1.0)
        if kd.loss != "kl":
            raise QatkdError(
                f"kd.loss={kd.loss}: detection distills class scores with binary KL (kd.loss=kl) "
                "and boxes with GIoU"
            )
        self.num_classes = num_classes
        self.kd = DetectionKD(kd.temperature, per_teacher)

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

    def kd_loss(self, outputs: Tensor, teacher_outputs: list[Tensor]) -> Tensor | list[Tensor]:
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
