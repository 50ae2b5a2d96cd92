"""The ONNX graph builder: walks the frozen, BN-folded fx graph once and emits ONNX nodes and
initializers, asking the registry (`onnx_registry`) of small op handlers (`onnx_ops`) for each
module or function node. A new layer type is exported by registering a handler, not by editing
the builder.
A node that no handler takes (none registered, a shape or tuple value, or a handler that raises
`Fallback`) is exported in float by torch.onnx (`onnx_fallback`), so coverage does not depend on
the handlers: they are where integer kernels need care (conv, linear, add, pooling, ReLU).

The builder owns what every handler shares: unique names, constants, Q/DQ pairs at the trained
scales and the Conv / Gemm inputs (int8 weight codes, int32 bias) described in `onnx_export`.

Each quantized tensor is quantized once (`codes`), however many nodes read it, and its
QuantizeLinear is moved before the ops that commute with quantization (ReLU, ReLU6, and the ops
that only move values: MaxPool, Flatten, reshapes, transposes; q(max(x, 0)) = max(q(x), 0) for
any non-decreasing q), so that it directly follows the conv, matmul or add that computes the
tensor and the runtime fuses them into one integer kernel. ReLU and ReLU6 become the bounds of
the integer Clip; the others run on the codes. Conversely a tensor that is dequantized from
codes is not quantized again at the same scale, and the ops that only move values run on its
codes (`emit_moving`): a concatenation or a channel shuffle of quantized tensors stays integer.
A quantized hardsigmoid becomes an integer add (`emit_hardsigmoid`).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from qatkd.errors import QatkdError
from qatkd.export.bias_grid import (
    bias_scale,
    fine_input_scale,
    fine_weight_scale,
    input_shift,
    int32_bias_fits,
    spare_bits,
)
from qatkd.export.frozen import ActRange, FrozenLayer, run_time_input_error, tensor_hint
from qatkd.export.onnx_fallback import island_graph, op_name, rename_tensors, run_examples
from qatkd.export.onnx_registry import FUNCTION_OPS, Fallback, module_handler
from qatkd.quant.tensors import attribute

OPSET = 17
"""The ONNX opset of the exported graph (and of the islands torch.onnx writes into it)."""
CONTRIB_DOMAIN = "com.microsoft"
"""onnxruntime's contrib ops (version 1), which OpenVINO reads too: the graph uses them where the
runtime cannot fuse the standard ops itself once a DequantizeLinear feeds them (`Gelu`)."""
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"

HARDSIGMOID_RANGE = 6
"""PyTorch's hardsigmoid is clamp(x + 3, 0, 6) / 6: the width of its linear part."""


@dataclass(frozen=True)
class Commuting:
    """A float node whose output the exporter may quantize on its input instead (module doc):
    a clamp to [low, high] (ReLU, ReLU6; a hardsigmoid, which also shifts and scales) or an
    order-preserving op (MaxPool, Flatten, a reshape or transpose; `extra`: its other inputs,
    such as a shape)."""

    op: str
    input: str
    attrs: dict[str, Any] = field(default_factory=dict)
    low: float = -np.inf
    high: float = np.inf
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dequantized:
    """A float tensor that is exactly DequantizeLinear(`codes`) at range `r`."""

    codes: str
    r: ActRange


class GraphBuilder:
    """Walks the fx graph once, emitting ONNX nodes and initializers."""

    def __init__(self, gm: fx.GraphModule, quantized: bool) -> None:
        self.gm, self.quantized = gm, quantized
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.names: dict[fx.Node, str] = {}
        self.used = {INPUT_NAME, OUTPUT_NAME}  # a layer called `logits` gets another name
        self.int_biases: dict[str, tuple[np.ndarray, list[str], str]] = {}
        """Bias DequantizeLinear output -> (float values, its initializers, layer name)."""
        self.commuting: dict[str, Commuting] = {}
        self.code_tensors: dict[str, tuple[str, int]] = {}
        """Quantized tensor's hint -> (the graph tensor holding its codes, their zero point)."""
        self._codes: dict[tuple[str, ActRange], str] = {}
        self._widened: dict[str, str] = {}
        self.dequantized: dict[str, Dequantized] = {}
        self.torch_onnx_ops: list[str] = []
        """The ops (`op_name`) of the nodes torch.onnx wrote in float, in graph order (the
        graph's `TORCH_ONNX_OPS` metadata)."""

    def build(self, input_shape: list[int]) -> onnx.GraphProto:
        if sum(node.op == "placeholder" for node in self.gm.graph.nodes) != 1:
            raise QatkdError("export supports models with a single input tensor")
        self.examples = run_examples(self.gm, input_shape)
        inputs, outputs = [], []
        nodes = list(self.gm.graph.nodes)
        for node in nodes:  # parameters and buffers first: what reads them decides its form
            value = attribute(self.gm, node.target) if node.op == "get_attr" else None
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.names[node] = self.const(value.detach().float().numpy(), node.target)
        done = {n for n in nodes if n.op == "get_attr"}
        for i, node in enumerate(nodes):
            if node in done:
                continue
            if node.op == "placeholder":
                self.names[node] = INPUT_NAME
                inputs.append(
                    helper.make_tensor_value_info(
                        INPUT_NAME, TensorProto.FLOAT, ["batch", *input_shape]
                    )
                )
            elif node.op == "output":
                result = node.args[0]
                if not (isinstance(result, fx.Node) and self.examples.is_tensor(result)):
                    raise QatkdError("export supports models with a single output tensor")
                output = helper.make_node(
                    "Identity", [self.names[result]], [OUTPUT_NAME], name=OUTPUT_NAME
                )
                self.nodes.append(output)
                rank = self.examples.values[result].dim()  # logits [N, K], a dense map, ...
                outputs.append(
                    helper.make_tensor_value_info(
                        OUTPUT_NAME, TensorProto.FLOAT, ["batch", *[None] * (rank - 1)]
                    )
                )
            elif (handler := self._handler(node)) is not None:
                try:
                    self.names[node] = handler(node)
                except Fallback:
                    self._emit_island([node])
            else:
                island = self._island(nodes, i)
                self._emit_island(island)
                done.update(island)
        self._drop_unused()
        self._float_bias_where_unfused()
        return helper.make_graph(self.nodes, "qatkd", inputs, outputs, self.inits)

    # -- naming and constants ------------------------------------------------------------------

    def rank(self, x: str) -> int:
        """The rank of tensor `x`, one that an fx node's value is named by."""
        return next(self.examples.values[n].dim() for n, name in self.names.items() if name == x)

    def name(self, hint: str) -> str:
        base = hint.replace(".", "_") or "t"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def const(self, array: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(
            numpy_helper.from_array(np.array(array, order="C"), name)
        )  # 0-d stays 0-d
        return name

    def emit(self, op: str, inputs: list[str], hint: str, domain: str = "", **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def operand(self, arg: Any, hint: str) -> str:
        if isinstance(arg, fx.Node):
            return self.names[arg]
        if isinstance(arg, int | float):
            return self.const(np.array(arg, dtype=np.float32), hint)
        raise QatkdError(f"{hint}: cannot export a {type(arg).__name__} operand")

    # -- quantization ----------------------------------------------------------------------------

    def emit_commuting(
        self,
        op: str,
        inputs: list[str],
        hint: str,
        low: float = -np.inf,
        high: float = np.inf,
        **attrs: Any,
    ) -> str:
        """Emit a float node that commutes with quantization (module doc) and remember it, so
        that `codes` of its output can quantize its input instead."""
        out = self.emit(op, inputs, hint, **attrs)
        self.commuting[out] = Commuting(op, inputs[0], attrs, low, high, tuple(inputs[1:]))
        return out

    def emit_hardsigmoid(self, x: str, hint: str) -> str:
        """PyTorch's hardsigmoid, clamp(x + 3, 0, 6) / 6, as a float HardSigmoid; where `codes`
        quantizes its output at scale s, it quantizes x + 3 at 6 s instead, the codes clipped
        at those of 0 and 1 (the same codes): onnxruntime then runs an integer add (QLinearAdd,
        the 3 a DequantizeLinear of an integer), where it has no integer hardsigmoid."""
        return self.emit_commuting(
            "HardSigmoid", [x], hint, low=0.0, high=1.0, alpha=1 / HARDSIGMOID_RANGE, beta=0.5
        )

    def emit_moving(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        """Emit an op that only moves, reshapes or cuts the values of `inputs[0]`: on its codes
        where it is quantized (the output is then the DequantizeLinear of the moved codes, at
        the same scale, and nothing quantizes it again), else in float, commuting."""
        x, *extra = inputs
        source = self.dequantized.get(x)
        if source is None:
            return self.emit_commuting(op, inputs, hint, **attrs)
        codes = self.emit(op, [source.codes, *extra], f"{hint}.codes", **attrs)
        return self.dequantize(codes, source.r, hint)

    def dequantize(self, codes: str, r: ActRange, hint: str) -> str:
        """DequantizeLinear of `codes` at range `r`."""
        scale = self.const(np.array(r.scale, dtype=np.float32), f"{hint}.scale")
        zero = self.const(self._zero_point(r), f"{hint}.zero_point")
        out = self.emit("DequantizeLinear", [codes, scale, zero], f"{hint}.dq")
        self.dequantized[out] = Dequantized(codes, r)
        return out

    def qdq(self, x: str, r: ActRange, hint: str, widen: bool = False) -> tuple[str, float]:
        """A DequantizeLinear of `codes(x, r, hint)` for one reader (runtimes fuse a DQ into
        the kernel that reads it, so each reader gets its own), and its scale. `widen` (conv /
        linear inputs): b-bit codes are shifted left by 8 - b and the DQ scale divided by
        2^(8 - b), the same values bit for bit on a finer grid for the int32 bias (see the
        module doc of `onnx_export`)."""
        codes = self.codes(x, r, hint)
        shift = input_shift(r) if widen else 0
        if shift == 0:
            return self.dequantize(codes, r, hint), r.scale
        if codes not in self._widened:
            amount = self.const(np.array(shift, dtype=np.uint8), f"{hint}.shift")
            self._widened[codes] = self.emit(
                "BitShift", [codes, amount], f"{hint}.widen", direction="LEFT"
            )
        fine = fine_input_scale(r)
        scale = self.const(np.array(fine, dtype=np.float32), f"{hint}.fine_scale")
        zero = self.const(np.array(r.zero_point << shift, np.uint8), f"{hint}.fine_zero_point")
        return self.emit(
            "DequantizeLinear", [self._widened[codes], scale, zero], f"{hint}.dq"
        ), fine

    def codes(self, x: str, r: ActRange, hint: str) -> str:
        """The integer codes of tensor `x` at range `r`, made once per tensor: QuantizeLinear,
        moved before the commuting ops that produce `x` (none where `x` is dequantized from
        codes at `r`: those codes), then an integer Clip where the codes' range (narrowed by a
        ReLU6's bound) is not the 8-bit type's."""
        key = (x, r)
        if key not in self._codes:
            zero = self._zero_point(r)
            self._codes[key] = self._quantize(x, r, zero, hint, r.qmin, r.qmax)
            self.code_tensors.setdefault(hint, (self._codes[key], int(zero)))
        return self._codes[key]

    @staticmethod
    def _zero_point(r: ActRange) -> np.ndarray:
        """The codes' type and zero point: uint8 at -qmin (`ActRange.zero_point`), so b-bit codes
        are stored in [0, 2^b): the integer add, multiplication and concatenation take one type
        for all their inputs and their output, and u8 is what x86 int8 kernels read."""
        return np.array(r.zero_point, dtype=np.uint8)

    def _quantize(
        self, x: str, r: ActRange, zero_point: np.ndarray, hint: str, low: int, high: int
    ) -> str:
        source = self.commuting.get(x)
        if source is not None and source.op in ("Relu", "Clip", "HardSigmoid"):
            low, high = max(low, code_of(source.low, r)), min(high, code_of(source.high, r))
            if source.op == "HardSigmoid":  # x + 3 at 6 s (`emit_hardsigmoid`)
                offset = self.dequantize(
                    self.const(np.array(1, dtype=np.uint8), f"{hint}.offset_code"),
                    ActRange(HARDSIGMOID_RANGE / 2, 0, 255, 8),
                    f"{hint}.offset",
                )
                shifted = self.emit("Add", [source.input, offset], f"{hint}.plus_3")
                wide = ActRange(HARDSIGMOID_RANGE * r.scale, r.qmin, r.qmax, r.bits)
                return self._quantize(shifted, wide, zero_point, hint, low, high)
            return self._quantize(source.input, r, zero_point, hint, low, high)
        if source is not None:  # MaxPool, Flatten, a reshape, ...: on the codes
            inner_hint = f"{hint}.before_{source.op}"
            inner = self._quantize(source.input, r, zero_point, inner_hint, low, high)
            return self.emit(
                source.op, [inner, *source.extra], f"{hint}.{source.op}", **source.attrs
            )
        dequantized = self.dequantized.get(x)
        if dequantized is not None and dequantized.r == r:
            q, full = dequantized.codes, (r.qmin, r.qmax)
        else:
            scale = self.const(np.array(r.scale, dtype=np.float32), f"{hint}.scale")
            zero = self.const(zero_point, f"{hint}.zero_point")
            q = self.emit("QuantizeLinear", [x, scale, zero], f"{hint}.q")
            info = np.iinfo(zero_point.dtype)
            full = (info.min - int(zero_point), info.max - int(zero_point))
        if (low, high) == full:
            return q
        low, high = low + int(zero_point), high + int(zero_point)
        bounds = [
            self.const(np.array(low, dtype=zero_point.dtype), f"{hint}.qmin"),
            self.const(np.array(high, dtype=zero_point.dtype), f"{hint}.qmax"),
        ]
        return self.emit("Clip", [q, *bounds], f"{hint}.clip")

    def layer_inputs(
        self,
        layer: FrozenLayer | nn.Conv2d | nn.Linear,
        x: str,
        hint: str,
        matmul: bool = False,
    ) -> list[str]:
        """Input, weight and bias names for Conv / Gemm, with Q/DQ where the layer quantizes;
        `matmul`: the weight transposed to [in, out] for MatMul (per-channel axis 1), and the
        bias float (the caller adds it after the MatMul)."""
        layout = (lambda w: np.ascontiguousarray(w.T)) if matmul else (lambda w: w)
        if not isinstance(layer, FrozenLayer):
            weight = self.const(layout(layer.weight.detach().numpy()), f"{hint}.weight")
            bias = layer.bias
            return [x, weight] + (
                [] if bias is None else [self.const(bias.detach().numpy(), f"{hint}.bias")]
            )
        bias_values = None if layer.bias is None else layer.bias.detach().numpy()
        if not self.quantized:
            weight = self.const(layout(layer.weight.detach().numpy()), f"{hint}.weight")
            return [x, weight] + (
                [] if bias_values is None else [self.const(bias_values, f"{hint}.bias")]
            )
        if layer.group_size is not None:
            raise QatkdError(
                f"{hint}: per-group weight scales (group_size={layer.group_size}) have no "
                "per-channel QDQ form; such a model exports through the packed format (qpack)"
            )
        if layer.input_block is not None:
            raise run_time_input_error(f"{hint}.input_quantizer")
        r = layer.input_range
        if r is not None:
            x = self.qdq(x, r, tensor_hint(layer.input_quantizer, f"{hint}.input"), widen=True)[0]
        scale = fine_weight_scale(layer)
        # in int16: 2^7 (codes all in [-1, 0], e.g. a zero-initialised head) is no int8
        stored = (layer.codes.numpy().astype(np.int16) << spare_bits(layer.codes)).astype(np.int8)
        codes = self.const(layout(stored), f"{hint}.weight_codes")
        w_scale = self.const(scale, f"{hint}.weight_scale")
        w_zero = self.const(np.zeros(scale.shape, np.int8), f"{hint}.weight_zero_point")
        weight = self.emit(
            "DequantizeLinear", [codes, w_scale, w_zero], f"{hint}.weight", axis=int(matmul)
        )
        b_scale = None if matmul else bias_scale(layer)  # MatMul adds its bias in float
        if bias_values is None:
            return [x, weight]
        b_codes = None if b_scale is None else np.round(bias_values.astype(np.float64) / b_scale)
        if b_codes is None or not int32_bias_fits(b_codes, stored):
            # a float input, or one at a scale so fine (dead in calibration) that the bias and
            # the products would overflow the int32 accumulator: the bias stays float, exactly
            return [x, weight, self.const(bias_values, f"{hint}.bias")]
        b_codes = b_codes.astype(np.int32)
        b_zero = self.const(np.zeros(scale.shape, np.int32), f"{hint}.bias_zero_point")
        b_names = [
            self.const(b_codes, f"{hint}.bias_codes"),
            self.const(b_scale, f"{hint}.bias_scale"),
            b_zero,
        ]
        bias = self.emit("DequantizeLinear", b_names, f"{hint}.bias", axis=0)
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
            readers = users.get(node.output[0], [])
            quantized = len(readers) == 1 and readers[0].op_type == "QuantizeLinear"
            if node.input[2] not in self.int_biases or quantized:
                continue
            values, names, _ = self.int_biases.pop(node.input[2])
            dropped.update([node.input[2], *names])
            node.input[2] = self.const(values, f"{node.name}.bias")
        self.nodes = [n for n in self.nodes if n.output[0] not in dropped]
        self.inits = [t for t in self.inits if t.name not in dropped]

    def _drop_unused(self) -> None:
        """Remove the nodes whose output nothing reads (the float ops that `codes` moved a
        QuantizeLinear before, where nothing else reads them), then unused initializers."""
        while True:
            read = {name for node in self.nodes for name in node.input} | {OUTPUT_NAME}
            kept = [n for n in self.nodes if any(o in read for o in n.output)]
            if len(kept) == len(self.nodes):
                break
            self.nodes = kept
        read = {name for node in self.nodes for name in node.input}
        self.inits = [t for t in self.inits if t.name in read]

    # -- dispatch to the op handlers, or to the float fallback ---------------------------------

    def _handler(self, node: fx.Node) -> Callable[[fx.Node], str] | None:
        """The integer handler of `node`, where one is registered and takes the node: by
        default one that maps tensors to a tensor (a shape computation or a tuple goes to the
        float fallback)."""
        if not self.examples.is_tensor(node):
            return None
        tensors = all(
            self.examples.is_tensor(a) and (a.op != "get_attr" or a in self.names)
            for a in node.all_input_nodes
        )
        hint = str(node.target) if node.op == "call_module" else node.name
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            handler = module_handler(m)
            if handler is None or not tensors or len(node.all_input_nodes) != 1:
                return None
            return lambda n: handler(self, m, self.names[n.args[0]], hint)
        function_handler, accepts = FUNCTION_OPS.get(node.target, (None, None))
        if function_handler is None or not (tensors if accepts is None else accepts(self, node)):
            return None
        return lambda n: function_handler(self, n, hint)

    def _island(self, nodes: list[fx.Node], start: int) -> list[fx.Node]:
        """The run of consecutive nodes from `nodes[start]` that have no handler (parameters
        read on the way do not end it): one torch.onnx export."""
        island = []
        for node in nodes[start:]:
            if node.op == "get_attr":
                continue
            if node.op not in ("call_module", "call_function", "call_method"):
                break
            if self._handler(node) is not None:
                break
            island.append(node)
        return island

    def _emit_island(self, members: list[fx.Node]) -> None:
        """Splice in torch.onnx's float graph of `members` (`onnx_fallback`) under fresh names."""
        graph, inputs, outputs = island_graph(self.gm, members, self.examples, OPSET)
        if graph.node:  # nothing read (a chunk whose parts are Slices), or constants only
            self.torch_onnx_ops += [op_name(n) for n in members]
        renamed = {f"in{i}": self.names[n] for i, n in enumerate(inputs)}
        hint = members[0].name

        def rename(name: str) -> str:
            if name and name not in renamed:
                renamed[name] = self.name(f"{hint}.{_SAFE.sub('_', name).strip('_')}")
            return renamed.get(name, name)

        for tensor in graph.initializer:
            tensor.name = rename(tensor.name)
            self.inits.append(tensor)
        for node in graph.node:
            rename_tensors(node, rename)
            self.nodes.append(node)
        for i, n in enumerate(outputs):
            self.names[n] = rename(f"out{i}")


_SAFE = re.compile(r"[^A-Za-z0-9_]+")


def code_of(value: float, r: ActRange) -> int:
    """The code that `value` quantizes to at `r` (clamped; infinities to the range's ends)."""
    if np.isinf(value):
        return r.qmin if value < 0 else r.qmax
    code = np.round(np.float32(value) / np.float32(r.scale))
    return int(np.clip(code, r.qmin, r.qmax))
