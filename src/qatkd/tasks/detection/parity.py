"""Detection parity: does the exported network give the fake-quantized PyTorch model's outputs and
detections? Compared on the raw dense outputs (largest difference) and after decoding and NMS
(images whose detections are the same, and mAP of both)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from qatkd.progress import progress
from qatkd.tasks.detection.boxes import detections
from qatkd.tasks.detection.data import unpadded

CONFIDENT_SCORE, BOX_TOLERANCE = 0.3, 0.5


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """The detections scoring at least CONFIDENT_SCORE pair up one to one: same label, box
    corners within BOX_TOLERANCE (order is free: near-equal scores may swap)."""
    keep_a, keep_b = a["scores"] >= CONFIDENT_SCORE, b["scores"] >= CONFIDENT_SCORE
    boxes_b, labels_b = b["boxes"][keep_b], b["labels"][keep_b]
    if int(keep_a.sum()) != len(labels_b):
        return False
    unused = torch.ones(len(labels_b), dtype=torch.bool)
    for box, label in zip(a["boxes"][keep_a], a["labels"][keep_a], strict=True):
        close = (boxes_b - box).abs().amax(-1) <= BOX_TOLERANCE
        match = torch.nonzero(unused & close & (labels_b == label))
        if len(match) == 0:
            return False
        unused[match[0, 0]] = False
    return True


@torch.no_grad()
def compare_detections(
    model: nn.Module,
    runner: Callable[[np.ndarray], np.ndarray],
    batches: Iterable[tuple[Tensor, ...]],
    desc: str = "parity",
    trained: nn.Module | None = None,
) -> dict[str, float | int]:
    """`agreement`: % of images with the same confident detections (score >= 0.3: the same
    labels, boxes within 0.5 px);
    mAP@0.5 / mAP@0.5:0.95 (%) of `model` (`_pytorch`), `runner` (`_export`) and, if given,
    `trained` (`_trained`); `max_output_diff` on the raw outputs."""
    models = {"pytorch": model.eval()} | (
        {"trained": trained.eval()} if trained is not None else {}
    )
    from torchmetrics.detection import MeanAveragePrecision  # slow import: see family.py

    metrics = {name: MeanAveragePrecision(sync_on_compute=False) for name in [*models, "export"]}
    agree = total = 0
    max_diff = 0.0
    for images, boxes, labels in progress(batches, desc=desc):
        truth = [
            dict(zip(("boxes", "labels"), unpadded(*t), strict=True))
            for t in zip(boxes, labels, strict=True)
        ]
        got = torch.from_numpy(runner(np.ascontiguousarray(images.numpy(), dtype=np.float32)))
        found = {"export": detections(got)}
        for name, m in models.items():
            outputs = m(images)
            found[name] = detections(outputs)
            if name == "pytorch":
                max_diff = max(max_diff, float((outputs - got).abs().max()))
        for name, dets in found.items():
            metrics[name].update(dets, truth)
        agree += sum(_same(a, b) for a, b in zip(found["pytorch"], found["export"], strict=True))
        total += len(images)
    result: dict[str, float | int] = {"samples": total, "agreement": 100.0 * agree / max(total, 1)}
    for name, metric in metrics.items():
        computed = metric.compute()
        result[f"map50_{name}"] = computed["map_50"].item() * 100
        result[f"map_{name}"] = computed["map"].item() * 100
    result["map50_diff"] = result["map50_export"] - result["map50_pytorch"]
    result["max_output_diff"] = max_diff
    return result
