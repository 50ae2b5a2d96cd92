"""From dense detector outputs to boxes and back: locations, target assignment, decoding, NMS.

The box math itself (IoU, GIoU, NMS) is torchvision.ops'.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from qatkd.tasks.detection.models import EXTRA, STRIDE

CENTER_RADIUS = 1.5
"""A location is a positive for a box when it lies inside the box and within this many strides
of the box centre (FCOS's centre sampling)."""
MAX_LOG_DISTANCE = 6.0
SCORE_THRESHOLD, NMS_IOU, MAX_DETECTIONS = 0.05, 0.6, 50


def locations(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Pixel coordinates (x, y) of each output cell's centre, row-major: [H * W, 2]."""
    rows, columns = torch.arange(height, device=device), torch.arange(width, device=device)
    ys, xs = torch.meshgrid(rows, columns, indexing="ij")
    return torch.stack([xs, ys], -1).reshape(-1, 2).float().add(0.5).mul(STRIDE)


def split(outputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B, K + 5, H, W] -> class logits [B, HW, K], box values [B, HW, 4], centerness [B, HW]."""
    flat = outputs.flatten(2).transpose(1, 2)
    k = outputs.shape[1] - EXTRA
    return flat[..., :k], flat[..., k : k + 4], flat[..., k + 4]


def decode(box_values: Tensor, points: Tensor) -> Tensor:
    """Boxes (x1, y1, x2, y2) from the distances exp(v) * stride to the four sides."""
    distances = box_values.clamp(max=MAX_LOG_DISTANCE).exp() * STRIDE
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def assign(points: Tensor, boxes: Tensor) -> Tensor:
    """For each location the index of its ground-truth box, -1 for background: the smallest box
    that contains it within CENTER_RADIUS strides of its centre."""
    if len(boxes) == 0:
        return torch.full((len(points),), -1, dtype=torch.long, device=points.device)
    x, y = points[:, 0:1], points[:, 1:2]
    inside = (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    radius = CENTER_RADIUS * STRIDE
    near = ((x - cx).abs() < radius) & ((y - cy).abs() < radius)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).expand(len(points), -1)
    area = torch.where(inside & near, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(dim=1)
    return torch.where(torch.isinf(best_area), torch.full_like(best, -1), best)


def centerness(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness of each point in its box: sqrt(min(l, r)/max(l, r) * min(t, b)/max(t, b))."""
    left, top = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    right, bottom = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    lr = left.minimum(right) / left.maximum(right).clamp_min(1e-6)
    tb = top.minimum(bottom) / top.maximum(bottom).clamp_min(1e-6)
    return (lr.clamp_min(0) * tb.clamp_min(0)).sqrt()


@torch.no_grad()
def detections(outputs: Tensor) -> list[dict[str, Tensor]]:
    """Per image: boxes, scores (sqrt(class prob * centerness)) and labels after class-wise NMS,
    in torchmetrics' format."""
    logits, box_values, ctr = split(outputs.float())
    points = locations(*outputs.shape[-2:], device=outputs.device)
    results = []
    for cls_logits, values, c in zip(logits, box_values, ctr, strict=True):
        scores = (cls_logits.sigmoid() * c.sigmoid()[:, None]).sqrt()
        location, label = torch.nonzero(scores > SCORE_THRESHOLD, as_tuple=True)
        score = scores[location, label]
        boxes = decode(values[location], points[location])
        keep = batched_nms(boxes, score, label, NMS_IOU)[:MAX_DETECTIONS]
        results.append({"boxes": boxes[keep], "scores": score[keep], "labels": label[keep]})
    return results
