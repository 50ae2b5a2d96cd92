"""The int32 bias grid of the integer kernels, and aligning a model's biases to it.

An int8 conv / matmul kernel adds the bias inside its int32 accumulator, in units of
input_scale x weight_scale: it rounds the BatchNorm-folded bias, which training kept in float,
to that grid. The exporter makes the grid as fine as int8 allows without changing a value (weight
codes stored times 2^k, b-bit input codes shifted left by 8 - b, scales divided to
match), but at W8A8 nothing can be shifted and the grid stays near 1e-2 of an output step. The
rounding then flips output codes at near-ties, and the flips add up to a different top-1 on
0.2-0.4 % of test images (ResNet-20, Fashion-MNIST).

`align_biases` removes that gap on the model's side: it moves each BatchNorm shift (or the layer's
own bias where no BatchNorm follows) by less than half a grid step, so that the folded bias lies
on the grid. Only layers whose bias the graph holds as int32 are moved
(`onnx_export.int32_bias_layers`): a conv the runtime runs in float (its output is not
quantized, e.g. a stem whose output feeds two quantizers) keeps its exact float bias, since a
shift there would change the codes downstream. The PyTorch model and the integer graph then add
the same bias, and the change to the model is smaller than the rounding the kernel does anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Collection

import numpy as np
import torch
from torch import Tensor, nn

from qatkd.export.fold import FOLDED_BATCHNORM, fold_batchnorm
from qatkd.export.frozen import ActRange, FrozenLayer

INPUT_CODE_REACH = 255
"""The largest |input code - zero point| an int8 kernel multiplies (widened unsigned codes)."""


def int32_bias_fits(bias_codes: np.ndarray, weight_codes: np.ndarray) -> bool:
    """Whether a kernel's int32 accumulator holds each output's bias codes plus the largest sum
    of products any input can give it (255 times the sum of the output's |weight codes|): a
    bias past that would wrap around in the kernel."""
    magnitude = np.abs(weight_codes.astype(np.int64)).reshape(len(weight_codes), -1).sum(1)
    return bool((np.abs(bias_codes) + INPUT_CODE_REACH * magnitude).max() <= 2**31 - 1)


def input_shift(r: ActRange) -> int:
    """Left shift that moves b-bit input codes to the top of the 8-bit range: unsigned codes to
    [0, 255 - (2^(8-b) - 1)], signed ones to [-128, 127 - (2^(8-b) - 1)]."""
    return 8 - r.bits


def fine_input_scale(r: ActRange) -> float:
    """The input scale on the shifted grid: codes << shift times this is the same float value."""
    return float(np.float32(r.scale) / np.float32(2 ** input_shift(r)))


def spare_bits(codes: Tensor) -> int:
    """The largest k with codes * 2^k still in int8."""
    low, high = int(codes.min()), int(codes.max())
    k = 0
    while low * 2 ** (k + 1) >= -128 and high * 2 ** (k + 1) <= 127 and k < 7:
        k += 1
    return k


def fine_weight_scale(layer: FrozenLayer) -> np.ndarray:
    """Per-output-channel weight scale for codes stored times 2^spare_bits (float32)."""
    scale = layer.scale.detach().reshape(-1).numpy().astype(np.float32)
    return scale / np.float32(2 ** spare_bits(layer.codes))


def bias_scale(layer: FrozenLayer) -> np.ndarray | None:
    """The int32 bias grid of an integer kernel running `layer`, per output channel; None when
    the input stays float (then the bias does too)."""
    r = layer.input_range
    if r is None:
        return None
    return (np.float32(fine_input_scale(r)) * fine_weight_scale(layer)).astype(np.float32)


@torch.no_grad()
def align_biases(model: nn.Module, layers: Collection[str] | None = None) -> int:
    """Move `model`'s biases in place so that each quantized layer's folded bias lies on its int32
    grid (module doc); `layers`: only these (the exporter's `int32_bias_layers`: a layer the
    graph runs in float keeps its exact float bias). Returns how many layers were aligned.
    Aligning twice changes nothing."""
    folded = fold_batchnorm(model)
    batchnorm_of = folded.meta[FOLDED_BATCHNORM]
    aligned = 0
    for name, layer in folded.named_modules():
        if not isinstance(layer, FrozenLayer) or layer.bias is None:
            continue
        if layers is not None and name not in layers:
            continue
        grid = bias_scale(layer)
        if grid is None:
            continue
        bias = layer.bias.numpy()
        shift = torch.from_numpy((np.round(bias / grid) * grid - bias).astype(np.float32))
        # the folded bias is beta + (bias - mean) * k: a BN shift moves it one for one
        target = model.get_submodule(batchnorm_of.get(name, name))
        if target.bias is None:  # a BatchNorm without affine parameters has no shift to move
            continue
        target.bias += shift.to(target.bias.dtype)
        aligned += 1
    return aligned


def aligned_copy(model: nn.Module, layers: Collection[str] | None = None) -> nn.Module:
    """A copy of `model` with `align_biases(copy, layers)` applied: with the exporter's
    `int32_bias_layers`, the PyTorch model that the int8 graph computes."""
    model = copy.deepcopy(model)
    align_biases(model, layers)
    return model
