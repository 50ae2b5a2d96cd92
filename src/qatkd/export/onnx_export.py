"""ONNX export: a QDQ graph at the trained scales (int8 kernels) or the same network in FP32.

The graph is written node by node from the BN-folded, frozen fx graph (`fold_batchnorm`), so every
number in it is one that training used:

- input `pixels`: float [0, 1], NCHW, batch dynamic; the model's normalisation is inside the graph;
  output `logits` (the network's output, of any rank); the class names are in `metadata_props`
  (`class_names`, a JSON list);
- each quantized activation (conv / linear input, QuantAct) is QuantizeLinear -> DequantizeLinear
  at its trained scale, zero point 0, uint8 (unsigned) or int8 (signed). An 8-bit QuantizeLinear
  saturates at the 8-bit range only, so a b < 8-bit activation gets an integer Clip to its
  [qmin, qmax] between Q and DQ: clamp(clamp(round(x / s), 0, 255), 0, 15) is the 4-bit code
  exactly, and the Clip sits outside the DQ -> Conv -> Q group that the runtime fuses;
- each quantized weight is an int8 initializer holding the trained codes -> DequantizeLinear (per
  output channel, axis 0) -> Conv / Gemm; the bias is int32 at scale input_scale * weight_scale
  -> DequantizeLinear, the standard QDQ form that int8 kernels need.

That int32 bias is the one number the integer kernel rounds which training kept in float (BN's
folded shift). So the exporter puts the grid as fine as int8 allows without changing a single
value (`bias_grid`): weight codes are stored times 2^k (the largest power of two that still fits
int8; k = 4 for 4-bit codes) with the scale divided by 2^k, and unsigned b-bit input codes are
shifted left by 8 - b (BitShift, after the Clip) with the DQ scale divided by 2^(8-b); codes *
scale is the same float bit for bit (powers of two). The remaining rounding (~1e-4 of an output
step at W4A4, ~1e-2 at W8A8) is what `bias_grid.align_biases` takes into the PyTorch model before
a parity check. A conv whose output is not quantized (no int8 kernel can run it) keeps its float
bias, exactly. With power-of-two scales every op is exact and the tests demand bitwise equality.

`precision="fp32"` writes the same network with float weights (codes * scale) and no Q/DQ: the
FP32 reference for speed and size.
"""

from __future__ import annotations

import collections
import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from qatkd.errors import QatkdError
from qatkd.export.bias_grid import (
    aligned_copy,
    bias_scale,
    fine_input_scale,
    fine_weight_scale,
    input_shift,
    spare_bits,
)
from qatkd.export.fold import fold_batchnorm
from qatkd.export.frozen import ActRange, FrozenConv2d, FrozenLayer, FrozenLinear, act_range
from qatkd.nn import QuantPoint
from qatkd.quant import QuantAct

OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
Precision = Literal["int8", "fp32"]

_PASS_THROUGH = (nn.Identity, nn.Dropout, QuantPoint)
_BINARY = {
    operator.add: "Add",
    torch.add: "Add",
    operator.sub: "Sub",
    torch.sub: "Sub",
    operator.mul: "Mul",
    torch.mul: "Mul",
    operator.truediv: "Div",
    torch.div: "Div",
}
_RELU = (torch.relu, F.relu)


def to_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    precision: Precision = "int8",
    metadata: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """The model as an ONNX graph (see module doc); `input_shape` is one image's (C, H, W).
    `metadata` values are stored as strings (non-strings as JSON). Checked by `onnx.checker`."""
    if precision not in ("int8", "fp32"):
        raise QatkdError(f"precision must be int8 or fp32, not '{precision}'")
    gm = fold_batchnorm(model)
    builder = _Builder(gm, precision == "int8")
    graph = builder.build(list(input_shape))
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qatkd"
    )
    proto.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def int32_bias_layers(model: nn.Module, input_shape: Sequence[int]) -> set[str]:
    """Names of the layers whose bias the int8 graph holds as int32 (rounded to the kernel's
    grid): the ones `bias_grid.align_biases` must align, and only those (a float bias is exact,
    and moving it would change what the graph computes)."""
    builder = _Builder(fold_batchnorm(model), quantized=True)
    builder.build(list(input_shape))
    return {layer for _, _, layer in builder.int_biases.values()}


def as_exported(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """A copy of `model` with the biases the int8 graph holds as int32 moved onto that grid
    (`bias_grid.aligned_copy` on `int32_bias_layers`): the PyTorch model the graph computes, the
    reference for parity."""
    return aligned_copy(model, int32_bias_layers(model, input_shape))


def class_names_of(proto: onnx.ModelProto) -> list[str] | None:
    """The class names stored by `to_onnx(metadata={"class_names": [...]})`."""
    for entry in proto.metadata_props:
        if entry.key == "class_names":
            return json.loads(entry.value)
    return None


class _Builder:
    """Walks the fx graph once, emitting ONNX nodes and initializers."""

    def __init__(self, gm: fx.GraphModule, quantized: bool) -> None:
        self.gm, self.quantized = gm, quantized
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.names: dict[fx.Node, str] = {}
        self.used: set[str] = set()
        self.int_biases: dict[str, tuple[np.ndarray, list[str], str]] = {}
        """Bias DequantizeLinear output -> (float values, its initializers, layer name)."""

    def build(self, input_shape: list[int]) -> onnx.GraphProto:
        with torch.no_grad():  # logits [N, K], a detector's dense map [N, C, H, W], ...
            output_rank = self.gm(torch.zeros(1, *input_shape)).dim()
        inputs, outputs = [], []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if inputs:
                    raise QatkdError("export supports models with a single input tensor")
                self.names[node] = INPUT_NAME
                inputs.append(
                    helper.make_tensor_value_info(
                        INPUT_NAME, TensorProto.FLOAT, ["batch", *input_shape]
                    )
                )
            elif node.op == "output":
                result = node.args[0]
                if not isinstance(result, fx.Node):
                    raise QatkdError("export supports models with a single output tensor")
                self._emit("Identity", [self.names[result]], OUTPUT_NAME)
                outputs.append(
                    helper.make_tensor_value_info(
                        OUTPUT_NAME, TensorProto.FLOAT, ["batch", *[None] * (output_rank - 1)]
                    )
                )
            elif node.op == "get_attr":
                value = _attr(self.gm, node.target)
                self.names[node] = self._const(value.detach().float().numpy(), node.target)
            else:
                self.names[node] = self._convert(node)
        self._float_bias_where_unfused()
        return helper.make_graph(self.nodes, "qatkd", inputs, outputs, self.inits)

    # -- naming and constants ------------------------------------------------------------------

    def _name(self, hint: str) -> str:
        base = hint.replace(".", "_") or "t"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def _const(self, array: np.ndarray, hint: str) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _emit(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = hint if hint == OUTPUT_NAME else self._name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _operand(self, arg: Any, hint: str) -> str:
        if isinstance(arg, fx.Node):
            return self.names[arg]
        if isinstance(arg, int | float):
            return self._const(np.array(arg, dtype=np.float32), hint)
        raise QatkdError(f"{hint}: cannot export a {type(arg).__name__} operand")

    # -- quantization ----------------------------------------------------------------------------

    def _qdq(self, x: str, r: ActRange, hint: str, widen: bool = False) -> tuple[str, float]:
        """x -> QuantizeLinear -> [Clip to the b-bit codes] -> [BitShift] -> DequantizeLinear;
        returns the DQ output and its scale. `widen` (conv / linear inputs): unsigned b-bit codes
        are shifted left by 8 - b and the DQ scale divided by 2^(8 - b), the same values bit for
        bit on a finer grid for the int32 bias (see the module doc)."""
        dtype = np.int8 if r.signed else np.uint8
        scale = self._const(np.array(r.scale, dtype=np.float32), f"{hint}.scale")
        zero = self._const(np.array(0, dtype=dtype), f"{hint}.zero_point")
        q = self._emit("QuantizeLinear", [x, scale, zero], f"{hint}.q")
        if needs_clip(r):
            low = self._const(np.array(r.qmin, dtype=dtype), f"{hint}.qmin")
            high = self._const(np.array(r.qmax, dtype=dtype), f"{hint}.qmax")
            q = self._emit("Clip", [q, low, high], f"{hint}.clip")
        shift = input_shift(r) if widen else 0
        if shift == 0:
            return self._emit("DequantizeLinear", [q, scale, zero], f"{hint}.dq"), r.scale
        amount = self._const(np.array(shift, dtype=np.uint8), f"{hint}.shift")
        q = self._emit("BitShift", [q, amount], f"{hint}.widen", direction="LEFT")
        fine = fine_input_scale(r)
        fine_scale = self._const(np.array(fine, dtype=np.float32), f"{hint}.fine_scale")
        return self._emit("DequantizeLinear", [q, fine_scale, zero], f"{hint}.dq"), fine

    def _layer_inputs(
        self,
        layer: FrozenLayer | nn.Conv2d | nn.Linear,
        x: str,
        hint: str,
    ) -> list[str]:
        """Input, weight and bias names for Conv / Gemm, with Q/DQ where the layer quantizes."""
        if not isinstance(layer, FrozenLayer):
            weight = self._const(layer.weight.detach().numpy(), f"{hint}.weight")
            bias = layer.bias
            return [x, weight] + (
                [] if bias is None else [self._const(bias.detach().numpy(), f"{hint}.bias")]
            )
        bias_values = None if layer.bias is None else layer.bias.detach().numpy()
        if not self.quantized:
            weight = self._const(layer.weight.detach().numpy(), f"{hint}.weight")
            return [x, weight] + (
                [] if bias_values is None else [self._const(bias_values, f"{hint}.bias")]
            )
        r = layer.input_range
        if r is not None:
            x = self._qdq(x, r, f"{hint}.input", widen=True)[0]
        scale = fine_weight_scale(layer)
        stored = layer.codes.numpy() * np.int8(2 ** spare_bits(layer.codes))
        codes = self._const(stored, f"{hint}.weight_codes")
        w_scale = self._const(scale, f"{hint}.weight_scale")
        w_zero = self._const(np.zeros(scale.shape, np.int8), f"{hint}.weight_zero_point")
        weight = self._emit("DequantizeLinear", [codes, w_scale, w_zero], f"{hint}.weight", axis=0)
        b_scale = bias_scale(layer)
        if bias_values is None:
            return [x, weight]
        if b_scale is None:
            return [x, weight, self._const(bias_values, f"{hint}.bias")]
        b_codes = np.clip(np.round(bias_values / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
        b_zero = self._const(np.zeros(scale.shape, np.int32), f"{hint}.bias_zero_point")
        b_names = [
            self._const(b_codes, f"{hint}.bias_codes"),
            self._const(b_scale, f"{hint}.bias_scale"),
            b_zero,
        ]
        bias = self._emit("DequantizeLinear", b_names, f"{hint}.bias", axis=0)
        self.int_biases[bias] = (bias_values, b_names, hint)
        return [x, weight, bias]

    def _float_bias_where_unfused(self) -> None:
        """A Conv whose output is not quantized cannot run as an int8 kernel (its output would
        be int8), so it runs in float: give it the float bias, exact, instead of the int32 one."""
        users: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                users[name].append(node)
        dropped: set[str] = set()
        for node in self.nodes:
            if node.op_type != "Conv" or len(node.input) < 3:
                continue
            if node.input[2] not in self.int_biases or _feeds_one_quantize(node.output[0], users):
                continue
            values, names, _ = self.int_biases.pop(node.input[2])
            dropped.update([node.input[2], *names])
            node.input[2] = self._const(values, f"{node.name}.bias")
        self.nodes = [n for n in self.nodes if n.output[0] not in dropped]
        self.inits = [t for t in self.inits if t.name not in dropped]

    # -- node conversion -------------------------------------------------------------------------

    def _convert(self, node: fx.Node) -> str:
        hint = str(node.target) if node.op == "call_module" else node.name
        args = node.args
        if node.op == "call_module":
            return self._module(self.gm.get_submodule(node.target), node, hint)
        if node.op == "call_function" and node.target in _BINARY and len(args) == 2:
            a, b = (self._operand(arg, f"{hint}.operand") for arg in args)
            return self._emit(_BINARY[node.target], [a, b], hint)
        if (node.op == "call_function" and node.target in _RELU) or (
            node.op == "call_method" and node.target == "relu"
        ):
            return self._emit("Relu", [self.names[args[0]]], hint)
        if node.target in (torch.flatten, "flatten"):
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            if end != -1:
                raise QatkdError(f"{hint}: flatten with end_dim={end} is not supported by export")
            return self._emit("Flatten", [self.names[args[0]]], hint, axis=start)
        what = (
            node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "?")
        )
        raise QatkdError(
            f"cannot export the operation '{what}' (graph node {node.name}): "
            "the exporter supports conv / linear / pooling / ReLU / add networks"
        )

    def _module(self, m: nn.Module, node: fx.Node, hint: str) -> str:
        x = self.names[node.args[0]] if node.args else ""
        if isinstance(m, _PASS_THROUGH):
            return x
        if isinstance(m, FrozenConv2d) or type(m) is nn.Conv2d:
            return self._emit("Conv", self._layer_inputs(m, x, hint), hint, **_conv_attrs(m))
        if isinstance(m, FrozenLinear) or type(m) is nn.Linear:
            return self._emit("Gemm", self._layer_inputs(m, x, hint), hint, transB=1)
        if isinstance(m, QuantAct):
            r = act_range(m.quantizer, hint)
            return self._qdq(x, r, hint)[0] if self.quantized and r is not None else x
        if type(m) is nn.ReLU:
            return self._emit("Relu", [x], hint)
        if type(m) is nn.BatchNorm2d:
            stats = [m.weight, m.bias, m.running_mean, m.running_var] if m.affine else None
            if stats is None:
                raise QatkdError(f"{hint}: BatchNorm2d without affine parameters is not supported")
            names = [self._const(t.detach().numpy(), f"{hint}.{i}") for i, t in enumerate(stats)]
            return self._emit("BatchNormalization", [x, *names], hint, epsilon=m.eps)
        if type(m) is nn.MaxPool2d:
            if m.return_indices:
                raise QatkdError(f"{hint}: MaxPool2d with return_indices is not supported")
            k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
            return self._emit(
                "MaxPool",
                [x],
                hint,
                kernel_shape=k,
                strides=s,
                pads=p + p,
                dilations=d,
                ceil_mode=int(m.ceil_mode),
            )
        if type(m) is nn.AvgPool2d and m.divisor_override is None:
            k, s, p = (_pair(v) for v in (m.kernel_size, m.stride, m.padding))
            return self._emit(
                "AveragePool",
                [x],
                hint,
                kernel_shape=k,
                strides=s,
                pads=p + p,
                ceil_mode=int(m.ceil_mode),
                count_include_pad=int(m.count_include_pad),
            )
        if type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) == [1, 1]:
            return self._emit("GlobalAveragePool", [x], hint)
        if type(m) is nn.Flatten and m.end_dim == -1:
            return self._emit("Flatten", [x], hint, axis=m.start_dim)
        raise QatkdError(
            f"cannot export module '{node.target}' ({type(m).__name__}): the exporter supports "
            "Conv2d, Linear, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, global average pooling, "
            "Flatten, Identity/Dropout and QuantAct"
        )


def needs_clip(r: ActRange) -> bool:
    """Whether the codes need an integer Clip after QuantizeLinear (a range narrower than the
    8-bit type's)."""
    info = np.iinfo(np.int8 if r.signed else np.uint8)
    return (r.qmin, r.qmax) != (info.min, info.max)


def codes_tensor(hint: str, r: ActRange) -> str:
    """The graph tensor that holds the integer codes of the activation exported at `hint` (a
    layer's `<path>.input`, a QuantAct's `<path>`): the QuantizeLinear output, or the Clip's."""
    return f"{hint}.{'clip' if needs_clip(r) else 'q'}".replace(".", "_")


def _feeds_one_quantize(name: str, users: Mapping[str, list[onnx.NodeProto]]) -> bool:
    """`name` is read only by one QuantizeLinear, directly or through one Relu (which a uint8
    QuantizeLinear at zero point 0 makes redundant, so runtimes drop it)."""
    readers = users.get(name, [])
    if len(readers) == 1 and readers[0].op_type == "Relu":
        readers = users.get(readers[0].output[0], [])
    return len(readers) == 1 and readers[0].op_type == "QuantizeLinear"


def _pair(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, tuple | list) else [int(value)] * 2


def _conv_attrs(m: FrozenConv2d | nn.Conv2d) -> dict[str, Any]:
    if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        raise QatkdError("only Conv2d with explicit zero padding can be exported")
    weight_shape = m.codes.shape if isinstance(m, FrozenConv2d) else m.weight.shape
    pads = _pair(m.padding)
    return {
        "kernel_shape": list(weight_shape[2:]),
        "strides": _pair(m.stride),
        "pads": pads + pads,
        "dilations": _pair(m.dilation),
        "group": m.groups,
    }


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def save_onnx(proto: onnx.ModelProto, path: str) -> int:
    """Write `proto`; returns the file size in bytes."""
    onnx.save(proto, path)
    return len(proto.SerializeToString())
