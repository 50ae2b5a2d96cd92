"""PTQ calibration: initialise every quantizer from a few hundred samples, without training."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from qatkd.errors import QatkdError
from qatkd.progress import progress as progress_bar
from qatkd.quant.base import Quantizer


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Tensor | tuple[Tensor, ...] | list[Tensor]],
    num_samples: int = 512,
    progress: bool = False,
) -> nn.Module:
    """Run `model` on `batches` (tensors, or (x, y, ...) tuples whose first item is the input) until
    `num_samples` inputs were seen. The model runs in eval mode (BatchNorm keeps its statistics)
    while its quantizers calibrate: each initialises on the first batch it sees, and min-max
    activation ranges follow their EMA. The model's train/eval mode is restored afterwards."""
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    if not quantizers:
        raise QatkdError("calibrate needs a quantized model; call qatkd.quant.prepare first")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.calibrating = True
    seen = 0
    try:
        with progress_bar(total=num_samples, desc="calibrate", disable=not progress) as bar:
            for batch in batches:
                x = batch[0] if isinstance(batch, tuple | list) else batch
                model(x.to(device))
                seen += len(x)
                bar.update(len(x))
                if seen >= num_samples:
                    break
    finally:
        for q in quantizers:
            q.calibrating = False
        model.train(was_training)
    if seen == 0:
        raise QatkdError("calibrate got no batches; pass a non-empty iterable of inputs")
    return model
