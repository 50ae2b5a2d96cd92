"""Where `prepare` puts the activation quantizers that no layer owns: at the tensors that
onnxruntime computes on integer kernels, as its own quantizer (`quantize_static`) and PyTorch's
pt2e backend quantizers place them, so that QAT simulates the integer graph that is deployed.

An op runs on integers only where each input arrives quantized (a DequantizeLinear) and its
output is quantized at once (a QuantizeLinear). Matched on a torch.fx trace of the prepared model:

- an add or a multiplication of two activations (a residual add, a squeeze-excite product):
  both operands and the result (QLinearAdd, QLinearMul);
- a concatenation: its inputs and its result, at one scale (`quant.tensors`; QLinearConcat, or
  a Concat of the codes);
- a sigmoid, a hardsigmoid, an average pooling, and a global average pooling written as a
  function (`x.mean((2, 3))`, `F.adaptive_avg_pool2d(x, 1)`): the input and the output
  (QLinearSigmoid, an add of 3 (QLinearAdd: `GraphBuilder.emit_hardsigmoid`),
  QLinearAveragePool, QLinearGlobalAveragePool);
- a SiLU or a Hardswish: it becomes `QuantSiLU` / `QuantHardswish`, x · sigmoid(x) or
  x · hardsigmoid(x) with the gate quantized (QLinearSigmoid or QLinearAdd, and QLinearMul;
  onnxruntime has no integer SiLU or Hardswish);
- an `nn.MultiheadAttention` or Swin's shifted-window attention: it becomes `qatkd.nn.Attention`
  or `quant.window_attention.WindowAttention` before the layers are swapped (`split_attention`),
  whose projections are Linear layers and whose QuantPoints quantize the query, key, value and
  probabilities (MatMulIntegerToFloat, QLinearMatMul); LayerNorm stays float (no runtime has an
  integer one);
- a conv or linear layer: its output, where an op without an integer kernel reads it (GELU,
  LayerNorm, a float add, an activation that `quant.skip` leaves float): the layer is then an
  integer kernel and the float op runs between a DequantizeLinear and a QuantizeLinear, as
  `quantize_static` leaves it. Where the layer's output is multiplied by a layer scale
  (`quant.layer_scale`), after that product, which the exporter folds into the layer.

An output is taken after the ops the exporter moves a QuantizeLinear before (the layer's
BatchNorm, ReLU, MaxPool, Flatten, reshapes, Dropout and stochastic depth in eval). A rule applies
inside the network only (its output reaches a quantized layer: logits and a detector's raw
outputs stay float), and only where each of its tensors is already quantized for every reader or
has a module boundary to put a quantizer on (`quant.sites`: what a module returns, or what the
modules that read it take in). A tensor computed in the middle of a forward and read by a
function (ViT's first residual add of a block) has none: that op stays float, exactly as the
exporter writes it.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from qatkd.nn import Attention
from qatkd.quant import sites
from qatkd.quant.base import Quantizer
from qatkd.quant.layer_scale import layer_scale
from qatkd.quant.modules import (
    QuantAct,
    QuantConv2d,
    QuantGlobalAvgPool2d,
    QuantHardswish,
    QuantLinear,
    QuantSiLU,
)
from qatkd.quant.tensors import (
    CONCATS,
    MODULE_CALLS,
    MODULE_RETURNS,
    QUANTIZED_INPUT,
    SAME_VALUE_CALLS,
    SAME_VALUE_MODULES,
    SPLITS,
    calls,
    global_pool_call,
    same_value_input,
    trace,
)

if TYPE_CHECKING:  # torchvision loads only with a model that needs it
    from qatkd.quant.window_attention import WindowAttention

Site = tuple[str, sites.Side]
BINARY = {operator.add, operator.mul, torch.add, torch.mul, "add", "mul"}
SIGMOIDS = {torch.sigmoid, F.sigmoid, "sigmoid", F.hardsigmoid}
GATED = {nn.SiLU: QuantSiLU, nn.Hardswish: QuantHardswish}
"""Activation modules that are x · gate(x), and the module that quantizes the gate."""
SHAPES = {"size", "dim", getattr, len}
"""Calls whose result is a shape or a number: what depends on the input only through them is
not an activation (a class token expanded to the batch)."""
_COMMUTING_MODULES = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, *SAME_VALUE_MODULES)
_COMMUTING_CALLS = {torch.relu, F.relu, "relu", *SAME_VALUE_CALLS}


def place_quantizers(
    model: nn.Module, make: Callable[[str], Quantizer], skipped: Callable[[str], bool]
) -> None:
    """Swap `model`'s SiLU and Hardswish modules for `GATED`'s and put a QuantAct on each
    module boundary that the rules (module doc) need, with quantizers from `make(name)`; modules
    whose path `skipped` says are left as they are. Raises `QatkdError` where fx cannot trace
    the model."""
    gm = trace(model)
    for node in gm.graph.nodes:
        if node.op != "call_module" or skipped(node.target):
            continue
        gated = GATED.get(type(gm.get_submodule(node.target)))
        if gated is not None and gm.meta[MODULE_CALLS][node.target] == 1:
            quantized = gated(make(f"{node.target}.input"), make(f"{node.target}.gate"))
            model.set_submodule(node.target, quantized)
    gm = trace(model)
    boundaries = _Boundaries(model, gm, skipped)
    placed: list[Site] = []
    for node, tensors in _rules(gm):
        found = [boundaries.first(candidates) for candidates in tensors]
        if all(f is not None for f in found):
            boundaries.quantized |= {holder for holder, _ in found}
            if calls(node, CONCATS):  # its output is the codes of its inputs, at their scale
                boundaries.quantized.add(node)
            placed += [s for _, held in found for s in held if s not in placed]
    for path, side in placed:
        sites.attach(model, path, side, QuantAct(make(f"{path}.{side}")))


def split_attention(model: nn.Module, skipped: Callable[[str], bool]) -> None:
    """Swap each attention of `model` outside `skipped` that `Attention` (an
    `nn.MultiheadAttention`) or `WindowAttention` (Swin's) splits for that rewrite: the float
    computation, its projections called as layers, its integer points marked."""
    rewrites: list[type[Attention] | type[WindowAttention]] = [Attention]
    if "torchvision" in sys.modules:  # a Swin's modules are torchvision's: it is loaded already
        from qatkd.quant.window_attention import WindowAttention

        rewrites.append(WindowAttention)
    for name, module in list(model.named_modules()):
        for rewrite in rewrites:
            if name and rewrite.splits(module) and not skipped(name):
                model.set_submodule(name, rewrite.from_module(module))


def _rules(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, list[list[fx.Node]]]]:
    """Each op that the rules quantize, where its output reaches a quantized layer, with the
    tensors to quantize, each as the nodes that hold its values, best first (an operand, then
    what it was moved or reshaped from; the output after the ops that the exporter moves a
    QuantizeLinear before, then before them). A concatenation's output is its inputs' codes
    (`quant.tensors` gives them one scale): only its inputs are listed."""
    inside = _feeding_quantized_layers(gm)
    activations = _activations(gm)
    scaled = {}  # layer -> the product by its layer scale (folded into it at export)
    for node in gm.graph.nodes:
        if (found := layer_scale(gm, node, _layer_channels)) is not None:
            scaled[found[0]] = node
    for node in gm.graph.nodes:
        operands = _integer_operands(gm, node, activations)
        if operands is None:
            continue
        output = _advance(gm, scaled.get(node) or _after_batchnorm(gm, node))
        if output[-1] in inside:
            tensors = [_backward(gm, a) for a in operands]
            yield node, tensors if calls(node, CONCATS) else [*tensors, output[::-1]]


def _integer_operands(
    gm: fx.GraphModule, node: fx.Node, activations: set[fx.Node]
) -> list[fx.Node] | None:
    """The activation operands of `node` if a rule quantizes it (a layer or a gated activation:
    none, it quantizes its own input), else None."""
    args = node.args
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, QuantConv2d | QuantLinear | QuantSiLU | QuantGlobalAvgPool2d):
            return []
        if isinstance(module, nn.Sigmoid | nn.Hardsigmoid | nn.AvgPool2d):
            return [args[0]]
        return None
    if calls(node, BINARY) and len(args) == 2 and not node.kwargs:
        both = all(isinstance(a, fx.Node) and a in activations for a in args)
        return list(args) if both else None
    if calls(node, CONCATS) and isinstance(args[0], list | tuple):
        parts = args[0]
        joined = len(parts) > 1 and all(isinstance(a, fx.Node) and a in activations for a in parts)
        return list(parts) if joined else None
    if calls(node, SIGMOIDS) or global_pool_call(node):
        return [args[0]]
    return None


def _layer_channels(module: nn.Module) -> tuple[int, int] | None:
    """A quantized layer's output channels and their axis (`quant.layer_scale`)."""
    if isinstance(module, QuantConv2d):
        return module.out_channels, -3
    if isinstance(module, QuantLinear) and module.weight_quantizer.group_size is None:
        return module.out_features, -1
    return None


def _after_batchnorm(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """A conv's BatchNorm where it is its only reader (folded into it at export), else `node`."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantConv2d):
        (user,) = node.users if len(node.users) == 1 else (None,)
        if (
            user is not None
            and user.op == "call_module"
            and isinstance(gm.get_submodule(user.target), nn.BatchNorm2d)
        ):
            return user
    return node


def _advance(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """`node`, then its only reader while that is an op the exporter moves a QuantizeLinear
    before, and so on: the last is the tensor whose quantization lands right after `node`."""
    chain = [node]
    while len(node.users) == 1:
        (user,) = node.users
        if not (user.args and user.args[0] is node and _commutes(gm, user)):
            break
        chain.append(node := user)
    return chain


def _backward(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """`node`, then the node whose values it holds, and so on (`quant.tensors.source`)."""
    chain = [node]
    while (node := same_value_input(gm, node)) is not None:
        chain.append(node)
    return chain


def _commutes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the exporter moves a QuantizeLinear before `node` (a max pooling that also
    returns its indices returns a tuple, which no quantizer takes)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _COMMUTING_MODULES) and not getattr(
            module, "return_indices", False
        )
    return calls(node, _COMMUTING_CALLS)


def _quantized_reader(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(
        gm.get_submodule(node.target), (*QUANTIZED_INPUT, QuantAct)
    )


def _readers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes that read `node`'s values, looking through the ops that only move or cut them
    (a reshape, a chunk)."""
    found = []
    for user in node.users:
        if same_value_input(gm, user) is node and not _quantized_reader(gm, user):
            found += _readers(gm, user)
        elif calls(user, SPLITS):
            found += [r for part in user.users for r in _readers(gm, part)]
        else:
            found.append(user)
    return found


class _Boundaries:
    """Where a tensor of the trace `gm` of `model` can be quantized for every reader."""

    def __init__(
        self, model: nn.Module, gm: fx.GraphModule, skipped: Callable[[str], bool]
    ) -> None:
        self.model, self.gm, self.skipped = model, gm, skipped
        self.calls = gm.meta[MODULE_CALLS]
        self.quantized: set[fx.Node] = set()
        """Nodes that the sites found so far quantize, and concatenations of such nodes."""

    def first(self, candidates: list[fx.Node]) -> tuple[fx.Node, list[Site]] | None:
        """The first of `candidates` (nodes holding one tensor's values) that has sites, with
        them, or None."""
        for candidate in candidates:
            if (found := self.of(candidate)) is not None:
                return candidate, found
        return None

    def of(self, node: fx.Node) -> list[Site] | None:
        """Nowhere if `node` is quantized already (a QuantAct's output, `quantized`) or every
        reader of it quantizes it; else the output of the module that returns it, or the
        inputs of the modules that read it; None where it has no such boundary."""
        gm = self.gm
        is_act = node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantAct)
        if is_act or node in self.quantized:
            return []
        readers = [r for r in _readers(gm, node) if not _quantized_reader(gm, r)]
        if not readers:
            return []
        for path in gm.meta[MODULE_RETURNS].get(node, []):
            if (site := self._site(path, "output")) is not None:
                return [site]
        inputs = [
            self._site(str(r.target), "input")
            for r in readers
            if r.op == "call_module" and r.args and r.args[0] is node
        ]
        if len(inputs) == len(readers) and all(s is not None for s in inputs):
            return inputs
        return None

    def _site(self, path: str, side: sites.Side) -> Site | None:
        """The boundary of a module called once, outside the skip patterns, that can hold it."""
        if self.calls[path] != 1:
            return None
        held = sites.carrier(self.model, path, side)
        if held is None or self.skipped(held) or self.calls[held] != 1:
            return None
        return held, side


def _feeding_quantized_layers(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes from which a quantized layer or QuantAct is reached."""
    seen: set[fx.Node] = set()
    todo = [n for n in gm.graph.nodes if _quantized_reader(gm, n)]
    while todo:
        node = todo.pop()
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def _activations(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose values depend on the model's input (not only through its shape)."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (
            not calls(node, SHAPES) and any(a in found for a in node.all_input_nodes)
        ):
            found.add(node)
    return found
