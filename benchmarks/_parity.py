"""Yardsticks for a runtime's top-1 agreement with the PyTorch model it was exported from: a
few percent of changed predictions mean a wrong export in a model with wide margins, and
nothing in one whose predictions are near ties. Two measures tell them apart: how often the
model's own prediction moves when its input moves by a quarter of a grey level (a change the
size of one rounding step), and how far the graph's logits are from the model's, relative to
their spread (a wrong export moves every logit; a tie flip moves a few)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NOISE = 1e-3
"""The input noise (std, pixels in [0, 1]: a quarter of a grey level)."""


def with_noise(x: Tensor, generator: torch.Generator) -> Tensor:
    """`x` (pixels in [0, 1]) plus Gaussian noise of std `NOISE`, kept in [0, 1]."""
    return (x + NOISE * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def logit_deviation(got: np.ndarray, reference: np.ndarray) -> float:
    """Mean |got - reference| over every logit, in % of the reference logits' std."""
    return 100 * float(np.abs(got - reference).mean() / reference.std())
