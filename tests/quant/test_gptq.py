"""GPTQ onto the student's own grid, against the paper's update written here in its plain form
(Optimal Brain Surgeon steps with the inverse Hessian downdated column by column), and against
round-to-nearest on correlated inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qatkd.errors import QatkdError
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.quant.gptq import _hessians, gptq


def reference_gptq(weight, hessian, quantizer):
    """Frantar et al.'s eq. (2)-(3) in a fixed column order: quantize column i, move every
    other column by -error_i / [H^-1]_ii * [H^-1]_i, then remove i from H^-1; at the start of
    each group of inputs, the quantizer's min-max grid of the weight as it then stands."""
    qmin, qmax = quantizer.qrange
    w = weight.double().clone()
    h = hessian.double() + 0.01 * hessian.double().diagonal().mean() * torch.eye(len(hessian))
    h_inv = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % quantizer.group_size == 0:
            quantizer.init_from(w.float())
            scale, offset = quantizer.scale.double(), quantizer.offset.double()
        codes[:, i] = torch.clamp(torch.round((w[:, i] - offset[:, i]) / scale[:, i]), qmin, qmax)
        error = w[:, i] - (codes[:, i] * scale[:, i] + offset[:, i])
        w -= torch.outer(error / h_inv[i, i], h_inv[i])
        h_inv -= torch.outer(h_inv[:, i], h_inv[i]) / h_inv[i, i]
    return codes


def correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features share a few latent factors, as a network's activations do."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, 8, generator=generator)
    mixing = torch.randn(8, features, generator=generator)
    return latent @ mixing + 0.1 * torch.randn(rows, features, generator=generator)


def rtn_layer(weight: torch.Tensor, asymmetric: bool, bits: int = 3) -> nn.Sequential:
    """A one-layer model holding `weight` on its quantizer's min-max (RTN) grid, groups of 32."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    config = QuantConfig(
        bits=f"W{bits}A16", method="lsq", group_size=32, asymmetric=asymmetric, init="rtn"
    )
    model = prepare(nn.Sequential(linear), config.model_copy(update={"first_last_bits": None}))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    model[0].weight_quantizer.init_from(weight)
    return model


def second_moment(x: torch.Tensor) -> torch.Tensor:
    return x.T.double() @ x.double() / len(x)


@pytest.mark.parametrize("asymmetric", (False, True))
def test_gptq_picks_the_codes_and_grids_of_the_papers_update(asymmetric):
    """176 inputs: lazy batches of columns (128 + 48), groups of 32 and a last one of 16; the
    same codes as the plain update, every one of them, on grids GPTQ's errors moved, which the
    quantizer then holds: it computes those codes from the weight GPTQ leaves."""
    torch.manual_seed(0)
    weight = torch.randn(12, 176)
    x = correlated_inputs(400, 176)
    model = rtn_layer(weight, asymmetric)
    rtn_scale = model[0].weight_quantizer.scale.clone()
    rtn_codes = model[0].weight_quantizer.quantize_int(weight)
    gptq(model, [x], [["0"]])
    layer, quantizer = model[0], model[0].weight_quantizer
    expected = reference_gptq(
        weight, second_moment(x), rtn_layer(weight, asymmetric)[0].weight_quantizer
    )
    codes = quantizer.quantize_int(layer.weight)
    assert torch.equal(codes, expected)
    assert torch.equal(codes * quantizer.scale + quantizer.offset, layer.weight)
    assert (codes != rtn_codes).float().mean() > 0.05  # the error moved codes: not RTN
    assert not torch.equal(quantizer.scale[:, 32:], rtn_scale[:, 32:])  # and later grids
    assert torch.equal(quantizer.scale[:, :32], rtn_scale[:, :32])  # not the first


@pytest.mark.parametrize("asymmetric", (False, True))
def test_gptq_output_error_is_below_round_to_nearest(asymmetric):
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    x = correlated_inputs(512, 64, seed=1)
    model = rtn_layer(weight, asymmetric)
    rtn = model[0].weight_quantizer(weight).detach()
    gptq(model, [x], [["0"]])

    def output_error(quantized: torch.Tensor) -> float:
        return float(((x @ weight.T - x @ quantized.T) ** 2).mean())

    assert output_error(model[0].weight.detach()) < 0.5 * output_error(rtn)


def test_an_input_that_is_always_zero_is_rounded_to_nearest():
    torch.manual_seed(2)
    weight = torch.randn(4, 32)
    x = correlated_inputs(100, 32, seed=2)
    x[:, 5] = 0
    model = rtn_layer(weight, asymmetric=False)
    rtn_codes = model[0].weight_quantizer.quantize_int(weight)
    gptq(model, [x], [["0"]])
    codes = model[0].weight_quantizer.quantize_int(model[0].weight)
    assert torch.equal(codes[:, 5], rtn_codes[:, 5])
    assert not torch.equal(codes, rtn_codes)


class Counted(nn.Module):
    """Counts its calls: the forward passes that went past the stage being measured."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_stages_are_quantized_in_order_on_the_quantized_earlier_stages():
    """Stage 2's Hessian is that of its inputs after stage 1 was quantized; each layer's weight
    becomes its codes on its quantizer's grid exactly; a pass stops after its stage."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), Counted(), nn.Linear(64, 32), Counted())
    config = QuantConfig(
        bits="W3A16", method="lsq", group_size=32, init="rtn", first_last_bits=None
    )
    prepare(model, config)
    batches = [correlated_inputs(20, 64, seed=s) for s in range(3)]
    calibrate(model, batches[:1], 1)
    model[2].calls = model[4].calls = 0
    original, rtn_quantizer = (
        model[3].weight.detach().clone(),
        copy.deepcopy(model[3].weight_quantizer),
    )
    gptq(model, batches, [["0"], ["3"]])
    assert (model[2].calls, model[4].calls) == (3, 0)  # each pass stops after its stage
    for layer in (model[0], model[3]):
        quantizer = layer.weight_quantizer
        assert torch.equal(quantizer(layer.weight), layer.weight)
    x = torch.cat(batches)
    inputs = torch.relu(model[0](x)).double()
    hessian = inputs.T @ inputs / len(inputs)
    expected = reference_gptq(original, hessian, rtn_quantizer)
    assert torch.equal(model[3].weight_quantizer.quantize_int(model[3].weight), expected)


@pytest.mark.parametrize(
    "config, found",
    [
        (QuantConfig(bits="W4A16", method="minmax", group_size=32, first_last_bits=None), None),
        (None, "Linear with None"),
    ],
    ids=["minmax", "not prepared"],
)
def test_gptq_needs_a_stored_grid(config, found):
    model = nn.Sequential(nn.Linear(32, 8))
    if config is not None:
        prepare(model, config)
        found = f"QuantLinear with {model[0].weight_quantizer}"
    with pytest.raises(QatkdError, match=r"0: GPTQ sets the codes .* on a stored grid") as e:
        gptq(model, [torch.randn(2, 32)], [["0"]])
    assert str(e.value).endswith(f"this is a {found}")


class Unreached(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the pass went on after every layer of the stage had read its input")


def test_each_layers_hessian_is_the_mean_of_its_input_rows_outer_products_in_float64():
    """Rows are the inputs' last dimension, over every batch; the pass stops at the stage's
    last layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), Unreached())
    prepare(model, QuantConfig(bits="W4A16", method="lsq", first_last_bits=None))
    batches = [torch.randn(2, 3, 8), torch.randn(1, 5, 8)]
    with torch.no_grad():
        inputs = {
            "0": torch.cat([b.reshape(-1, 8) for b in batches]).double(),
            "2": torch.cat([model[1](model[0](b)).reshape(-1, 6) for b in batches]).double(),
        }
    hessians = _hessians(model, batches, {"0": model[0], "2": model[2]})
    for name, x in inputs.items():
        assert hessians[name].dtype == torch.float64
        torch.testing.assert_close(hessians[name], x.T @ x / 11, rtol=1e-12, atol=0)
    one_row = torch.randn(1, 8)
    (hessian,) = _hessians(model, [one_row], {"0": model[0]}).values()
    torch.testing.assert_close(hessian, one_row.double().T @ one_row.double(), rtol=1e-12, atol=0)
