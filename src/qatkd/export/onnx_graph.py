"""The ONNX graph builder: walks the frozen, BN-folded fx graph once and emits ONNX nodes and
initializers, asking a registry of small op handlers (`qatkd.export.onnx_ops`) for each module or
function node. A new layer type is exported by registering a handler, not by editing the builder.

The builder owns what every handler shares: unique names, constants, Q/DQ pairs at the trained
scales and the Conv / Gemm inputs (int8 weight codes, int32 bias) described in `onnx_export`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
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
    spare_bits,
)
from qatkd.export.frozen import ActRange, FrozenLayer

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"

ModuleHandler = Callable[["GraphBuilder", Any, str, str], str]
"""(builder, module, input tensor name, name hint) -> output tensor name."""
FunctionHandler = Callable[["GraphBuilder", fx.Node, str], str]
"""(builder, fx node of a function or method call, name hint) -> output tensor name."""
MODULE_OPS: dict[type[nn.Module], tuple[ModuleHandler, bool]] = {}
FUNCTION_OPS: dict[Any, FunctionHandler] = {}


def module_op(
    *types: type[nn.Module], subclasses: bool = False
) -> Callable[[ModuleHandler], ModuleHandler]:
    """Register the handler of modules of exactly these types (`subclasses`: or of a subclass)."""

    def register(handler: ModuleHandler) -> ModuleHandler:
        for t in types:
            MODULE_OPS[t] = (handler, subclasses)
        return handler

    return register


def function_op(*targets: Any) -> Callable[[FunctionHandler], FunctionHandler]:
    """Register the handler of calls to these functions (or method names, e.g. "relu")."""

    def register(handler: FunctionHandler) -> FunctionHandler:
        for t in targets:
            FUNCTION_OPS[t] = handler
        return handler

    return register


def _module_handler(m: nn.Module) -> ModuleHandler | None:
    exact = MODULE_OPS.get(type(m))
    if exact is not None:
        return exact[0]
    for t, (handler, subclasses) in MODULE_OPS.items():
        if subclasses and isinstance(m, t):
            return handler
    return None


class GraphBuilder:
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
                self.emit("Identity", [self.names[result]], OUTPUT_NAME)
                outputs.append(
                    helper.make_tensor_value_info(
                        OUTPUT_NAME, TensorProto.FLOAT, ["batch", *[None] * (output_rank - 1)]
                    )
                )
            elif node.op == "get_attr":
                value = _attr(self.gm, node.target)
                self.names[node] = self.const(value.detach().float().numpy(), node.target)
            else:
                self.names[node] = self._convert(node)
        self._float_bias_where_unfused()
        return helper.make_graph(self.nodes, "qatkd", inputs, outputs, self.inits)

    # -- naming and constants ------------------------------------------------------------------

    def name(self, hint: str) -> str:
        base = hint.replace(".", "_") or "t"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def const(self, array: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def emit(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = hint if hint == OUTPUT_NAME else self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def operand(self, arg: Any, hint: str) -> str:
        if isinstance(arg, fx.Node):
            return self.names[arg]
        if isinstance(arg, int | float):
            return self.const(np.array(arg, dtype=np.float32), hint)
        raise QatkdError(f"{hint}: cannot export a {type(arg).__name__} operand")

    # -- quantization ----------------------------------------------------------------------------

    def qdq(self, x: str, r: ActRange, hint: str, widen: bool = False) -> tuple[str, float]:
        """x -> QuantizeLinear -> [Clip to the b-bit codes] -> [BitShift] -> DequantizeLinear;
        returns the DQ output and its scale. `widen` (conv / linear inputs): unsigned b-bit codes
        are shifted left by 8 - b and the DQ scale divided by 2^(8 - b), the same values bit for
        bit on a finer grid for the int32 bias (see the module doc)."""
        dtype = np.int8 if r.signed else np.uint8
        scale = self.const(np.array(r.scale, dtype=np.float32), f"{hint}.scale")
        zero = self.const(np.array(0, dtype=dtype), f"{hint}.zero_point")
        q = self.emit("QuantizeLinear", [x, scale, zero], f"{hint}.q")
        if needs_clip(r):
            low = self.const(np.array(r.qmin, dtype=dtype), f"{hint}.qmin")
            high = self.const(np.array(r.qmax, dtype=dtype), f"{hint}.qmax")
            q = self.emit("Clip", [q, low, high], f"{hint}.clip")
        shift = input_shift(r) if widen else 0
        if shift == 0:
            return self.emit("DequantizeLinear", [q, scale, zero], f"{hint}.dq"), r.scale
        amount = self.const(np.array(shift, dtype=np.uint8), f"{hint}.shift")
        q = self.emit("BitShift", [q, amount], f"{hint}.widen", direction="LEFT")
        fine = fine_input_scale(r)
        fine_scale = self.const(np.array(fine, dtype=np.float32), f"{hint}.fine_scale")
        return self.emit("DequantizeLinear", [q, fine_scale, zero], f"{hint}.dq"), fine

    def layer_inputs(
        self,
        layer: FrozenLayer | nn.Conv2d | nn.Linear,
        x: str,
        hint: str,
    ) -> list[str]:
        """Input, weight and bias names for Conv / Gemm, with Q/DQ where the layer quantizes."""
        if not isinstance(layer, FrozenLayer):
            weight = self.const(layer.weight.detach().numpy(), f"{hint}.weight")
            bias = layer.bias
            return [x, weight] + (
                [] if bias is None else [self.const(bias.detach().numpy(), f"{hint}.bias")]
            )
        bias_values = None if layer.bias is None else layer.bias.detach().numpy()
        if not self.quantized:
            weight = self.const(layer.weight.detach().numpy(), f"{hint}.weight")
            return [x, weight] + (
                [] if bias_values is None else [self.const(bias_values, f"{hint}.bias")]
            )
        if layer.group_size is not None:
            raise QatkdError(
                f"{hint}: per-group weight scales (group_size={layer.group_size}) have no "
                "per-channel QDQ form; such a model exports through the packed format (qpack)"
            )
        r = layer.input_range
        if r is not None:
            x = self.qdq(x, r, f"{hint}.input", widen=True)[0]
        scale = fine_weight_scale(layer)
        stored = layer.codes.numpy() * np.int8(2 ** spare_bits(layer.codes))
        codes = self.const(stored, f"{hint}.weight_codes")
        w_scale = self.const(scale, f"{hint}.weight_scale")
        w_zero = self.const(np.zeros(scale.shape, np.int8), f"{hint}.weight_zero_point")
        weight = self.emit("DequantizeLinear", [codes, w_scale, w_zero], f"{hint}.weight", axis=0)
        b_scale = bias_scale(layer)
        if bias_values is None:
            return [x, weight]
        if b_scale is None:
            return [x, weight, self.const(bias_values, f"{hint}.bias")]
        b_codes = np.clip(np.round(bias_values / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
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
            if node.input[2] not in self.int_biases or _feeds_one_quantize(node.output[0], users):
                continue
            values, names, _ = self.int_biases.pop(node.input[2])
            dropped.update([node.input[2], *names])
            node.input[2] = self.const(values, f"{node.name}.bias")
        self.nodes = [n for n in self.nodes if n.output[0] not in dropped]
        self.inits = [t for t in self.inits if t.name not in dropped]

    # -- dispatch to the op handlers ------------------------------------------------------------

    def _convert(self, node: fx.Node) -> str:
        hint = str(node.target) if node.op == "call_module" else node.name
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            handler = _module_handler(m)
            if handler is None:
                supported = sorted({t.__name__ for t in MODULE_OPS})
                raise QatkdError(
                    f"cannot export module '{node.target}' ({type(m).__name__}): the exporter "
                    f"supports {', '.join(supported)}"
                )
            return handler(self, m, self.names[node.args[0]] if node.args else "", hint)
        handler = FUNCTION_OPS.get(node.target)
        if handler is None:
            what = (
                node.target
                if isinstance(node.target, str)
                else getattr(node.target, "__name__", "?")
            )
            raise QatkdError(
                f"cannot export the operation '{what}' (graph node {node.name}): "
                "the exporter supports conv / linear / pooling / ReLU / add networks"
            )
        return handler(self, node, hint)


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


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)
