"""Building blocks shared by the model definitions and the quantization pass."""

from __future__ import annotations

from torch import nn


class QuantPoint(nn.Identity):
    """Marks a tensor that the deployed integer graph quantizes although no conv or matmul reads it
    directly (the branches feeding a residual add). It is the identity in full precision;
    `qatkd.quant.prepare` replaces it with an activation fake-quantizer so that training simulates
    exactly the graph the exporter writes."""
