"""The ONNX op handlers: one small function per kind of module or function node, registered with
`module_op` / `function_op` (`qatkd.export.onnx_graph`). Each emits its ONNX node(s) through the
builder and returns the name of its output tensor, or raises `Fallback` (before emitting anything)
for a form it does not write: torch.onnx then exports that node in float (`onnx_fallback`)."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from qatkd.export.frozen import FrozenConv2d, FrozenLinear, act_range
from qatkd.export.onnx_graph import Fallback, GraphBuilder, function_op, module_op, tensor_hint
from qatkd.nn import QuantPoint
from qatkd.quant import QuantAct, QuantGlobalAvgPool2d

BINARY = {
    operator.add: "Add",
    torch.add: "Add",
    operator.sub: "Sub",
    torch.sub: "Sub",
    operator.mul: "Mul",
    torch.mul: "Mul",
    operator.truediv: "Div",
    torch.div: "Div",
}


def _pair(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, tuple | list) else [int(value)] * 2


# -- modules -------------------------------------------------------------------------------------


@module_op(nn.Identity, nn.Dropout, QuantPoint, subclasses=True)
def pass_through(b: GraphBuilder, m: nn.Module, x: str, hint: str) -> str:
    return x


@module_op(FrozenConv2d, subclasses=True)
@module_op(nn.Conv2d)
def conv(b: GraphBuilder, m: FrozenConv2d | nn.Conv2d, x: str, hint: str) -> str:
    if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        raise Fallback
    weight_shape = m.codes.shape if isinstance(m, FrozenConv2d) else m.weight.shape
    pads = _pair(m.padding)
    return b.emit(
        "Conv",
        b.layer_inputs(m, x, hint),
        hint,
        kernel_shape=list(weight_shape[2:]),
        strides=_pair(m.stride),
        pads=pads + pads,
        dilations=_pair(m.dilation),
        group=m.groups,
    )


@module_op(FrozenLinear, subclasses=True)
@module_op(nn.Linear)
def linear(b: GraphBuilder, m: FrozenLinear | nn.Linear, x: str, hint: str) -> str:
    if b.rank(x) == 2:
        return b.emit("Gemm", b.layer_inputs(m, x, hint), hint, transB=1)
    # tokens [N, L, C] or channels last [N, H, W, C]: MatMul (DQ -> MatMul -> Q fuses), + bias
    x, weight, *bias = b.layer_inputs(m, x, hint, matmul=True)
    y = b.emit("MatMul", [x, weight], hint)
    return b.emit("Add", [y, *bias], f"{hint}.bias_add") if bias else y


@module_op(QuantAct, subclasses=True)
def quant_act(b: GraphBuilder, m: QuantAct, x: str, hint: str) -> str:
    r = act_range(m.quantizer, hint)
    if not b.quantized or r is None:
        return x
    return b.qdq(x, r, tensor_hint(m.quantizer, hint))[0]


@module_op(nn.ReLU)
def relu(b: GraphBuilder, m: nn.ReLU, x: str, hint: str) -> str:
    return b.emit_commuting("Relu", [x], hint, low=0.0)


@module_op(nn.ReLU6, nn.Hardtanh)
def clamp(b: GraphBuilder, m: nn.Hardtanh, x: str, hint: str) -> str:
    low, high = float(m.min_val), float(m.max_val)
    bounds = [b.const(np.array(v, dtype=np.float32), f"{hint}.bound") for v in (low, high)]
    return b.emit_commuting("Clip", [x, *bounds], hint, low=low, high=high)


@module_op(nn.BatchNorm2d)
def batch_norm(b: GraphBuilder, m: nn.BatchNorm2d, x: str, hint: str) -> str:
    if not m.affine:
        raise Fallback
    stats = [m.weight, m.bias, m.running_mean, m.running_var]
    names = [b.const(t.detach().numpy(), f"{hint}.{i}") for i, t in enumerate(stats)]
    return b.emit("BatchNormalization", [x, *names], hint, epsilon=m.eps)


@module_op(nn.MaxPool2d)
def max_pool(b: GraphBuilder, m: nn.MaxPool2d, x: str, hint: str) -> str:
    k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
    return b.emit_commuting(
        "MaxPool",
        [x],
        hint,
        kernel_shape=k,
        strides=s,
        pads=p + p,
        dilations=d,
        ceil_mode=int(m.ceil_mode),
    )


@module_op(nn.AvgPool2d)
def average_pool(b: GraphBuilder, m: nn.AvgPool2d, x: str, hint: str) -> str:
    if m.divisor_override is not None:
        raise Fallback
    k, s, p = (_pair(v) for v in (m.kernel_size, m.stride, m.padding))
    return b.emit(
        "AveragePool",
        [x],
        hint,
        kernel_shape=k,
        strides=s,
        pads=p + p,
        ceil_mode=int(m.ceil_mode),
        count_include_pad=int(m.count_include_pad),
    )


@module_op(nn.AdaptiveAvgPool2d)
def global_average_pool(b: GraphBuilder, m: nn.AdaptiveAvgPool2d, x: str, hint: str) -> str:
    if _pair(m.output_size) != [1, 1]:
        raise Fallback
    return b.emit("GlobalAveragePool", [x], hint)


@module_op(QuantGlobalAvgPool2d)
def quant_global_average_pool(b: GraphBuilder, m: QuantGlobalAvgPool2d, x: str, hint: str) -> str:
    r = act_range(m.input_quantizer, f"{hint}.input_quantizer")
    if b.quantized and r is not None:
        x = b.qdq(x, r, tensor_hint(m.input_quantizer, f"{hint}.input"))[0]
    return b.emit("GlobalAveragePool", [x], hint)


@module_op(nn.Flatten)
def flatten_module(b: GraphBuilder, m: nn.Flatten, x: str, hint: str) -> str:
    if m.end_dim != -1:
        raise Fallback
    return b.emit_commuting("Flatten", [x], hint, axis=m.start_dim)


# -- functions and methods -----------------------------------------------------------------------


@function_op(*BINARY)
def binary(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    if len(node.args) != 2 or node.kwargs:  # torch.add(x, y, alpha=2), ...
        raise Fallback
    x, y = (b.operand(arg, f"{hint}.operand") for arg in node.args)
    return b.emit(BINARY[node.target], [x, y], hint)


@function_op(torch.relu, F.relu, "relu")
def relu_call(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    return b.emit_commuting("Relu", [b.names[node.args[0]]], hint, low=0.0)


@function_op(torch.flatten, "flatten")
def flatten_call(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    args = node.args
    start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
    if end != -1:
        raise Fallback
    return b.emit_commuting("Flatten", [b.names[args[0]]], hint, axis=start)
