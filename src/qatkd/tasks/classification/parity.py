"""Classification parity: does the exported integer model predict what the fake-quantized PyTorch
model predicts?

A disagreement is a bug, not noise: the graph quantizes at the trained points with the trained
scales, and the reference model has its biases on the kernels' int32 grid (`bias_grid`), so the
two compute the same numbers up to float rounding. The trained model before that alignment can be
passed as `trained`: its accuracy and agreement show what the alignment itself changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from qatkd.progress import progress


@torch.no_grad()
def compare(
    model: nn.Module,
    runner: Callable[[np.ndarray], np.ndarray],
    batches: Iterable[tuple[Tensor, Tensor]],
    desc: str = "parity",
    trained: nn.Module | None = None,
) -> dict[str, float | int]:
    """Top-1 agreement (%) between `model` (eval mode) and `runner` on labelled batches, the
    accuracy (%) of each, their difference (runner - model) and the largest logit difference;
    with `trained`, also its accuracy and its agreement with `runner`."""
    models = {"pytorch": model.eval()} | (
        {"trained": trained.eval()} if trained is not None else {}
    )
    agree = dict.fromkeys(models, 0)
    correct = dict.fromkeys([*models, "export"], 0)
    total = 0
    max_diff = 0.0
    for x, y in progress(batches, desc=desc):
        got = runner(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        labels = y.numpy()
        correct["export"] += int((got.argmax(1) == labels).sum())
        for name, m in models.items():
            expected = m(x).numpy()
            agree[name] += int((expected.argmax(1) == got.argmax(1)).sum())
            correct[name] += int((expected.argmax(1) == labels).sum())
            if name == "pytorch":
                max_diff = max(max_diff, float(np.abs(expected - got).max()))
        total += len(labels)
    pct = 100.0 / max(total, 1)
    result: dict[str, float | int] = {
        "samples": total,
        "agreement": agree["pytorch"] * pct,
        "accuracy_pytorch": correct["pytorch"] * pct,
        "accuracy_export": correct["export"] * pct,
        "accuracy_diff": (correct["export"] - correct["pytorch"]) * pct,
        "max_logit_diff": max_diff,
    }
    if trained is not None:
        result["agreement_trained"] = agree["trained"] * pct
        result["accuracy_trained"] = correct["trained"] * pct
    return result
