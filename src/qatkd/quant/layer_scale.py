"""Layer scales: a conv or linear layer's output times a parameter that varies along its output
channels at most (ConvNeXt's `layer_scale * block(x)`).

Such a product folds into the layer: gamma_c * (W_c x + b_c) = (gamma_c W_c) x + gamma_c b_c, so
the int8 graph multiplies the per-channel weight scales and the bias by gamma
(`qatkd.export.fold.fold_layer_scales`) and the layer's integer kernel writes the product
directly, quantized once, instead of a requantization of the layer's codes. `prepare` therefore
places the layer's output quantizer after the product (`quant.placement`), and training
simulates that graph. Only permutes may lie between the layer and the product: they move the
channel axis, which is followed; any other op ends the match.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor, fx, nn

from qatkd.quant.tensors import attribute, calls

MULS = {operator.mul, torch.mul, "mul"}
PERMUTES = {torch.permute, "permute"}

LayerChannels = Callable[[nn.Module], tuple[int, int] | None]
"""A layer's output channels and their axis counted from the end (-3 for a conv's NCHW, -1 for
a linear layer), or None for a module whose output cannot take a layer scale."""


def layer_scale(
    gm: fx.GraphModule, node: fx.Node, channels_of: LayerChannels
) -> tuple[fx.Node, fx.Node, Tensor] | None:
    """If `node` multiplies a layer's output (`channels_of` says what a layer is; called once,
    `node` its only reader, through permutes only) by a parameter or buffer that varies along the
    layer's output channels at most, and is nowhere 0: the layer's node, the product's tensor
    operand and the factor per output channel; else None."""
    if not (calls(node, MULS) and len(node.args) == 2 and not node.kwargs):
        return None
    operand, factor_node = node.args
    if isinstance(operand, fx.Node) and operand.op == "get_attr":
        operand, factor_node = factor_node, operand
    if not (isinstance(factor_node, fx.Node) and factor_node.op == "get_attr"):
        return None
    if not isinstance(operand, fx.Node):
        return None
    factor = attribute(gm, str(factor_node.target))
    if not isinstance(factor, Tensor) or not factor.is_floating_point() or (factor == 0).any():
        return None
    varying = [d - factor.dim() for d, n in enumerate(factor.shape) if n != 1]
    if len(varying) > 1:
        return None
    axis = varying[0] if varying else None  # counted from the end
    layer = operand
    while calls(layer, PERMUTES) and len(layer.users) == 1:
        dims = _permutation(layer)
        if dims is None:
            return None
        if axis is not None:
            axis = dims[len(dims) + axis] % len(dims) - len(dims)
        layer = layer.args[0]
        if not isinstance(layer, fx.Node):
            return None
    if layer.op != "call_module" or len(layer.users) != 1:
        return None
    if sum(n.op == "call_module" and n.target == layer.target for n in gm.graph.nodes) != 1:
        return None
    found = channels_of(gm.get_submodule(str(layer.target)))
    if found is None:
        return None
    channels, channel_axis = found
    if axis is None:
        return layer, operand, factor.detach().reshape(()).expand(channels)
    if axis != channel_axis or factor.numel() != channels:
        return None
    return layer, operand, factor.detach().reshape(channels)


def _permutation(node: fx.Node) -> list[int] | None:
    """The dims of `x.permute(*dims)`, `x.permute(dims)` or `torch.permute(x, dims)`, or None
    where they are not constants."""
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], list | tuple):
        dims = dims[0]
    return list(dims) if dims and all(isinstance(d, int) for d in dims) else None
