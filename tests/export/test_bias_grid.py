"""Aligning biases to the integer kernels' int32 grid (`qatkd.export.bias_grid`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import fx, nn

from qatkd.export import (
    INPUT_NAME,
    align_biases,
    aligned_copy,
    fold_batchnorm,
    int32_bias_layers,
    load_runner,
)
from qatkd.export.bias_grid import (
    INPUT_CODE_REACH,
    bias_scale,
    fine_input_scale,
    int32_bias_fits,
    spare_bits,
)
from qatkd.export.fold import FOLDED_BATCHNORM
from qatkd.export.frozen import ActRange, FrozenLayer
from qatkd.export.onnx_graph import OPSET, GraphBuilder
from qatkd.quant import QuantConfig, calibrate, prepare


def _folded_biases(
    model: torch.nn.Module,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Folded bias, its int32 grid, and the float32 spacing of the largest term folding adds
    (beta and (b - mean) * k, whose rounding the bias carries), per quantized layer with an
    integer input."""
    out = {}
    folded = fold_batchnorm(model)
    for name, layer in folded.named_modules():
        if isinstance(layer, FrozenLayer) and layer.bias is not None:
            grid = bias_scale(layer)
            if grid is not None:
                terms = [layer.bias]
                if name in folded.meta[FOLDED_BATCHNORM]:
                    bn = model.get_submodule(folded.meta[FOLDED_BATCHNORM][name])
                    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    own = model.get_submodule(name).bias
                    own = torch.zeros_like(k) if own is None else own
                    terms += [bn.bias, (own - bn.running_mean) * k]
                largest = torch.stack([t.detach().abs() for t in terms]).amax(0).numpy()
                # |grid|: a negative BN gamma folds into a negative weight scale
                out[name] = (
                    layer.bias.numpy().astype(np.float64),
                    np.abs(grid).astype(np.float64),
                    np.spacing(largest.astype(np.float32)).astype(np.float64),
                )
    return out


@pytest.mark.parametrize("bits", ["W8A8", "W4A4", "W2A2"])
def test_aligned_biases_lie_on_the_grid_and_move_less_than_half_a_step(tiny_model, bits):
    model, _ = tiny_model(bits, seed=2)
    before = _folded_biases(model)
    assert align_biases(model) == len(before) == 10  # 9 convs (2 shortcuts) + the classifier
    after = _folded_biases(model)
    for name, (bias, grid, ulp) in after.items():
        # on the grid up to the float32 rounding of folding (beta - mean * k) again
        off_grid = np.abs(bias - np.round(bias / grid) * grid)
        assert np.all(off_grid <= np.maximum(0.01 * grid, 4 * ulp)), name
        moved = np.abs(bias - before[name][0])
        assert np.all(moved <= 0.51 * grid + 4 * ulp), name
    # the unaligned biases were not on the grid: the test exercises a real change
    off = [np.abs(b / g - np.round(b / g)).max() for b, g, _ in before.values()]
    assert max(off) > 0.1


def test_aligning_twice_changes_nothing(tiny_model):
    model, _ = tiny_model("W8A8", seed=3)
    once = aligned_copy(model)
    twice = aligned_copy(once)
    for (name, a), (_, b) in zip(
        once.state_dict().items(), twice.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_aligned_copy_leaves_the_model_untouched(tiny_model):
    model, _ = tiny_model("W4A4", seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    aligned_copy(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_grid_arithmetic():
    """4-bit inputs, unsigned or signed, move to the top of the 8-bit range (scale / 16);
    8-bit inputs stay."""
    assert fine_input_scale(ActRange(0.5, 0, 15, 4)) == 0.5 / 16
    assert fine_input_scale(ActRange(0.5, -8, 7, 4)) == 0.5 / 16
    assert fine_input_scale(ActRange(0.5, -128, 127, 8)) == 0.5
    assert spare_bits(torch.tensor([-8, 7])) == 4
    assert spare_bits(torch.tensor([-2, 1])) == 6
    assert spare_bits(torch.tensor([-128, 127])) == 0
    assert spare_bits(torch.tensor([-100, 10])) == 0  # the negative side binds: -200 < -128
    assert spare_bits(torch.tensor([-20, 5])) == 2  # -20 * 8 = -160: not 3
    assert spare_bits(torch.tensor([0, 0])) == 7


def test_an_int32_bias_fits_up_to_the_accumulators_largest_value_row_by_row():
    """Each output's bias codes plus 255 times the sum of its |weight codes| must be at most
    2^31 - 1, the largest int32; every output is its own accumulator."""
    largest = 2**31 - 1
    weights = np.array([[3, -4], [-2, 1]], dtype=np.int8)  # |.| sums 7 and 3
    exactly = largest - INPUT_CODE_REACH * 7
    assert int32_bias_fits(np.array([exactly, 0]), weights)
    assert int32_bias_fits(np.array([-exactly, 0]), weights)
    assert not int32_bias_fits(np.array([exactly + 1, 0]), weights)
    assert not int32_bias_fits(np.array([0, largest - INPUT_CODE_REACH * 3 + 1]), weights)
    # two outputs that each fit, but not the sum of both rows' products
    half = np.full((2, 1), largest // INPUT_CODE_REACH // 2 + 1, dtype=np.int64)
    assert int32_bias_fits(np.zeros(2, np.int64), half)
    assert not int32_bias_fits(np.zeros(2, np.int64), 2 * half)


def test_only_layers_with_an_int32_bias_are_aligned():
    """A conv whose output is read in float (here the network's output) runs in float: its bias
    is exact in the graph and must not move; the conv whose output is quantized gets int32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4),
    )  # fmt: skip
    model = prepare(model, QuantConfig(bits="W4A4", method="minmax")).eval()
    calibrate(model, [torch.rand(2, 1, 8, 8)], 2)
    model[4].bias.data.normal_()
    layers = int32_bias_layers(model, [1, 8, 8])
    assert layers == {"0"}
    head_shift = model[4].bias.detach().clone()
    copied = aligned_copy(model, layers)  # the copy honours `layers` as align_biases does
    assert torch.equal(copied[4].bias, head_shift)
    assert not torch.equal(copied[1].bias, model[1].bias)
    assert align_biases(model, layers) == 1
    assert torch.equal(model[4].bias, head_shift)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize(
    "r",
    [
        ActRange(0.25, -8, 7, 4),
        ActRange(0.5, 0, 15, 4),
        ActRange(1, -2, 1, 2),
        ActRange(0.25, -6, 9, 4),
    ],
    ids=["signed 4-bit", "unsigned 4-bit", "signed 2-bit", "4-bit at zero point 6"],
)
def test_widened_codes_are_the_codes_on_the_finer_grid_in_both_runtimes(tmp_path, backend, r):
    """What a conv reads (`GraphBuilder.qdq(widen=True)`): the codes shifted to the top of the
    8-bit range at a scale 2^(8-b) times finer, the same values exactly. Codes are stored in
    [0, 2^b) at zero point -qmin, which shifts with them: OpenVINO's BitShift saturates, so
    nothing may wrap."""
    builder = GraphBuilder(fx.symbolic_trace(nn.Identity()), quantized=True)
    out, fine = builder.qdq(INPUT_NAME, r, "t", widen=True)
    assert fine == r.scale / 2 ** (8 - r.bits)
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        builder.nodes,
        "widen",
        [value(INPUT_NAME, TensorProto.FLOAT, [None])],
        [value(out, TensorProto.FLOAT, [None])],
        builder.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "widen.onnx")
    x = np.linspace(-12, 20, 129, dtype=np.float32) * r.scale  # beyond both ends of the range
    expected = np.clip(np.round(x / r.scale), r.qmin, r.qmax) * r.scale
    got = load_runner(tmp_path / "widen.onnx", backend)(x)
    np.testing.assert_array_equal(got, expected.astype(np.float32))
