"""The ONNX op handlers: one small function per kind of module or function node, registered with
`module_op` / `function_op` (`qatkd.export.onnx_registry`). Each emits its ONNX node(s) through the
builder and returns the name of its output tensor, or raises `Fallback` (before emitting anything)
for a form it does not write: torch.onnx then exports that node in float (`onnx_fallback`).

The ops that only move, reshape or cut values (transpose, reshape, flatten, a chunk, max
pooling, and a concatenation of tensors quantized at one scale) run on the codes where their
input is quantized (`GraphBuilder.emit_moving`), so that the integer graph does not leave the
integers for them."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from qatkd.errors import QatkdError
from qatkd.export.frozen import FrozenConv2d, FrozenLinear, act_range, tensor_hint
from qatkd.export.onnx_graph import CONTRIB_DOMAIN, GraphBuilder
from qatkd.export.onnx_registry import Fallback, function_op, module_op
from qatkd.nn import QuantPoint
from qatkd.quant import QuantAct, QuantGlobalAvgPool2d, QuantHardswish, QuantSiLU
from qatkd.quant.tensors import SPLITS, calls, global_pool_call

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


def pass_through(b: GraphBuilder, m: nn.Module, x: str, hint: str) -> str:
    return x


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


def linear(b: GraphBuilder, m: FrozenLinear | nn.Linear, x: str, hint: str) -> str:
    if b.rank(x) == 2:
        return b.emit("Gemm", b.layer_inputs(m, x, hint), hint, transB=1)
    # tokens [N, L, C] or channels last [N, H, W, C]: MatMul (DQ -> MatMul -> Q fuses), + bias
    x, weight, *bias = b.layer_inputs(m, x, hint, matmul=True)
    y = b.emit("MatMul", [x, weight], hint)
    return b.emit("Add", [y, *bias], f"{hint}.bias_add") if bias else y


def quant_act(b: GraphBuilder, m: QuantAct, x: str, hint: str) -> str:
    r = act_range(m.quantizer, hint)
    if not b.quantized or r is None:
        return x
    return b.qdq(x, r, tensor_hint(m.quantizer, hint))[0]


def relu(b: GraphBuilder, m: nn.ReLU, x: str, hint: str) -> str:
    return b.emit_commuting("Relu", [x], hint, low=0.0)


def clamp(b: GraphBuilder, m: nn.Hardtanh, x: str, hint: str) -> str:
    low, high = float(m.min_val), float(m.max_val)
    bounds = [b.const(np.array(v, dtype=np.float32), f"{hint}.bound") for v in (low, high)]
    return b.emit_commuting("Clip", [x, *bounds], hint, low=low, high=high)


def batch_norm(b: GraphBuilder, m: nn.BatchNorm2d, x: str, hint: str) -> str:
    if not m.affine:
        raise Fallback
    stats = [m.weight, m.bias, m.running_mean, m.running_var]
    names = [b.const(t.detach().numpy(), f"{hint}.{i}") for i, t in enumerate(stats)]
    return b.emit("BatchNormalization", [x, *names], hint, epsilon=m.eps)


def quant_gated(b: GraphBuilder, m: QuantSiLU, x: str, hint: str) -> str:
    """x · gate(x), the gate's output quantized: QLinearSigmoid (SiLU) or QLinearAdd
    (Hardswish: `GraphBuilder.emit_hardsigmoid`), and QLinearMul."""
    r = act_range(m.input_quantizer, f"{hint}.input_quantizer")
    if b.quantized and r is not None:
        x = b.qdq(x, r, tensor_hint(m.input_quantizer, f"{hint}.input"))[0]
    if isinstance(m, QuantHardswish):
        gate = b.emit_hardsigmoid(x, f"{hint}.hardsigmoid")
    else:
        gate = b.emit("Sigmoid", [x], f"{hint}.sigmoid")
    g = act_range(m.gate_quantizer, f"{hint}.gate_quantizer")
    if b.quantized and g is not None:
        gate = b.qdq(gate, g, tensor_hint(m.gate_quantizer, f"{hint}.gate"))[0]
    return b.emit("Mul", [x, gate], hint)


def max_pool(b: GraphBuilder, m: nn.MaxPool2d, x: str, hint: str) -> str:
    k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
    return b.emit_moving(
        "MaxPool",
        [x],
        hint,
        kernel_shape=k,
        strides=s,
        pads=p + p,
        dilations=d,
        ceil_mode=int(m.ceil_mode),
    )


def average_pool(b: GraphBuilder, m: nn.AvgPool2d, x: str, hint: str) -> str:
    """A `divisor_override` d (which torch.onnx drops without a word, dividing by the window's
    area) is the average over the whole window, padding counted, times area / d; with
    `ceil_mode` the last windows overhang the input and have no such form."""
    k, s, p = (_pair(v) for v in (m.kernel_size, m.stride, m.padding))
    divisor = m.divisor_override
    if divisor is not None and m.ceil_mode:
        raise QatkdError(
            f"{hint}: an AvgPool2d with divisor_override and ceil_mode has no ONNX form"
        )
    average = b.emit(
        "AveragePool",
        [x],
        f"{hint}.average" if divisor else hint,
        kernel_shape=k,
        strides=s,
        pads=p + p,
        ceil_mode=int(m.ceil_mode),
        count_include_pad=int(m.count_include_pad or divisor is not None),
    )
    if divisor is None:
        return average
    factor = b.const(np.array(k[0] * k[1] / divisor, dtype=np.float32), f"{hint}.factor")
    return b.emit("Mul", [average, factor], hint)


def global_average_pool(b: GraphBuilder, m: nn.AdaptiveAvgPool2d, x: str, hint: str) -> str:
    if _pair(m.output_size) != [1, 1]:
        raise Fallback
    return b.emit("GlobalAveragePool", [x], hint)


def quant_global_average_pool(b: GraphBuilder, m: QuantGlobalAvgPool2d, x: str, hint: str) -> str:
    r = act_range(m.input_quantizer, f"{hint}.input_quantizer")
    if b.quantized and r is not None:
        x = b.qdq(x, r, tensor_hint(m.input_quantizer, f"{hint}.input"))[0]
    return b.emit("GlobalAveragePool", [x], hint)


def _flatten(b: GraphBuilder, x: str, start: int, end: int, hint: str) -> str:
    """ONNX's Flatten always makes a matrix, [d0 ... d(axis-1)] x [the rest]: it is torch's
    flatten only from dim 1 to the last (the batch kept, the rest in one); any other span is
    torch.onnx's Reshape."""
    rank = b.rank(x)
    if start % rank != 1 or end % rank != rank - 1:
        raise Fallback
    return b.emit_moving("Flatten", [x], hint, axis=1)


def flatten_module(b: GraphBuilder, m: nn.Flatten, x: str, hint: str) -> str:
    return _flatten(b, x, m.start_dim, m.end_dim, hint)


# -- functions and methods -----------------------------------------------------------------------


def binary(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    if len(node.args) != 2 or node.kwargs:  # torch.add(x, y, alpha=2), ...
        raise Fallback
    if BINARY[node.target] == "Mul" and (scaled := _scaled_dequantize(b, node, hint)):
        return scaled
    x, y = (b.operand(arg, f"{hint}.operand") for arg in node.args)
    return b.emit(BINARY[node.target], [x, y], hint)


def _scaled_dequantize(b: GraphBuilder, node: fx.Node, hint: str) -> str | None:
    """A tensor dequantized from codes at one scale, times a parameter that varies along at most
    one of its axes (ConvNeXt's layer scale, [C, 1, 1]): one DequantizeLinear of the same codes
    whose scale is the parameter times the codes' scale, per channel of that axis. The same
    values to float rounding, and no float Mul between a DequantizeLinear and the next
    QuantizeLinear, which OpenVINO folds into its FakeQuantize wrongly where the factor is
    negative (a small ConvNeXt's int8 graph there agreed with its fake-quantized model on 56 %
    of the images). None where the node is not of that form, or a factor is 0 (no step)."""
    tensor, factor = node.args
    if isinstance(tensor, fx.Node) and tensor.op == "get_attr":
        tensor, factor = factor, tensor
    if not (isinstance(factor, fx.Node) and factor.op == "get_attr"):
        return None
    source = b.dequantized.get(b.names[tensor]) if isinstance(tensor, fx.Node) else None
    if source is None:
        return None
    values, shape = b.examples.values[factor], b.examples.values[tensor].shape
    if values.dim() > len(shape):
        return None
    padded = (1,) * (len(shape) - values.dim()) + tuple(values.shape)
    axes = [d for d, n in enumerate(padded) if n != 1]
    if len(axes) > 1 or any(padded[d] != shape[d] for d in axes) or (values == 0).any():
        return None  # varies along two axes, widens the tensor, or has no step somewhere
    scale = source.r.scale * values.detach().double().flatten().numpy()
    zero = np.full(scale.shape, b._zero_point(source.r))
    per_axis = {"axis": axes[0]} if axes else {}
    inputs = [
        source.codes,
        b.const(scale.astype(np.float32).reshape(scale.shape if axes else ()), f"{hint}.scale"),
        b.const(zero.reshape(zero.shape if axes else ()), f"{hint}.zero_point"),
    ]
    return b.emit("DequantizeLinear", inputs, f"{hint}.dq", **per_axis)


def gelu(b: GraphBuilder, m: nn.GELU, x: str, hint: str) -> str:
    return _gelu(b, m.approximate, x, hint)


def gelu_call(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
    return _gelu(b, approximate, b.names[node.args[0]], hint)


def _gelu(b: GraphBuilder, approximate: Any, x: str, hint: str) -> str:
    """The exact GELU as onnxruntime's fused float `Gelu` (`onnx_export` module doc); the tanh
    approximation as torch.onnx writes it."""
    if approximate != "none":
        raise Fallback
    return b.emit("Gelu", [x], hint, domain=CONTRIB_DOMAIN)


def hardsigmoid(b: GraphBuilder, m: nn.Hardsigmoid, x: str, hint: str) -> str:
    return b.emit_hardsigmoid(x, hint)


def hardsigmoid_call(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    return b.emit_hardsigmoid(b.names[node.args[0]], hint)


def relu_call(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    return b.emit_commuting("Relu", [b.names[node.args[0]]], hint, low=0.0)


def flatten_call(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    args = node.args
    start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
    return _flatten(b, b.names[args[0]], start, end, hint)


def identity_call(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    """Stochastic depth is the identity in eval; `contiguous` is one to ONNX."""
    return b.names[node.args[0]]


def transpose(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    x = b.names[node.args[0]]
    rank = b.examples.values[node.args[0]].dim()
    dims = node.args[1:]
    if node.kwargs or not all(isinstance(d, int) for d in _flat(dims)):
        raise Fallback
    if node.target in (torch.transpose, "transpose"):
        perm = list(range(rank))
        i, j = (d % rank for d in dims)
        perm[i], perm[j] = perm[j], perm[i]
    else:
        perm = [d % rank for d in _flat(dims)]
    return b.emit_moving("Transpose", [x], hint, perm=perm)


def _flat(dims: Any) -> list[Any]:
    """`x.permute(0, 2, 1)` and `x.permute((0, 2, 1))` alike."""
    return list(dims[0]) if len(dims) == 1 and isinstance(dims[0], tuple | list) else list(dims)


def _batch_first(b: GraphBuilder, node: fx.Node) -> bool:
    """A reshape that keeps the batch as its first dim, in and out, and merges it with no other
    (its other sizes, read from the example run, are then constants)."""
    source = node.args[0]
    return (
        isinstance(source, fx.Node)
        and b.examples.is_tensor(source)
        and b.examples.batch_dims[source] == b.examples.batch_dims[node] == [0]
        and b.examples.values[source].shape[0] == b.examples.values[node].shape[0]
    )


def reshape(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    """The shape of the example run, with 0 (the input's own size) for the batch."""
    shape = [0, *b.examples.values[node].shape[1:]]
    target = b.const(np.array(shape, dtype=np.int64), f"{hint}.shape")
    return b.emit_moving("Reshape", [b.names[node.args[0]], target], hint)


def _split_part(b: GraphBuilder, node: fx.Node) -> bool:
    """An item of `x.chunk(...)` / `x.split(...)` along a dim other than the batch's."""
    parts = node.args[0]
    return (
        isinstance(parts, fx.Node)
        and calls(parts, SPLITS)
        and b.examples.is_tensor(parts.args[0])
        and _split_dim(b, parts) not in b.examples.batch_dims[parts.args[0]]
    )


def _split_dim(b: GraphBuilder, parts: fx.Node) -> int:
    dim = parts.args[2] if len(parts.args) > 2 else parts.kwargs.get("dim", 0)
    return dim % b.examples.values[parts.args[0]].dim()


def split_part(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    """One part of a chunk or split: a Slice of its input."""
    parts, index = node.args
    dim = _split_dim(b, parts)
    sizes = [t.shape[dim] for t in b.examples.values[parts]]
    index %= len(sizes)
    start = sum(sizes[:index])
    bounds = [
        b.const(np.array([v], dtype=np.int64), f"{hint}.{what}")
        for what, v in (("start", start), ("end", start + sizes[index]), ("axis", dim))
    ]
    return b.emit_moving("Slice", [b.names[parts.args[0]], *bounds], hint)


def concat(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    """On the codes where every input is quantized at one scale (`quant.tensors` gives a
    concatenation's inputs one quantizer), else in float (onnxruntime's QLinearConcat where
    its inputs are quantized at other scales). The builder hands it only a node whose inputs
    are all tensors: a list of them, and an int dim (a computed dim is a node, no tensor)."""
    items = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    inputs = [b.names[n] for n in items]
    axis = dim % b.examples.values[node].dim()
    sources = [b.dequantized.get(x) for x in inputs]
    first = sources[0]
    if first is None or any(s is None or s.r != first.r for s in sources):
        return b.emit("Concat", inputs, hint, axis=axis)
    codes = b.emit("Concat", [s.codes for s in sources], f"{hint}.codes", axis=axis)
    return b.dequantize(codes, first.r, hint)


def _global_mean(b: GraphBuilder, node: fx.Node) -> bool:
    """Global average pooling (`quant.tensors.global_pool_call`) of a 4-D tensor (a mean's or a
    pooling's input is a tensor node)."""
    return b.examples.values[node.args[0]].dim() == 4 and global_pool_call(node)


def global_mean(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    """GlobalAveragePool (QLinearGlobalAveragePool where its input and output are quantized),
    then a Flatten where the mean drops the two dims."""
    pooled = b.emit("GlobalAveragePool", [b.names[node.args[0]]], hint)
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim")
    if node.target is F.adaptive_avg_pool2d or keep:
        return pooled
    return b.emit_moving("Flatten", [pooled], f"{hint}.flatten", axis=1)


def matmul(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    """QLinearMatMul where both operands and the product are quantized (attention); a call with
    no keywords has its two operands by position."""
    if node.kwargs:
        raise Fallback
    return b.emit("MatMul", [b.names[a] for a in node.args], hint)


def softmax(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    """QLinearSoftmax where its input and output are quantized (attention's probabilities)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    options = {k: v for k, v in node.kwargs.items() if k not in ("dim", "_stacklevel")}
    if not isinstance(dim, int) or len(node.args) > 2 or options not in ({}, {"dtype": None}):
        raise Fallback  # another dtype
    return b.emit("Softmax", [b.names[node.args[0]]], hint, axis=dim)


def dropout_call(b: GraphBuilder, node: fx.Node, hint: str) -> str:
    """The identity in eval (`training=False`). `F.dropout` hands its options to the trace by
    keyword however it is called (its `handle_torch_function` call)."""
    if node.kwargs["training"]:
        raise Fallback
    return b.names[node.args[0]]


# -- the registry ----------------------------------------------------------------------------------
# Registered here rather than by decorators: mutmut (`make mutate`) does not mutate decorated
# functions, and the handlers are what the export's mutation score is for.

module_op(nn.Identity, nn.Dropout, QuantPoint, subclasses=True)(pass_through)
module_op(nn.Conv2d)(conv)
module_op(FrozenConv2d, subclasses=True)(conv)
module_op(nn.Linear)(linear)
module_op(FrozenLinear, subclasses=True)(linear)
module_op(QuantAct, subclasses=True)(quant_act)
module_op(nn.ReLU)(relu)
module_op(nn.ReLU6, nn.Hardtanh)(clamp)
module_op(nn.BatchNorm2d)(batch_norm)
module_op(QuantSiLU, QuantHardswish)(quant_gated)
module_op(nn.Hardsigmoid)(hardsigmoid)
module_op(nn.GELU)(gelu)
module_op(nn.MaxPool2d)(max_pool)
module_op(nn.AvgPool2d)(average_pool)
module_op(nn.AdaptiveAvgPool2d)(global_average_pool)
module_op(QuantGlobalAvgPool2d)(quant_global_average_pool)
module_op(nn.Flatten)(flatten_module)
function_op(*BINARY)(binary)
function_op(torch.relu, F.relu, "relu")(relu_call)
function_op(F.hardsigmoid)(hardsigmoid_call)
function_op(F.gelu)(gelu_call)
function_op(torch.flatten, "flatten")(flatten_call)
function_op(stochastic_depth, "contiguous")(identity_call)
function_op(torch.permute, torch.transpose, "permute", "transpose")(transpose)
function_op(torch.reshape, "view", "reshape", accepts=_batch_first)(reshape)
function_op(operator.getitem, accepts=_split_part)(split_part)
function_op(torch.cat, torch.concat, torch.concatenate)(concat)
function_op(torch.mean, "mean", F.adaptive_avg_pool2d, accepts=_global_mean)(global_mean)
function_op(operator.matmul, torch.matmul, "matmul")(matmul)
function_op(torch.softmax, F.softmax, "softmax")(softmax)
function_op(F.dropout)(dropout_call)
