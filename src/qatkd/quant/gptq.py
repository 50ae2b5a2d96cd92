"""GPTQ (Frantar et al., ICLR 2023) onto the student's own grid: the start of QAT that
`quant.init=gptq` asks for.

For a Linear layer with inputs x, GPTQ picks the integer codes of its weight W column by column
(input by input) to keep the layer's output on calibration inputs, not the weight, close to the
float one: each column is rounded to the nearest code, and its rounding error is spread over
the columns not yet quantized through the inverse of the inputs' Hessian H = E[x x^T]
(Optimal Brain Quantization's update in a fixed order, computed from the Cholesky factor of
H^-1, in lazy batches of columns). The grid is the layer's weight quantizer's own rule (groups,
bits, symmetric or asymmetric, float16 for a GGUF format), applied to each group of inputs when
GPTQ reaches it, to the group's columns as the earlier columns' errors left them, as the paper's
code does: a grid fixed from the original weight clips the columns those errors pushed past its
range (at W3 g128 on SmolLM2 that start scored perplexity 1,879 where round-to-nearest scored
352). The quantizer is left holding those grids, so the codes GPTQ picks are exactly the codes
it computes from the weight GPTQ leaves behind: codes * scale + offset.

`gptq` quantizes a model stage by stage (for an LLM, decoder block by decoder block): each
stage's Hessians are measured on the calibration batches with the earlier stages already
quantized, as the paper does, and each forward pass stops once the stage's layers have read
their inputs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from qatkd.errors import QatkdError
from qatkd.quant.base import Quantizer
from qatkd.quant.modules import QuantLinear

DAMP = 0.01
"""Added to H's diagonal, times its mean (the paper's dampening)."""
BLOCK = 128
"""Columns updated together before the error reaches the rest of the weight (lazy batches)."""


Grid = Callable[[Tensor], tuple[Tensor, Tensor]]
"""A weight `[out, in]` to the scale and offset `[out, in]` of its grid, group by group."""


@torch.no_grad()
def gptq_codes(
    weight: Tensor,
    hessian: Tensor,
    grid: Grid,
    group_widths: Sequence[int],
    qrange: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """The codes `[out, in]` GPTQ picks for `weight` given the Hessian `[in, in]` of the layer's
    inputs (module doc), on the grid `codes * scale + offset` that `grid` gives each group of
    inputs (`group_widths`, in order; one group: a grid per row) when GPTQ reaches it. Also
    returns the weight whose grid is the one used: each group's columns as they stood then. An
    input that was always zero has H's diagonal 1 there: rounded to nearest, its error spread
    nowhere."""
    qmin, qmax = qrange
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(DAMP * h.diagonal().mean())
    # Row i of the upper Cholesky factor of H^-1 (restricted to the columns from i on) carries
    # column i's error to the later columns, scaled by its diagonal entry.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = weight.double().clone()
    gridded = torch.empty_like(w)
    codes = torch.empty_like(w)
    columns = w.shape[1]
    group_starts = {int(sum(group_widths[:g])) for g in range(len(group_widths))}
    # A lazy batch ends at every group start too: a group's grid sees every earlier error.
    bounds = sorted(group_starts | set(range(0, columns, BLOCK)) | {columns})
    scale: Tensor
    offset: Tensor
    for start, end in itertools.pairwise(bounds):
        if start in group_starts:
            gridded[:, start:] = w[:, start:]
            scale, offset = (t.double() for t in grid(w.to(weight.dtype)))
        errors = torch.empty(w.shape[0], end - start, dtype=w.dtype, device=w.device)
        for i in range(start, end):
            codes[:, i] = torch.clamp(
                torch.round((w[:, i] - offset[:, i]) / scale[:, i]), qmin, qmax
            )
            error = (w[:, i] - (codes[:, i] * scale[:, i] + offset[:, i])) / u[i, i]
            w[:, i:end] -= error[:, None] * u[i, i:end]
            errors[:, i - start] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return codes, gridded.to(weight.dtype)


@torch.no_grad()
def gptq(model: nn.Module, batches: Sequence[Tensor], stages: Sequence[Sequence[str]]) -> None:
    """Set the weights of the `QuantLinear` layers named in `stages` (lists of module names, in
    the model's order) to GPTQ's codes on their quantizers' grids, stage by stage (module doc),
    with the Hessians of their inputs on `model(batch)` for each of `batches`. Each layer's
    weight becomes its dequantized codes, so its quantizer (a stored grid: lsq) computes exactly
    those codes. The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        for stage in stages:
            layers = {name: _grid_layer(model, name) for name in stage}
            for name, hessian in _hessians(model, batches, layers).items():
                layer, quantizer = layers[name], layers[name].weight_quantizer
                widths = quantizer.group_widths or [layer.in_features]
                codes, gridded = gptq_codes(
                    layer.weight, hessian, _grid_of(quantizer), widths, quantizer.qrange
                )
                quantizer.init_from(gridded)
                layer.weight.copy_(codes.to(gridded.dtype) * quantizer.scale + quantizer.offset)
    finally:
        model.train(was_training)


def _grid_of(quantizer: Quantizer) -> Grid:
    """The quantizer's grid rule (its `init_from`) as a function of the weight."""

    def grid(weight: Tensor) -> tuple[Tensor, Tensor]:
        quantizer.init_from(weight)
        return quantizer.scale, quantizer.offset

    return grid


def _grid_layer(model: nn.Module, name: str) -> QuantLinear:
    layer = model.get_submodule(name)
    if not isinstance(layer, QuantLinear) or layer.weight_quantizer.method != "lsq":
        raise QatkdError(
            f"{name}: GPTQ sets the codes of a Linear weight on a stored grid (quant.method=lsq); "
            f"this is a {type(layer).__name__} with {getattr(layer, 'weight_quantizer', None)}"
        )
    return layer


class _StageDone(Exception):
    """Raised by the last of a stage's input hooks: the rest of the forward pass is not needed."""


def _hessians(
    model: nn.Module, batches: Sequence[Tensor], layers: dict[str, QuantLinear]
) -> dict[str, Tensor]:
    """E[x x^T] of each layer's input rows over `batches` (float64, on the layer's device), read
    by forward pre-hooks; each pass stops when every layer has read its input."""
    sums = {
        name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
        for name, m in layers.items()
    }
    rows = dict.fromkeys(layers, 0)
    seen: set[str] = set()

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.T @ x
            rows[name] += x.shape[0]
            seen.add(name)
            if len(seen) == len(layers):
                raise _StageDone

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        for batch in batches:
            seen.clear()
            with contextlib.suppress(_StageDone):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / max(rows[name], 1) for name in layers}
