"""BatchNorm folding keeps the trained integer weight codes and the model's outputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from qatkd.export import fold_batchnorm
from qatkd.export.codes import OUTPUT_NAME, CodeMismatch
from qatkd.export.frozen import FrozenConv2d
from qatkd.quant import Quantizer
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
    """Real scales: the folded conv computes x * (w k) + b' where the model computes BN(x * w +
    b), so a value within float rounding of a tie of the next quantizer may take the neighbouring
    code: the first differing tensor is one step off, few codes differ, and the samples whose
    codes all agree have the same logits."""
    model, x = tiny_model("W8A8")
    expected, got = _activation_codes(model, x), _activation_codes(fold_batchnorm(model), x)
    assert expected.keys() == got.keys()
    mismatch = CodeMismatch()
    exact = mismatch.add(expected, got)
    figures = mismatch.figures()
    assert figures["codes_compared"] > 0
    assert figures["code_first_mismatch_max_diff"] <= 1, figures
    assert figures["code_mismatch_rate"] < 0.01, figures
    assert exact.mean() >= 0.9, figures
    np.testing.assert_allclose(got[OUTPUT_NAME][exact], expected[OUTPUT_NAME][exact], atol=1e-4)


@torch.no_grad()
def _activation_codes(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The codes of every activation quantizer by module name (folding keeps the names), in
    execution order, and the output under `OUTPUT_NAME`."""
    codes: dict[str, np.ndarray] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(m: Quantizer, _: object, out: torch.Tensor) -> None:
            codes.setdefault(name, torch.round(out / m.scale).numpy())

        return hook

    hooks = [
        m.register_forward_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, Quantizer) and not m.is_weight
    ]
    codes[OUTPUT_NAME] = model(x).numpy()
    for hook in hooks:
        hook.remove()
    return codes
