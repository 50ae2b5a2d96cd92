"""Quantized drop-in layers: the float layer's parameters plus an input and a weight quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatkd.quant.base import Quantizer


def _adopt(
    new: nn.Conv2d | nn.Linear,
    float_module: nn.Conv2d | nn.Linear,
    weight_quantizer: Quantizer,
    input_quantizer: Quantizer,
) -> None:
    """Take over the float module's own Parameter objects (same names, so FP32 state dicts load)."""
    new.weight = float_module.weight
    new.bias = float_module.bias
    new.weight_quantizer = weight_quantizer
    new.input_quantizer = input_quantizer
    new.train(float_module.training)


class QuantConv2d(nn.Conv2d):
    """Conv2d (grouped and depthwise included) on fake-quantized input and weight."""

    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, weight_quantizer: Quantizer, input_quantizer: Quantizer
    ) -> QuantConv2d:
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )  # fmt: skip
        _adopt(new, conv, weight_quantizer, input_quantizer)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(
            self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias
        )


class QuantLinear(nn.Linear):
    """Linear on fake-quantized input and weight."""

    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    @classmethod
    def from_float(
        cls, linear: nn.Linear, weight_quantizer: Quantizer, input_quantizer: Quantizer
    ) -> QuantLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        _adopt(new, linear, weight_quantizer, input_quantizer)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantAct(nn.Module):
    """Fake-quantizes a tensor that the deployed graph quantizes although no conv or matmul reads
    it directly (it replaces `qatkd.nn.QuantPoint`)."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: Tensor) -> Tensor:
        return self.quantizer(x)


class QuantGlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """Global average pooling of a fake-quantized input: the integer graph averages codes
    (QLinearGlobalAveragePool), so the tensor it reads is quantized once, like a conv's input."""

    input_quantizer: Quantizer

    def __init__(self, input_quantizer: Quantizer) -> None:
        super().__init__(1)
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.input_quantizer(x))


class QuantSiLU(nn.Module):
    """SiLU as x · sigmoid(x) on a fake-quantized x, with the sigmoid quantized too: onnxruntime
    has no integer SiLU, but it runs this as an integer sigmoid (a table of the 256 codes) and an
    integer multiplication, so that the conv before it is an integer kernel too."""

    gate = staticmethod(torch.sigmoid)
    """The gate that multiplies the input."""

    def __init__(self, input_quantizer: Quantizer, gate_quantizer: Quantizer) -> None:
        super().__init__()
        self.input_quantizer = input_quantizer
        self.gate_quantizer = gate_quantizer

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        return x * self.gate_quantizer(self.gate(x))


class QuantHardswish(QuantSiLU):
    """Hardswish as x · hardsigmoid(x), quantized as `QuantSiLU` is. onnxruntime has no integer
    Hardswish or Hardsigmoid, but hardsigmoid(x) = clamp(x + 3, 0, 6) / 6 quantized at scale s
    is x + 3 quantized at 6 s, its codes clipped at 1 / s: an integer add (the exporter writes
    it so), then an integer multiplication."""

    gate = staticmethod(F.hardsigmoid)
