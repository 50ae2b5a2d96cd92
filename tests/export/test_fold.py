"""BatchNorm folding keeps the trained integer weight codes and the model's outputs."""

from __future__ import annotations

import torch
from torch import nn

from qatkd.export import fold_batchnorm
from qatkd.export.frozen import FrozenConv2d
from qatkd.tasks.classification.models import build_model


def test_folding_a_float_model_preserves_outputs():
    torch.manual_seed(0)
    model = build_model("vgg8", 3, 10, [0.5] * 3, [0.25] * 3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(-2, 2)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_folding_a_quantized_model_keeps_codes_and_outputs(tiny_model):
    model, x = tiny_model("W4A4", dyadic=True)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))  # dyadic: exact
    for name, m in folded.named_modules():
        if isinstance(m, FrozenConv2d):
            layer = model.get_submodule(name)
            trained = layer.weight_quantizer.quantize_int(layer.weight)
            assert torch.equal(m.codes.float(), trained), name


def test_folding_with_real_scales_is_exact_up_to_float_rounding(tiny_model):
    model, x = tiny_model("W8A8")
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(model)(x), model(x), rtol=1e-3, atol=1e-3)
