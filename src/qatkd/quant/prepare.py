"""`prepare`: swap a float model's layers for quantized ones, in place; and inspection helpers."""

from __future__ import annotations

import contextlib
from fnmatch import fnmatch

import torch
from torch import nn

from qatkd.errors import QatkdError
from qatkd.nn import QuantPoint
from qatkd.quant.base import Quantizer
from qatkd.quant.config import QuantConfig
from qatkd.quant.modules import (
    QuantAct,
    QuantConv2d,
    QuantGlobalAvgPool2d,
    QuantLinear,
    QuantSiLU,
)
from qatkd.quant.placement import place_quantizers, split_attention
from qatkd.quant.quantizers import DynamicBlockQuantizer, make_quantizer, matmul_nbits_block
from qatkd.quant.tensors import share_tensor_quantizers

CONFIG_ATTR = "qatkd_quant_config"
"""The attribute on a prepared model that holds its `QuantConfig`."""

DYNAMIC_LINEAR_ONLY = (
    "quant.act_method=dynamic simulates onnxruntime's int8 MatMulNBits kernels, which compute "
    "Linear layers only; quantize this model's activations with another method"
)

_QUANT_LAYERS: dict[type[nn.Module], type[QuantConv2d] | type[QuantLinear]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every `nn.Conv2d` / `nn.Linear` (exact types: a subclass may have its own forward),
    every global `nn.AdaptiveAvgPool2d` and every `QuantPoint` outside `config.skip` by its
    quantized counterpart, in place; where activations are quantized at fixed scales, put
    quantizers where the integer graph quantizes (`quant.placement`: residual adds,
    concatenations, squeeze-excite, SiLU, attention, ...); make the quantizers that read the
    same tensor one (`quant.tensors`; a model torch.fx cannot trace, such as a `transformers`
    LM, keeps one per layer input and gets no placed quantizers), and record `config` on the
    model. First/last layer = first/last Conv2d or Linear in `named_modules()` order, whether
    skipped or not. QuantPoints, pooling inputs and placed quantizers get 8 bits, or the
    activation bits if higher."""
    if is_quantized(model):
        raise QatkdError("the model is already quantized; prepare a fresh float model")
    config.check_grid()
    fixed_scales = config.act_bits != 16 and config.act_method_name != "dynamic"
    if fixed_scales:
        split_attention(model, lambda name: _skipped(name, config))
    layers = [(n, m) for n, m in model.named_modules() if n and type(m) in _QUANT_LAYERS]
    points = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantPoint)]
    pools = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1))
    ]
    edges = {layers[0][0], layers[-1][0]} if layers else set()
    targets = [(n, m) for n, m in layers if not _skipped(n, config)]
    if not targets:
        raise QatkdError(
            "the model has no Conv2d or Linear layer to quantize"
            + (f" outside the skip patterns {config.skip}" if layers else "")
        )
    for name, layer in targets:
        weight_bits, act_bits = config.weight_bits, config.act_bits
        if name in edges and config.first_last_bits is not None:
            weight_bits = _edge_bits(weight_bits, config.first_last_bits)
            act_bits = _edge_bits(act_bits, config.first_last_bits)
        if weight_bits != 16:  # a float model stays float
            weight_bits = _pattern_bits(name, config) or weight_bits
        group_size = config.group_size if isinstance(layer, nn.Linear) else None
        try:
            weight_q = make_quantizer(
                config.weight_method_name,
                weight_bits,
                layer.weight.shape,
                group_size,
                config.asymmetric and group_size is not None,
            )
        except QatkdError as e:
            raise QatkdError(f"{name}: {e}") from None
        weight_q.float16_scale = config.format is not None
        weight_q.minmax_start = config.init is not None
        input_q = _act_quantizer(config, act_bits)
        if isinstance(input_q, DynamicBlockQuantizer):
            input_q.block = _dynamic_block(name, layer, group_size)
        model.set_submodule(name, _QUANT_LAYERS[type(layer)].from_float(
            layer, _like(weight_q, layer.weight), _like(input_q, layer.weight)
        ))  # fmt: skip
    reference = next(model.parameters())

    def point_quantizer(name: str) -> Quantizer:
        quantizer = _act_quantizer(config, max(8, config.act_bits))
        if isinstance(quantizer, DynamicBlockQuantizer):
            raise QatkdError(f"{name}: {DYNAMIC_LINEAR_ONLY}")
        return _like(quantizer, reference)

    for name, _ in points:
        if not _skipped(name, config):
            model.set_submodule(name, QuantAct(point_quantizer(name)))
    for name, _ in pools:
        if not _skipped(name, config):
            model.set_submodule(name, QuantGlobalAvgPool2d(point_quantizer(name)))
    with contextlib.suppress(QatkdError):  # not traceable: one quantizer per layer input
        if fixed_scales:
            place_quantizers(model, point_quantizer, lambda name: _skipped(name, config))
        share_tensor_quantizers(model)
    setattr(model, CONFIG_ATTR, config)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Quantizer) for m in model.modules())


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The config `prepare` applied (save `config.model_dump()` with a checkpoint)."""
    return getattr(model, CONFIG_ATTR, None)


def quant_summary(model: nn.Module) -> str:
    """A table of the quantized layers: name, type, weight/activation bits, method, granularity."""
    rows = [("layer", "type", "w_bits", "a_bits", "method", "granularity")]
    for name, module in model.named_modules():
        if isinstance(module, QuantConv2d | QuantLinear):
            w, a = module.weight_quantizer, module.input_quantizer
            rows.append((
                name, type(module).__name__, str(w.bits), str(a.bits),
                f"{w.method}/{a.method}", w.granularity,
            ))  # fmt: skip
        elif isinstance(module, QuantAct | QuantGlobalAvgPool2d | QuantSiLU):
            q = module.quantizer if isinstance(module, QuantAct) else module.input_quantizer
            rows.append((name, type(module).__name__, "-", str(q.bits), q.method, q.granularity))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _act_quantizer(config: QuantConfig, bits: int) -> Quantizer:
    return make_quantizer(config.act_method_name, bits, zero_point_grid=config.act_zero_point(bits))


def _dynamic_block(name: str, layer: nn.Module, group_size: int | None) -> int:
    """The kernel block of a Linear whose input is quantized at run time (`dynamic`)."""
    if not isinstance(layer, nn.Linear):
        raise QatkdError(f"{name}: {DYNAMIC_LINEAR_ONLY}")
    try:
        return matmul_nbits_block(group_size or layer.in_features)
    except QatkdError as e:
        raise QatkdError(f"{name}: {e}") from None


def _skipped(name: str, config: QuantConfig) -> bool:
    return any(fnmatch(name, pattern) for pattern in config.skip)


def _pattern_bits(name: str, config: QuantConfig) -> int | None:
    """The weight bits of the first `layer_weight_bits` pattern that `name` matches."""
    return next((b for p, b in config.layer_weight_bits.items() if fnmatch(name, p)), None)


def _edge_bits(bits: int, first_last_bits: int) -> int:
    """First/last-layer bits, except that a float (16-bit) side stays float."""
    return bits if bits == 16 else first_last_bits


def _like(quantizer: Quantizer, reference: torch.Tensor) -> Quantizer:
    return quantizer.to(device=reference.device, dtype=reference.dtype)
