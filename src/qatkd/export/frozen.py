"""The deployable integer description of a quantized model: integer weight codes plus scales.

`freeze` traces a quantized model (torch.fx) and replaces each `QuantConv2d` / `QuantLinear` by a
frozen layer that stores the trained integer weight codes and their scales (one per output
channel, or one per group of inputs for language models' Linear layers) instead of the float
weight. A model that fx cannot trace (a `transformers` LM) freezes layer by layer with
`FrozenLinear(layer, name)`; both are the one convert step of every exporter. Its output equals
the fake-quantized layer's bitwise (the quantizers promise `forward(w) == quantize_int(w) *
scale`), and it is what BatchNorm folding and the exporters read, so they never re-quantize a
weight and never invent a scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qatkd.errors import QatkdError
from qatkd.quant import QuantAct, QuantConv2d, Quantizer, QuantLinear
from qatkd.quant.quantizers import DynamicBlockQuantizer, FloatQuantizer
from qatkd.quant.tensors import trace

CODE_DTYPE = torch.int8
"""Weight codes are stored as int8: every bit-width up to 8 fits, and int8 is what kernels read
(the unsigned codes of an asymmetric grid as uint8)."""


@dataclass(frozen=True)
class ActRange:
    """An activation quantizer as the exported graph sees it: codes = clamp(round(x / scale),
    qmin, qmax), qmin <= 0 <= qmax, stored as uint8 at zero point -qmin (`zero_point`).
    `bits` < 8 means the 8-bit runtime type must also saturate at [qmin, qmax], which an 8-bit
    QuantizeLinear alone does not do."""

    scale: float
    qmin: int
    qmax: int
    bits: int

    @property
    def zero_point(self) -> int:
        """The uint8 zero point of the stored codes: 0 (unsigned), 2^(bits-1) (symmetric
        signed), z (a grid with a zero point)."""
        return -self.qmin


def tensor_hint(quantizer: nn.Module, default: str) -> str:
    """The name under which the graph quantizes the tensor `quantizer` reads (shared by all its
    readers, `qatkd.quant.tensors`), or `default` where `prepare` gave it none."""
    return getattr(quantizer, "tensor_hint", None) or default


def act_range(quantizer: Quantizer, where: str) -> ActRange | None:
    """The quantizer's range, or None for a float (16-bit) quantizer: that input stays float.
    An input quantized at run time (`dynamic`) has no range: only onnxruntime's int8 MatMulNBits
    kernels (the language genai export) compute it."""
    if isinstance(quantizer, FloatQuantizer):
        return None
    if isinstance(quantizer, DynamicBlockQuantizer):
        raise run_time_input_error(where)
    if quantizer.scale.numel() != 1:
        raise QatkdError(f"{where}: activation scales must be per tensor for export")
    qmin, qmax = quantizer.qrange
    if qmax - qmin > 255:
        raise _wider_than_8_bits(qmin, qmax, where)
    return ActRange(float(quantizer.scale), qmin, qmax, quantizer.bits)


def run_time_input_error(where: str) -> QatkdError:
    """For an exporter with fixed activation scales given an input quantized at run time."""
    return QatkdError(
        f"{where}: the input is quantized per row at run time (quant.act_method=dynamic), which "
        "only the genai export of a language model deploys (int8 MatMulNBits); this export has "
        "one fixed scale per tensor"
    )


def _check_int8(qmin: int, qmax: int, where: str) -> None:
    """Weight codes: int8, or uint8 for an asymmetric grid."""
    if qmin < -128 or qmax > 255 or (qmin < 0 and qmax > 127):
        raise _wider_than_8_bits(qmin, qmax, where)


def _wider_than_8_bits(qmin: int, qmax: int, where: str) -> QatkdError:
    return QatkdError(
        f"{where}: integer codes [{qmin}, {qmax}] do not fit 8 bits, so no int8 kernel can "
        "run them (DoReFa 8-bit weights need 9); use another method or fewer bits"
    )


class FrozenLayer(nn.Module):
    """Shared state of a frozen conv / linear: `codes` (int8), `scale` (float32: broadcastable per
    output channel, or `[out, groups]` with `group_size`, the last group possibly narrower),
    for an asymmetric grid uint8 codes and an `offset` per group (float32 `[out, groups]`,
    weight = codes * scale + offset), optional float `bias`, the trained input quantizer (kept as
    a module so the PyTorch forward fake-quantizes exactly as in training), and the weight's
    bit-width."""

    codes: Tensor
    scale: Tensor
    offset: Tensor | None
    bias: Tensor | None

    def __init__(self, layer: QuantConv2d | QuantLinear, where: str) -> None:
        super().__init__()
        wq = layer.weight_quantizer
        if isinstance(wq, FloatQuantizer):
            raise QatkdError(f"{where}: the weight is not quantized (16 bits); nothing to freeze")
        qmin, qmax = wq.qrange
        _check_int8(qmin, qmax, where)
        self.group_size = wq.group_size
        with torch.no_grad():
            codes = wq.quantize_int(layer.weight)
            if self.group_size is None:
                scale = wq.scale.expand(codes.shape[0], *([1] * (codes.dim() - 1))).clone()
            else:  # the quantizer's scale repeats each group's value over its inputs
                scale = wq.scale.expand_as(codes)[:, :: self.group_size].clone()
            offset = wq.offset[:, :: self.group_size].clone() if wq.asymmetric else None
        self.register_buffer("codes", codes.to(torch.uint8 if wq.asymmetric else CODE_DTYPE))
        self.register_buffer("scale", scale.float())
        self.register_buffer("offset", None if offset is None else offset.float())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.input_quantizer = layer.input_quantizer  # shared with the tensor's other readers
        self.weight_bits = wq.bits
        self.weight_qrange = (qmin, qmax)
        dynamic = isinstance(layer.input_quantizer, DynamicBlockQuantizer)
        self.input_block = layer.input_quantizer.block if dynamic else None
        """Where the input is quantized per row at run time: its block (`DynamicBlockQuantizer`)."""
        self.input_range = (
            None if dynamic else act_range(layer.input_quantizer, f"{where}.input_quantizer")
        )

    @property
    def weight(self) -> Tensor:
        """The fake-quantized float weight, `codes * scale` (as DequantizeLinear computes it),
        `+ offset` for an asymmetric grid."""
        if self.group_size is None:
            return self.codes.float() * self.scale
        columns = self.codes.shape[1]
        weight = self.codes.float() * self.scale.repeat_interleave(self.group_size, 1)[:, :columns]
        if self.offset is None:
            return weight
        return weight + self.offset.repeat_interleave(self.group_size, 1)[:, :columns]


class FrozenConv2d(FrozenLayer):
    def __init__(self, layer: QuantConv2d, where: str) -> None:
        super().__init__(layer, where)
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise QatkdError(f"{where}: only explicit zero padding can be exported")
        self.stride, self.padding = tuple(layer.stride), tuple(layer.padding)
        self.dilation, self.groups = tuple(layer.dilation), layer.groups

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            self.input_quantizer(x),
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class FrozenLinear(FrozenLayer):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight, self.bias)


def freeze(model: nn.Module) -> fx.GraphModule:
    """A traced copy of `model` whose quantized layers hold integer weight codes (module doc)."""
    gm = trace(model)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, QuantConv2d):
            _replace(gm, node.target, FrozenConv2d(module, node.target))
        elif isinstance(module, QuantLinear):
            _replace(gm, node.target, FrozenLinear(module, node.target))
    gm.recompile()
    return gm


def _replace(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    """Put `module` at `name`, keeping the QuantActs that the layer there holds for its
    boundaries (`quant.sites`: the graph reads them at their paths)."""
    for child_name, child in gm.get_submodule(name).named_children():
        if isinstance(child, QuantAct):
            module.add_module(child_name, child)
    gm.set_submodule(name, module)
