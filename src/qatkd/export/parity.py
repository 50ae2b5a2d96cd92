"""Parity: does the exported integer model predict what the fake-quantized PyTorch model predicts?

A disagreement is a bug, not noise: the graph quantizes at the trained points with the trained
scales. The one number the integer kernels round that training did not is the BN-folded bias
(int32 at input_scale * weight_scale), so rare flips at near-ties of the top two logits remain.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from qatkd.export.runtime import Runner


@torch.no_grad()
def compare(
    model: nn.Module,
    runner: Runner,
    batches: Iterable[tuple[Tensor, Tensor]],
    desc: str = "parity",
) -> dict[str, float | int]:
    """Top-1 agreement (%) between `model` (eval mode) and `runner` on labelled batches, the
    accuracy (%) of each, their difference (runner - model) and the largest logit difference."""
    model.eval()
    agree = correct_model = correct_runner = total = 0
    max_diff = 0.0
    for x, y in tqdm(batches, desc=desc, leave=False):
        expected = model(x).numpy()
        got = runner(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        labels = y.numpy()
        agree += int((expected.argmax(1) == got.argmax(1)).sum())
        correct_model += int((expected.argmax(1) == labels).sum())
        correct_runner += int((got.argmax(1) == labels).sum())
        total += len(labels)
        max_diff = max(max_diff, float(np.abs(expected - got).max()))
    pct = 100.0 / max(total, 1)
    return {
        "samples": total,
        "agreement": agree * pct,
        "accuracy_pytorch": correct_model * pct,
        "accuracy_export": correct_runner * pct,
        "accuracy_diff": (correct_runner - correct_model) * pct,
        "max_logit_diff": max_diff,
    }
