"""One quantizer per tensor: the integer graph quantizes a tensor once, with one scale, however
many integer kernels read it (a block input feeds its first conv, its shortcut and the residual
add). `share_tensor_quantizers` finds, on a torch.fx trace of a prepared model, the quantizers
that read the same tensor and makes them one module, so training simulates exactly that graph.

Reading the same tensor means the same value up to shape and identity ops (Flatten, view,
Dropout in eval, Identity) or through another quantizer of it (a `QuantAct` output quantized
again by a conv is the same codes). The shared quantizer keeps the highest bit-width of the group
(a block input that an 8-bit shortcut point also reads reaches the block's 4-bit conv at
8 bits), and its `tensor_hint` names it in the exported graph and in code parity.
"""

from __future__ import annotations

import collections
import copy

import torch
from torch import fx, nn

from qatkd.errors import QatkdError
from qatkd.quant.base import Quantizer
from qatkd.quant.modules import QuantAct, QuantConv2d, QuantGlobalAvgPool2d, QuantLinear

QUANTIZED_INPUT = (QuantConv2d, QuantLinear, QuantGlobalAvgPool2d)
"""Layers that hold the quantizer of the tensor they read, as `input_quantizer`."""
_SAME_VALUE_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
_SAME_VALUE_CALLS = {torch.flatten, torch.reshape, "flatten", "view", "reshape", "contiguous"}


class LeafTracer(fx.Tracer):
    """Keeps quantized layers, quantizers and QuantActs whole: they become single graph nodes."""

    leaves: tuple[type[nn.Module], ...] = (*QUANTIZED_INPUT, QuantAct, Quantizer)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """A torch.fx graph of a deep copy of `model`, in eval mode (`model` is left untouched)."""
    model = copy.deepcopy(model).eval()
    try:
        graph = LeafTracer().trace(model)
    except Exception as e:  # fx raises many types for code it cannot follow
        raise QatkdError(
            f"cannot trace {type(model).__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); its forward must be a plain graph of "
            "modules and tensor ops, without data-dependent control flow"
        ) from e
    return fx.GraphModule(model, graph, type(model).__name__)


def tensor_quantizer_uses(gm: fx.GraphModule) -> list[list[tuple[str, str]]]:
    """Groups of (module path, quantizer attribute) that quantize the same tensor of `gm`, in
    graph order."""
    groups: dict[fx.Node, list[tuple[str, str]]] = collections.defaultdict(list)
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
        groups[_source(gm, node.args[0])].append((str(node.target), attr))
    return list(groups.values())


def share_tensor_quantizers(model: nn.Module) -> int:
    """Make the quantizers of each tensor one module (module doc); returns how many tensors are
    read through more than one quantizer. Every quantizer gets its `tensor_hint`."""
    gm = trace(model)
    shared = 0
    for uses in tensor_quantizer_uses(gm):
        quantizers = [getattr(model.get_submodule(path), attr) for path, attr in uses]
        keep = max(range(len(uses)), key=lambda i: (quantizers[i].bits, -i))
        path, attr = uses[0]
        quantizers[keep].tensor_hint = path if attr == "quantizer" else f"{path}.input"
        for path, attr in uses:
            setattr(model.get_submodule(path), attr, quantizers[keep])
        shared += len({id(q) for q in quantizers}) > 1
    return shared


def _source(gm: fx.GraphModule, node: object) -> object:
    """The node whose value `node` is, up to shape and identity ops and re-quantization."""
    while isinstance(node, fx.Node) and node.args:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, (*_SAME_VALUE_MODULES, QuantAct)):
                break
        elif (
            node.op not in ("call_function", "call_method") or node.target not in _SAME_VALUE_CALLS
        ):
            break
        node = node.args[0]
    return node


def check_state_fits_shared_quantizers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise `QatkdError` where `state` (a state dict for `model`) gives one shared quantizer
    different values under its different names, or has none for a quantized pooling input: a
    checkpoint made before qatkd quantized each tensor once, which would load silently wrong."""
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
                    f"own ({paths[0]} and {paths[-1]} differ or are missing); run its training "
                    "or ptq again with this version"
                )
