"""One quantizer per tensor: the integer graph quantizes a tensor once, with one scale, however
many integer kernels read it (a block input feeds its first conv, its shortcut and the residual
add). `share_tensor_quantizers` finds, on a torch.fx trace of a prepared model, the quantizers
that read the same tensor and makes them one module, so training simulates exactly that graph.

Reading the same tensor means the same value up to shape and identity ops (Flatten, view,
permute, a chunk of it, Dropout and stochastic depth in eval, Identity) or through another
quantizer of it (a `QuantAct` output quantized again by a conv is the same codes). The shared
quantizer keeps the highest bit-width of the group (a block input that an 8-bit shortcut point
also reads reaches the block's 4-bit conv at 8 bits), and its `tensor_hint` names it in the
exported graph and in code parity.

A concatenation joins the codes of its inputs, so its inputs and its output share one scale
(`torch.cat`: one quantizer for all of them, as the integer graph concatenates codes without
rescaling them). Such a quantizer reads several tensors and initialises on the first, so it is
made signed before calibration unless every tensor it reads is non-negative by construction
(after a ReLU, a sigmoid, ...): a DenseNet block's unsigned stem output and its signed conv
outputs share one signed scale.
"""

from __future__ import annotations

import collections
import copy
import operator
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qatkd.errors import QatkdError
from qatkd.quant import sites
from qatkd.quant.base import Quantizer
from qatkd.quant.modules import (
    QuantAct,
    QuantConv2d,
    QuantGlobalAvgPool2d,
    QuantLinear,
    QuantSiLU,
)

QUANTIZED_INPUT = (QuantConv2d, QuantLinear, QuantGlobalAvgPool2d, QuantSiLU)
"""Layers that hold the quantizer of the tensor they read, as `input_quantizer`."""
MODULE_CALLS = "module_calls"
"""`GraphModule.meta` key of a trace: {module path: how many times the forward called it}."""
MODULE_RETURNS = "module_returns"
"""`GraphModule.meta` key of a trace: {node: paths of the modules that returned it, innermost
first}."""
STOCHASTIC_DEPTH = "torchvision.ops.stochastic_depth.stochastic_depth"
"""torchvision's stochastic depth, a traced leaf function: the identity in eval."""
SAME_VALUE_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
SAME_VALUE_CALLS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, STOCHASTIC_DEPTH,
    "flatten", "view", "reshape", "contiguous", "permute", "transpose",
}  # fmt: skip
"""Calls whose output holds the values of their first argument (in eval), moved or reshaped."""
SPLITS = {torch.chunk, torch.split, "chunk", "split"}
"""Calls that cut a tensor into a tuple of parts (an `operator.getitem` takes one)."""
CONCATS = {torch.cat, torch.concat, torch.concatenate}
_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_NON_NEGATIVE_CALLS = {
    torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax,
    F.softmax, "relu", "sigmoid", "softmax",
}  # fmt: skip
_SIGN_KEEPING_MODULES = (
    *SAME_VALUE_MODULES, QuantAct, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
)  # fmt: skip
_SIGN_KEEPING_CALLS = {
    *SAME_VALUE_CALLS, *SPLITS, *CONCATS, operator.getitem, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, torch.mean, "mean",
}  # fmt: skip


class LeafTracer(fx.Tracer):
    """Keeps quantized layers, quantizers and QuantActs whole: they become single graph nodes.
    It also applies the quantizers on module boundaries (`quant.sites`) of the modules it keeps
    whole (those of the others run inside their call), and records how often each module is
    called and which node each module call returned (`MODULE_CALLS`, `MODULE_RETURNS`)."""

    leaves: tuple[type[nn.Module], ...] = (*QUANTIZED_INPUT, QuantAct, Quantizer)

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.returns: dict[fx.Node, list[str]] = collections.defaultdict(list)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        path = self.path_of_module(m)
        self.calls[path] += 1
        leaf = self.is_leaf_module(m, path)
        for site in sites.input_sites(m) if leaf else []:
            args = site(m, args)
        out = super().call_module(m, forward, args, kwargs)
        for site in sites.output_sites(m) if leaf else []:
            out = site(m, args, out)
        if isinstance(out, fx.Proxy):
            self.returns[out.node].append(path)
        return out


def trace(model: nn.Module) -> fx.GraphModule:
    """A torch.fx graph of a deep copy of `model`, in eval mode (`model` is left untouched), its
    boundary quantizers as QuantAct nodes; `meta` holds the module calls and returns."""
    model = copy.deepcopy(model).eval()
    tracer = LeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types for code it cannot follow
        raise QatkdError(
            f"cannot trace {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); its forward must be a plain graph of "
            "modules and tensor ops, without data-dependent control flow"
        ) from e
    gm = fx.GraphModule(model, graph, type(model).__name__)
    sites.detach_all(gm)
    gm.meta[MODULE_CALLS] = tracer.calls
    gm.meta[MODULE_RETURNS] = dict(tracer.returns)
    return gm


def attribute(gm: fx.GraphModule, target: str) -> Any:
    """What a `get_attr` node with this target reads: a parameter, buffer or constant of `gm`."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def call_name(node: fx.Node) -> Any:
    """What a function or method node calls, as the `*_CALLS` sets name it (a function traced as
    a leaf, such as torchvision's stochastic depth, by its qualified name)."""
    target = node.target
    if node.op == "call_function" and getattr(target, "__module__", "").startswith("torchvision"):
        return f"{target.__module__}.{target.__name__}"
    return target


def calls(node: fx.Node, names: Collection[Any]) -> bool:
    """Whether `node` calls a function or method of `names`."""
    return node.op in ("call_function", "call_method") and call_name(node) in names


def global_pool_call(node: fx.Node) -> bool:
    """`F.adaptive_avg_pool2d(x, 1)` or a mean over dims 2 and 3: global average pooling."""
    if calls(node, {F.adaptive_avg_pool2d}):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if calls(node, {torch.mean, "mean"}):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, tuple | list) and sorted(dims) == [2, 3]
    return False


def same_value_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The node whose values `node` holds, moved, reshaped or cut (module doc), or None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return node.args[0] if isinstance(module, (*SAME_VALUE_MODULES, QuantAct)) else None
    if calls(node, SAME_VALUE_CALLS):
        return node.args[0]
    if node.target is operator.getitem and calls(node.args[0], SPLITS):
        return node.args[0].args[0]
    return None


def source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node whose value `node` is, up to shape and identity ops and re-quantization."""
    while (inner := same_value_input(gm, node)) is not None:
        node = inner
    return node


def _quantizer_groups(gm: fx.GraphModule) -> list[list[tuple[fx.Node, tuple[str, str]]]]:
    """Groups of (the node read, (module path, quantizer attribute)) that quantize the same
    tensor of `gm`, or tensors one concatenation joins (module doc), in graph order."""
    joined = _Joined()
    for node in gm.graph.nodes:
        if calls(node, CONCATS) and isinstance(node.args[0], list | tuple):
            parts = [source(gm, a) for a in node.args[0] if isinstance(a, fx.Node)]
            for part in parts:
                joined.union(part, node)
    groups: dict[fx.Node, list[tuple[fx.Node, tuple[str, str]]]] = collections.defaultdict(list)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, QUANTIZED_INPUT):
            attr = "input_quantizer"
        elif isinstance(module, QuantAct):
            attr = "quantizer"
        else:
            continue
        read = source(gm, node.args[0])
        groups[joined.find(read)].append((read, (str(node.target), attr)))
    return list(groups.values())


class _Joined:
    """Union-find over the tensors that one scale must serve."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, node: fx.Node) -> fx.Node:
        while self.parent.get(node, node) is not node:
            node = self.parent[node]
        return node

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def share_tensor_quantizers(model: nn.Module) -> int:
    """Make the quantizers of each tensor (or each group of joined tensors) one module (module
    doc); returns how many are read through more than one quantizer. Every quantizer gets its
    `tensor_hint`; one that serves several tensors, not all non-negative by construction, is
    made signed unless it is already initialised."""
    gm = trace(model)
    signs = _Signs(gm)
    shared = 0
    for group in _quantizer_groups(gm):
        uses = [use for _, use in group]
        quantizers = [getattr(model.get_submodule(path), attr) for path, attr in uses]
        keep = max(range(len(uses)), key=lambda i: (quantizers[i].bits, -i))
        path, attr = uses[0]
        kept = quantizers[keep]
        kept.tensor_hint = path if attr == "quantizer" else f"{path}.input"
        tensors = {read for read, _ in group}
        if len(tensors) > 1 and not bool(kept.initialized):
            kept.is_signed.fill_(not all(signs.non_negative(t) for t in tensors))
        for path, attr in uses:
            setattr(model.get_submodule(path), attr, kept)
        shared += len({id(q) for q in quantizers}) > 1
    return shared


class _Signs:
    """Which nodes of a trace are non-negative whatever the input: outputs of ReLU, sigmoid,
    softmax..., and of the ops that keep the sign of non-negative inputs (pooling, reshapes,
    concatenations, re-quantization)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.known: dict[fx.Node, bool] = {}

    def non_negative(self, node: fx.Node) -> bool:
        if node not in self.known:
            self.known[node] = self._decide(node)
        return self.known[node]

    def _decide(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if isinstance(module, _NON_NEGATIVE_MODULES):
                return True
            keeps = isinstance(module, _SIGN_KEEPING_MODULES)
        else:
            if calls(node, _NON_NEGATIVE_CALLS):
                return True
            keeps = calls(node, _SIGN_KEEPING_CALLS)
        if not keeps or not node.args:
            return False
        first = node.args[0]  # a tensor, or a concatenation's list of them
        inputs = list(first) if isinstance(first, list | tuple) else [first]
        return all(isinstance(n, fx.Node) and self.non_negative(n) for n in inputs)


def check_state_fits_shared_quantizers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise `QatkdError` where `state` (a state dict for `model`) gives one shared quantizer
    different values under its different names, or has none for a quantized pooling input or a
    placed quantizer (`quant.placement`): a checkpoint made before qatkd quantized each tensor
    once, or before it placed quantizers where the integer graph quantizes, which would load
    silently wrong or not at all."""
    names: dict[int, list[str]] = collections.defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Quantizer) and not module.is_weight:
            names[id(module)].append(name)
    for paths in names.values():
        for key in model.get_submodule(paths[0]).state_dict():
            values = [state.get(f"{path}.{key}") for path in paths]
            if any(v is None for v in values) or any(
                not torch.equal(v, values[0]) for v in values[1:]
            ):
                raise QatkdError(
                    "the checkpoint was made by a qatkd that quantized each layer input on its "
                    "own or placed fewer activation quantizers "
                    f"({paths[0]} and {paths[-1]} differ or are missing); run its training or "
                    "ptq again with this version"
                )
