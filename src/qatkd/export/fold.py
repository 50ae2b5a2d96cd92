"""BatchNorm and layer-scale folding that keep the trained integer weights.

Training fake-quantizes the *unfolded* weight and applies BatchNorm after the conv. Folding BN into
the float weight and quantizing again would produce different codes than the ones trained. Instead
BN's per-channel factor k = gamma / sqrt(var + eps) goes into the per-channel weight *scale*
(scale' = scale * k) and into the bias (b' = beta + (b - mean) * k): the codes stay exactly the
trained ones and the output is the same up to float rounding. A layer scale (`quant.layer_scale`)
folds the same way in the int8 graph: its factor goes into the weight scale and the bias.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from qatkd.export.frozen import FrozenConv2d, FrozenLayer, freeze
from qatkd.quant.layer_scale import layer_scale

FOLDED_BATCHNORM = "folded_batchnorm"
"""Key of `GraphModule.meta` holding {conv module path: path of the BatchNorm folded into it}."""


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A frozen copy of `model` (see `qatkd.export.frozen.freeze`) with every BatchNorm2d that
    directly follows a conv (as that conv's only user) folded into it. A BatchNorm elsewhere stays,
    and the exporter writes it as BatchNormalization. `gm.meta[FOLDED_BATCHNORM]` maps each conv
    to the BatchNorm folded into it."""
    gm = freeze(model)
    gm.meta[FOLDED_BATCHNORM] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(
            gm.get_submodule(node.target), nn.BatchNorm2d
        ):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        conv = gm.get_submodule(source.target)
        if len(source.users) != 1 or not isinstance(conv, FrozenConv2d | nn.Conv2d):
            continue
        _fold_into(conv, gm.get_submodule(node.target))
        gm.meta[FOLDED_BATCHNORM][source.target] = node.target
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


@torch.no_grad()
def _fold_into(conv: FrozenConv2d | nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    mean, var = bn.running_mean, bn.running_var
    gamma = bn.weight if bn.affine else torch.ones_like(mean)
    beta = bn.bias if bn.affine else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    new_bias = beta + (bias - mean) * k
    if isinstance(conv, FrozenConv2d):
        conv.scale = conv.scale * k.view(-1, 1, 1, 1)
        conv.bias = new_bias
    else:
        conv.weight = nn.Parameter(conv.weight * k.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(new_bias)


def fold_layer_scales(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` (frozen, BN-folded) with each product of a frozen layer's output by a layer scale
    folded into the layer's weight scales and bias, in place: the int8 graph's form, where the
    layer's kernel writes the product at the quantizer `prepare` put after it. Not for a qpack,
    whose reader runs the model's own forward, product included."""
    for node in list(gm.graph.nodes):
        found = layer_scale(gm, node, _frozen_channels)
        if found is None:
            continue
        layer_node, operand, factor = found
        layer = gm.get_submodule(str(layer_node.target))
        with torch.no_grad():
            layer.scale = layer.scale * factor.view(-1, *[1] * (layer.scale.dim() - 1))
            if layer.bias is not None:
                layer.bias = layer.bias * factor
        node.replace_all_uses_with(operand)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _frozen_channels(module: nn.Module) -> tuple[int, int] | None:
    """A frozen layer's output channels and their axis, where its weight has one scale per
    output channel."""
    if not isinstance(module, FrozenLayer) or module.group_size is not None:
        return None
    if module.offset is not None:
        return None
    return module.codes.shape[0], -3 if isinstance(module, FrozenConv2d) else -1
