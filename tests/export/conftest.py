"""Tiny quantized models for the export tests, built and calibrated on random data in the test."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from qatkd.nn import Classifier
from qatkd.quant import QuantConfig, QuantConv2d, Quantizer, calibrate, prepare
from qatkd.tasks.classification.models import build_model

SIZE = 16


def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics, so folding has something to fold (negative gammas included)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=gen))
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)


@torch.no_grad()
def _make_dyadic(model: nn.Module, gen: torch.Generator) -> None:
    """Powers of two for every scale and BN factor, and biases on the int32 bias grid: then every
    float op in PyTorch and in the runtime is exact, and their quantized tensors must be equal
    bit for bit (a mismatch can only be a bug, never float rounding)."""
    for q in model.modules():
        if isinstance(q, Quantizer) and hasattr(q, "step"):
            q.step.copy_(2.0 ** torch.round(torch.log2(q.step)))
    named = dict(model.named_modules())
    for name, m in named.items():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        conv = next(
            c
            for n, c in reversed(list(named.items())[: list(named).index(name)])
            if isinstance(c, QuantConv2d)
        )
        c = m.num_features
        m.eps = 0.0
        m.running_var.copy_(4.0 ** torch.randint(-1, 2, (c,), generator=gen))
        sign = torch.randint(0, 2, (c,), generator=gen) * 2 - 1
        m.weight.data.copy_(2.0 ** torch.randint(-1, 2, (c,), generator=gen) * sign)
        m.running_mean.zero_()
        k = m.weight / m.running_var.sqrt()
        grid = conv.input_quantizer.scale * conv.weight_quantizer.scale.flatten() * k
        m.bias.data.copy_(torch.randint(-20, 21, (c,), generator=gen) * grid)
    for m in model.modules():
        if isinstance(m, QuantConv2d) and m.bias is not None:  # folded: beta + bias * k
            grid = m.input_quantizer.scale * m.weight_quantizer.scale.flatten()
            m.bias.data.copy_(torch.randint(-20, 21, m.bias.shape, generator=gen) * grid)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.copy_(torch.randint(-64, 64, m.bias.shape, generator=gen) / 64)


@pytest.fixture
def tiny_model() -> Callable[..., tuple[nn.Module, torch.Tensor]]:
    """`tiny_model(bits, dyadic=False, seed=0, name="resnet8", channels=1, size=SIZE)`: a
    calibrated quantized model (default a CIFAR ResNet-8 on 1x16x16 inputs; `name` a registry
    name or a `(in_channels, num_classes) -> network`), 10 classes, in eval mode, and a batch of
    32 inputs on the 1/256 pixel grid."""

    def make(
        bits: str,
        dyadic: bool = False,
        seed: int = 0,
        name: str | Callable[[int, int], nn.Module] = "resnet8",
        channels: int = 1,
        size: int = SIZE,
    ) -> tuple[nn.Module, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        mean, std = [0.5] * channels, [0.25] * channels
        model = (
            build_model(name, channels, 10, mean, std)
            if isinstance(name, str)
            else Classifier(name(channels, 10), mean, std)
        )
        _randomize_batchnorm(model, gen)
        prepare(model, QuantConfig(bits=bits, method="lsq"))
        x = torch.randint(0, 256, (64, channels, size, size), generator=gen).float() / 256
        calibrate(model, [x[:32], x[32:]], 64)
        if dyadic:
            _make_dyadic(model, gen)
        return model.eval(), x[:32]

    return make
