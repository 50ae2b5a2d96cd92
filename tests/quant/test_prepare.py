"""prepare / calibrate / checkpoints on torchvision models and tiny CNNs built here."""

from __future__ import annotations

import copy
import io
import sys
import warnings

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torchvision.models import mobilenet_v2, resnet18

from qatkd.errors import QatkdError
from qatkd.nn import QuantPoint
from qatkd.quant import (
    FloatQuantizer,
    QuantAct,
    QuantConfig,
    QuantConv2d,
    QuantGlobalAvgPool2d,
    QuantLinear,
    calibrate,
    is_quantized,
    prepare,
    quant_config_of,
    quant_summary,
)
from qatkd.quant.tensors import check_state_fits_shared_quantizers
from qatkd.tasks.classification.models import build_model


class TinyCNN(nn.Module):
    """conv-bn-relu x2 with a residual branch marked by QuantPoint, grouped conv, pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.shortcut = QuantPoint()
        self.branch = QuantPoint()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.branch(self.bn(self.grouped(x))) + self.shortcut(x))
        return self.fc(x.mean((2, 3)))


def float_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def bits_of(module: QuantConv2d | QuantLinear) -> tuple[int, int]:
    return module.weight_quantizer.bits, module.input_quantizer.bits


def test_resnet18_every_conv_and_linear_swapped_first_last_at_8_bits():
    model = resnet18(weights=None)
    names = float_layers(model)
    assert len(names) == 21
    prepare(model, QuantConfig(bits="W4A4"))
    modules = dict(model.named_modules())
    assert float_layers(model) == []
    assert [n for n, m in modules.items() if isinstance(m, QuantConv2d | QuantLinear)] == names
    assert bits_of(modules["conv1"]) == (8, 8)
    assert bits_of(modules["fc"]) == (8, 8)
    # the residual adds are integer adds (quant.placement): the input of a block without a
    # downsampling shortcut is their 8-bit operand, so the first conv reads it at 8 bits too
    shortcut_read = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert {n: bits_of(modules[n]) for n in names[1:-1]} == {
        n: (4, 8) if n.removesuffix(".conv1") in shortcut_read else (4, 4) for n in names[1:-1]
    }
    assert isinstance(modules["layer2.0.downsample.1"], nn.BatchNorm2d)
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert modules["layer1.0.conv1"].input_quantizer.step.grad is not None


def test_mobilenet_v2_depthwise_convs_swapped():
    model = mobilenet_v2(weights=None)
    names = float_layers(model)
    assert len(names) == 53
    prepare(model, QuantConfig(bits="W2A2", method="pact", weight_method="minmax"))
    modules = dict(model.named_modules())
    assert float_layers(model) == []
    depthwise = [
        m for m in modules.values()
        if isinstance(m, QuantConv2d) and m.groups == m.in_channels > 1
    ]  # fmt: skip
    assert len(depthwise) == 17
    assert bits_of(modules["features.0.0"]) == (8, 8)
    assert bits_of(modules["classifier.1"]) == (8, 8)
    assert bits_of(modules["features.1.conv.0.0"]) == (2, 2)
    assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_skip_patterns_keep_layers_float_without_moving_first_last():
    model = resnet18(weights=None)
    prepare(model, QuantConfig(bits="W4A4", skip=["layer4.*", "fc"]))
    modules = dict(model.named_modules())
    assert float_layers(model) == [
        n for n in float_layers(resnet18()) if n.startswith(("layer4", "fc"))
    ]
    assert bits_of(modules["conv1"]) == (8, 8)
    assert bits_of(modules["layer3.1.conv2"]) == (4, 4)


def test_first_last_bits_none_and_float_activations():
    model = prepare(TinyCNN(), QuantConfig(bits="W4A16", first_last_bits=None))
    assert bits_of(model.stem[0]) == (4, 16)
    model = prepare(TinyCNN(), QuantConfig(bits="W4A16"))
    assert bits_of(model.stem[0]) == (8, 16)
    assert isinstance(model.stem[0].input_quantizer, FloatQuantizer)


def test_layer_weight_bits_set_matching_weights_only_and_keep_a_float_model_float():
    config = QuantConfig(bits="W4A4", layer_weight_bits={"fc": 2, "stem.*": 3})
    model = prepare(TinyCNN(), config)
    assert bits_of(model.fc) == (2, 8)  # over first_last_bits, weights only
    assert bits_of(model.stem[0]) == (3, 8)
    assert model.grouped.weight_quantizer.bits == 4
    model = prepare(TinyCNN(), QuantConfig(bits="W16A16", layer_weight_bits={"fc": 8}))
    assert isinstance(model.fc.weight_quantizer, FloatQuantizer)
    with pytest.raises(ValidationError, match="'fc'"):
        QuantConfig(layer_weight_bits={"fc": 5})


@pytest.mark.parametrize(("bits", "point_bits"), [("W2A2", 8), ("W8A8", 8), ("W4A16", 16)])
def test_quant_points_become_quant_act(bits, point_bits):
    model = prepare(TinyCNN(), QuantConfig(bits=bits, skip=["shortcut"]))
    assert isinstance(model.branch, QuantAct)
    assert model.branch.quantizer.bits == point_bits
    assert type(model.shortcut) is QuantPoint


def test_group_size_applies_to_linear_weights_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 4), nn.Flatten(), nn.Linear(64, 32), nn.Linear(32, 4))
    prepare(model, QuantConfig(bits="W4A8", group_size=32))
    assert model[0].weight_quantizer.granularity == "channel"
    assert model[2].weight_quantizer.granularity == "group32"
    assert model[2].weight_quantizer.step.shape == (32, 2)
    assert model.train()(torch.randn(2, 3, 7, 7)).shape == (2, 4)


def test_asymmetric_grids_and_the_rtn_start_reach_the_grouped_weights():
    """`asymmetric` gives the grouped Linear weights offsets (a conv's per-channel weight keeps
    its symmetric grid); `init` makes learned grids start at min-max."""
    model = nn.Sequential(nn.Conv2d(3, 4, 4), nn.Flatten(), nn.Linear(64, 32))
    prepare(model, QuantConfig(bits="W4A8", group_size=32, asymmetric=True, init="rtn"))
    conv, linear = model[0].weight_quantizer, model[2].weight_quantizer
    assert (conv.asymmetric, linear.asymmetric) == (False, True)
    assert linear.minmax_start and linear.beta.shape == (32, 2)
    with pytest.raises(QatkdError, match=r"quant\.asymmetric gives weight groups an offset"):
        prepare(nn.Sequential(nn.Linear(64, 32)), QuantConfig(asymmetric=True))


def test_prepare_errors():
    model = prepare(TinyCNN(), QuantConfig())
    with pytest.raises(QatkdError) as error:
        prepare(model, QuantConfig())
    assert str(error.value) == "the model is already quantized; prepare a fresh float model"
    with pytest.raises(QatkdError, match=r"no Conv2d or Linear layer to quantize$"):
        prepare(nn.Sequential(nn.ReLU()), QuantConfig())
    with pytest.raises(QatkdError, match=r"outside the skip patterns \['\*'\]"):
        prepare(TinyCNN(), QuantConfig(skip=["*"]))


def test_dynamic_inputs_get_the_kernel_block_of_linear_layers_only():
    """Blocks follow the weight groups (per-row weights: the row); convolutions are refused."""
    dynamic = {"bits": "W4A8", "act_method": "dynamic", "first_last_bits": None}
    grouped = prepare(nn.Sequential(nn.Linear(576, 4)), QuantConfig(group_size=128, **dynamic))
    rows = prepare(nn.Sequential(nn.Linear(576, 4)), QuantConfig(**dynamic))
    assert (grouped[0].input_quantizer.block, rows[0].input_quantizer.block) == (128, 64)
    with pytest.raises(QatkdError, match=r"^stem\.0: quant\.act_method=dynamic simulates"):
        prepare(TinyCNN(), QuantConfig(**dynamic))
    with pytest.raises(QatkdError, match=r"^0: weight groups of 40 inputs are not a multiple"):
        prepare(nn.Sequential(nn.Linear(40, 4)), QuantConfig(**dynamic))


@pytest.mark.parametrize(
    "other", [QuantPoint(), nn.AdaptiveAvgPool2d(1)], ids=["quant-point", "pooling"]
)
def test_dynamic_inputs_refuse_quant_points_and_pooling_by_name(other):
    dynamic = {"bits": "W4A8", "act_method": "dynamic", "first_last_bits": None}
    with pytest.raises(QatkdError) as error:
        prepare(nn.Sequential(nn.Linear(32, 32), other), QuantConfig(**dynamic))
    assert str(error.value) == (
        "1: quant.act_method=dynamic simulates onnxruntime's int8 MatMulNBits kernels, which "
        "compute Linear layers only; quantize this model's activations with another method"
    )


def test_quantizers_follow_the_models_device_and_dtype():
    """A model built on another device (meta: no memory) and in float64 gets its quantizers
    there and in that dtype."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), QuantPoint(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.append(nn.Linear(4, 2)).to(device="meta", dtype=torch.float64)
    prepare(model, QuantConfig(bits="W4A4"))
    state = model.state_dict()
    assert sum("quantizer" in key for key in state) > 8
    assert all(t.device.type == "meta" for t in state.values())
    assert all(t.dtype in (torch.float64, torch.bool) for t in state.values())


def test_one_quantizer_per_tensor_round_trips_through_a_state_dict():
    """Every tensor read by several layers has one quantizer (block input: first conv, shortcut
    conv or shortcut point), and a fresh prepared model loads the trained values into it."""
    config = QuantConfig(bits="W4A4")

    def resnet() -> nn.Module:
        return prepare(build_model("resnet8", 1, 10, [0.5], [0.25]), config)

    model = resnet()
    model.train()(torch.rand(4, 1, 16, 16))
    first, second = model.net.layers[0], model.net.layers[1]
    assert first.conv1.input_quantizer is first.shortcut_point.quantizer
    assert second.conv1.input_quantizer is second.shortcut[0].input_quantizer
    # read by the 8-bit shortcut point as well: one quantizer at the higher bit-width
    assert first.conv1.input_quantizer.bits == 8
    assert second.conv1.input_quantizer.bits == first.conv2.input_quantizer.bits == 4
    fresh = resnet()
    fresh.load_state_dict(model.state_dict())
    assert fresh.net.layers[0].conv1.input_quantizer is fresh.net.layers[0].shortcut_point.quantizer
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_mobilenet_v2_adds_and_pooling_are_quantized():
    model = build_model("tv:mobilenet_v2", 3, 10, [0.5] * 3, [0.25] * 3)
    prepare(model, QuantConfig(bits="W4A4"))
    assert isinstance(model.net.avgpool, QuantGlobalAvgPool2d)
    block = model.net.features[3]  # the first block with a residual add
    assert block.use_res_connect
    assert block.shortcut_point.quantizer is block.conv[0][0].input_quantizer


def test_summary_config_and_flags():
    model = TinyCNN()
    assert not is_quantized(model) and quant_config_of(model) is None
    config = QuantConfig(bits="W4A4", method="lsq")
    prepare(model, config)
    assert is_quantized(model)
    assert quant_config_of(model) == config
    lines = quant_summary(model).splitlines()
    assert lines[0].split() == ["layer", "type", "w_bits", "a_bits", "method", "granularity"]
    assert lines[1].split() == ["stem.0", "QuantConv2d", "8", "8", "lsq/lsq", "channel"]
    # the grouped conv reads the tensor the shortcut also reads: one quantizer, at the higher bits
    assert lines[2].split() == ["grouped", "QuantConv2d", "4", "8", "lsq/lsq", "channel"]
    assert model.grouped.input_quantizer is model.shortcut.quantizer
    branch = ["branch", "QuantAct", "-", "8", "lsq", "tensor+zero_point"]
    assert branch in [line.split() for line in lines]
    assert len(lines) == 1 + 3 + 2


def test_summary_is_an_aligned_table_of_every_quantized_module():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), QuantPoint(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    prepare(model, QuantConfig(bits="W4A4", method="lsq", weight_method="minmax"))
    # the point and the conv after it read one tensor: one quantizer, at the higher bits
    assert quant_summary(model) == (
        "layer  type                  w_bits  a_bits  method      granularity\n"
        "0      QuantConv2d           8       8       minmax/lsq  channel\n"
        "2      QuantAct              -       8       lsq         tensor+zero_point\n"
        "3      QuantConv2d           4       8       minmax/lsq  channel\n"
        "4      QuantGlobalAvgPool2d  -       8       lsq         tensor+zero_point\n"
        "6      QuantLinear           8       8       minmax/lsq  channel"
    )


def test_global_average_pooling_is_quantized_whichever_way_its_size_is_written():
    """`AdaptiveAvgPool2d(1)` and `((1, 1))` are global pooling (an integer graph's
    QLinearGlobalAveragePool); other output sizes stay float."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d((1, 2)), nn.AdaptiveAvgPool2d(2),
        nn.AdaptiveAvgPool2d((1, 1)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    prepare(model, QuantConfig(bits="W4A4"))
    assert [type(m) for m in model[1:5]] == [nn.AdaptiveAvgPool2d] * 2 + [QuantGlobalAvgPool2d] * 2
    assert model.train()(torch.randn(2, 3, 6, 6)).shape == (2, 4)


def test_a_16_bit_model_computes_exactly_what_the_float_model_does():
    """W16A16 swaps every layer and quantizes nothing: the quantized layers keep the float ones'
    padding modes, strides, dilations, groups and biases (or none)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=2, dilation=2, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False, padding_mode="circular"),
        nn.Flatten(), nn.Linear(128, 4, bias=False), nn.Linear(4, 3),
    )  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    prepare(model, QuantConfig(bits="W16A16"))
    assert [type(m) for m in model] == [QuantConv2d, QuantConv2d, nn.Flatten] + [QuantLinear] * 2
    assert torch.equal(model(x), expected)


def test_prepare_draws_no_random_numbers_and_leaves_modes_as_they_were():
    """The quantized layers take over the float layers' parameters without initialising any of
    their own (a seeded run draws the same numbers with or without prepare), and every module
    keeps its train/eval mode."""
    model = TinyCNN().train()
    model.bn.eval()
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    prepare(model, QuantConfig(bits="W4A4"))
    assert torch.equal(torch.rand(4), expected)
    assert [n for n, m in model.named_modules() if not m.training] == ["bn"]


def test_a_format_puts_weight_scales_on_the_float16_grid():
    model = prepare(nn.Sequential(nn.Linear(64, 8)), QuantConfig(format="q4_0", method="lsq"))
    quantizer = model[0].weight_quantizer
    quantizer.init_from(model[0].weight.detach())
    step = quantizer.step.detach()
    assert not torch.equal(step, step.half().float())  # the learned step is off the grid
    assert torch.equal(quantizer.scale[:, ::32], step.half().float())


def batches(n: int, seed: int = 0, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 12, 12, generator=generator), torch.zeros(size)) for _ in range(n)
    ]


@pytest.mark.parametrize(("method", "bound"), [("minmax", 0.01), ("pact", 0.01), ("lsq", 0.01)])
def test_w8a8_stays_close_to_fp32(method, bound):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = batches(1, size=32)[0][0]  # one batch: LSQ and PACT initialise on the first they see
    reference = model(x)
    prepare(model, QuantConfig(bits="W8A8", method=method))
    calibrate(model, [x])
    assert (model(x) - reference).norm() / reference.norm() < bound


def test_calibrate_initialises_everything_and_restores_mode():
    model = prepare(TinyCNN(), QuantConfig(bits="W4A4", method="minmax")).train()
    consumed = []

    def stream():
        for batch in batches(10):
            consumed.append(batch)
            yield batch

    calibrate(model, stream(), num_samples=20)
    assert len(consumed) == 3  # 8 + 8 + 8 >= 20
    assert model.training
    assert all(m.initialized for n, m in model.named_modules() if n.endswith("quantizer"))
    stem = model.stem[0].input_quantizer  # 8 bits (the first layer): a grid with a zero point
    assert stem.signed  # normalised images have negatives
    assert stem.qrange[0] < 0 < stem.qrange[1]
    # min-max: the range of every batch
    assert torch.equal(stem.running_min, min(x.min() for x, _ in consumed))
    assert torch.equal(stem.running_max, max(x.max() for x, _ in consumed))
    assert not model.grouped.input_quantizer.signed  # after ReLU
    assert model.bn.num_batches_tracked == 0  # BatchNorm ran in eval mode


def test_calibrated_ranges_do_not_depend_on_how_the_samples_are_batched():
    # with quantization on while calibrating, each range held the rounding noise of the layers
    # before it, shaped by their ranges so far: batches of 2 and one batch of 16 disagreed
    torch.manual_seed(0)
    float_model, x = TinyCNN(), batches(1, size=16)[0][0]
    states = []
    for parts in (x.split(2), [x]):
        model = prepare(copy.deepcopy(float_model), QuantConfig(bits="W2A2", method="minmax"))
        calibrate(model, parts, len(x))
        states.append(model.state_dict())
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_calibration_runs_the_float_model():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = batches(1)[0][0]
    reference = model(x)
    quantized = prepare(copy.deepcopy(model), QuantConfig(bits="W2A2", method="minmax"))
    outputs = []
    quantized.fc.register_forward_hook(lambda m, i, out: outputs.append(out))
    calibrate(quantized, [x])
    torch.testing.assert_close(outputs[0], reference)


class ReadsWeightDirectly(nn.Module):
    """A forward that passes a layer's weight to a function (as torchvision's Swin attention
    did): the layer itself never runs, so its quantizers never see a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.proj = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3))
        return self.fc(nn.functional.linear(x, self.proj.weight, self.proj.bias))


def test_calibrate_names_the_quantized_layers_no_batch_reached():
    model = prepare(ReadsWeightDirectly(), QuantConfig(bits="W8A8", method="minmax"))
    with pytest.warns(UserWarning) as said:
        calibrate(model, batches(1))
    assert [w.filename for w in said] == [__file__]
    assert [str(w.message) for w in said] == [
        "calibration never ran 1 quantized layer(s) (proj): the eval forward does not call "
        "them, or reads their weights without calling them, which leaves those weights "
        "unquantized"
    ]


def test_calibrate_is_silent_when_every_quantized_layer_ran():
    model = prepare(TinyCNN(), QuantConfig(bits="W4A4", method="minmax"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(model, batches(1))


def test_inference_before_calibration_is_refused():
    model = prepare(TinyCNN(), QuantConfig()).eval()
    with pytest.raises(QatkdError, match="calibrate"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(QatkdError, match="prepare"):
        calibrate(TinyCNN(), batches(1))


@pytest.mark.parametrize("method", ["minmax", "lsq", "pact", "dorefa"])
def test_state_dict_round_trip_restores_identical_outputs(method):
    torch.manual_seed(0)
    config = QuantConfig(bits="W4A4", method=method)
    model = prepare(TinyCNN(), config)
    calibrate(model, batches(2), num_samples=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, _ in batches(2, seed=3):  # training moves steps, clips and running ranges
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(1)
    restored = prepare(TinyCNN(), QuantConfig(**config.model_dump()))
    restored.load_state_dict(state)
    x = batches(1, seed=5)[0][0]
    assert torch.equal(model.eval()(x), restored.eval()(x))


def test_fp32_state_dict_loads_into_prepared_model():
    float_model = TinyCNN()
    model = prepare(TinyCNN(), QuantConfig())
    result = model.load_state_dict(float_model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all("quantizer" in key for key in result.missing_keys)
    torch.testing.assert_close(model.stem[0].weight, float_model.stem[0].weight)


def test_a_checkpoint_from_before_shared_quantizers_is_refused():
    """Two values for one shared quantizer, or none for a pooling input: one line, no silent
    load of one of them."""
    model = prepare(build_model("resnet8", 1, 10, [0.5], [0.25]), QuantConfig(bits="W4A4"))
    model.train()(torch.rand(4, 1, 16, 16))
    state = model.state_dict()
    check_state_fits_shared_quantizers(model, state)
    old = dict(state)
    old["net.layers.0.shortcut_point.quantizer.step"] = torch.tensor(0.5)
    with pytest.raises(QatkdError, match="quantized each layer input on its own"):
        check_state_fits_shared_quantizers(model, old)
    old = {k: v for k, v in state.items() if not k.startswith("net.pool.")}
    with pytest.raises(QatkdError, match="run its training or ptq again"):
        check_state_fits_shared_quantizers(model, old)


def test_a_quantizer_that_refuses_a_layer_is_one_error_naming_the_layer(monkeypatch):
    """A registered quantizer may refuse a weight (its own QatkdError): `prepare` says which
    layer, so the user knows where to skip or change the method."""

    def refuse(method, bits, weight_shape=None, group_size=None, asymmetric=False):
        if weight_shape is not None:
            raise QatkdError("this method cannot quantize these weights")
        return make_quantizer_of_prepare(method, bits, weight_shape, group_size, asymmetric)

    prepare_module = sys.modules["qatkd.quant.prepare"]  # the package's `prepare` is the function
    make_quantizer_of_prepare = prepare_module.make_quantizer
    monkeypatch.setattr(prepare_module, "make_quantizer", refuse)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(QatkdError) as refused:
        prepare(model, QuantConfig(bits="W4A4", first_last_bits=None))
    assert str(refused.value) == "1: this method cannot quantize these weights"
