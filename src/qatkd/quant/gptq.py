"""GPTQ (Frantar et al., ICLR 2023) onto the student's own grid: the start of QAT that
`quant.init=gptq` asks for.

For a Linear layer with inputs x, GPTQ picks the integer codes of its weight W column by column
(input by input) to keep the layer's output on calibration inputs, not the weight, close to the
float one: each column is rounded to the nearest code, and its rounding error is spread over
the columns not yet quantized through the inverse of the inputs' Hessian H = E[x x^T]
(Optimal Brain Quantization's update in a fixed order, computed from the Cholesky factor of
H^-1, in lazy batches of columns). The grid is the layer's weight quantizer's own (`scale` and
`offset` in its stored form: groups, bits, symmetric or asymmetric, float16 for a GGUF format),
fixed before the pass, so the codes GPTQ picks are exactly the codes that quantizer computes
from the weight it leaves behind: codes * scale + offset.

`gptq` quantizes a model stage by stage (for an LLM, decoder block by decoder block): each
stage's Hessians are measured on the calibration batches with the earlier stages already
quantized, as the paper does, and each forward pass stops once the stage's layers have read
their inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from qatkd.errors import QatkdError
from qatkd.quant.modules import QuantLinear

DAMP = 0.01
"""Added to H's diagonal, times its mean (the paper's dampening)."""
BLOCK = 128
"""Columns updated together before the error reaches the rest of the weight (lazy batches)."""


@torch.no_grad()
def gptq_codes(
    weight: Tensor, hessian: Tensor, scale: Tensor, offset: Tensor, qrange: tuple[int, int]
) -> Tensor:
    """The codes `[out, in]` GPTQ picks for `weight` on the grid `codes * scale + offset`
    (`scale`, `offset`: `[out, in]`, codes in `qrange`), given the Hessian `[in, in]` of the
    layer's inputs (module doc). An input that was always zero has H's diagonal 1 there:
    rounded to nearest, its error spread nowhere."""
    qmin, qmax = qrange
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(DAMP * h.diagonal().mean())
    # Row i of the upper Cholesky factor of H^-1 (restricted to the columns from i on) carries
    # column i's error to the later columns, scaled by its diagonal entry.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = weight.double().clone()
    scale, offset = scale.double(), offset.double()
    codes = torch.empty_like(w)
    columns = w.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        errors = torch.empty(w.shape[0], end - start, dtype=w.dtype, device=w.device)
        for i in range(start, end):
            codes[:, i] = torch.clamp(
                torch.round((w[:, i] - offset[:, i]) / scale[:, i]), qmin, qmax
            )
            error = (w[:, i] - (codes[:, i] * scale[:, i] + offset[:, i])) / u[i, i]
            w[:, i:end] -= error[:, None] * u[i, i:end]
            errors[:, i - start] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return codes


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
                scale, offset = quantizer.scale, quantizer.offset
                codes = gptq_codes(layer.weight, hessian, scale, offset, quantizer.qrange)
                layer.weight.copy_(codes.to(scale.dtype) * scale + offset)
    finally:
        model.train(was_training)


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
