"""Each op handler writes the op it is registered for, in every form a trace records, and
computes what PyTorch does; a form it has no ONNX op for goes to torch.onnx's float export
(`torch_onnx_ops`), and nothing else does."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatkd.errors import QatkdError
from qatkd.export import INPUT_NAME, to_onnx, torch_onnx_ops_of
from qatkd.export.codes import (
    activation_codes,
    activation_quantizers,
    code_runner,
    pytorch_codes,
)
from qatkd.export.frozen import _check_int8
from qatkd.export.onnx_registry import (
    FUNCTION_OPS,
    MODULE_OPS,
    function_op,
    module_handler,
    module_op,
)
from qatkd.export.runtime import load_runner, ort_session
from qatkd.quant import (
    QuantAct,
    QuantConfig,
    QuantGlobalAvgPool2d,
    Quantizer,
    QuantSiLU,
    calibrate,
    prepare,
)
from qatkd.quant.quantizers import DynamicBlockQuantizer, MinMaxQuantizer

SHAPE = [4, 6, 6]


class Op(nn.Module):
    """`fn(self, x)` as a network, with `layers` for the modules it calls."""

    def __init__(self, fn: Callable[..., torch.Tensor], *layers: nn.Module) -> None:
        super().__init__()
        self.fn, self.layers = fn, nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def assert_runs_as_pytorch(
    model: nn.Module, proto: onnx.ModelProto, rtol: float, atol: float, err_msg: str = ""
) -> None:
    """onnxruntime running `proto` computes what `model` computes, on three seeded inputs."""
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort_session(proto.SerializeToString()).run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=err_msg)


def with_stats(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Statistics and (where affine) parameters away from the identity's."""
    gen = torch.Generator().manual_seed(0)
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    if bn.affine:
        bn.weight.data.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=gen))
    return bn


def first(s: Op, x: torch.Tensor) -> torch.Tensor:
    return s.layers[0](x)


class IntBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(3))


CASES = {
    "softmax, dim positional": (Op(lambda s, x: torch.softmax(x, 1)), []),
    "softmax, dim by keyword": (Op(lambda s, x: F.softmax(x, dim=-1)), []),
    "softmax, the method": (Op(lambda s, x: x.softmax(2)), []),
    "softmax to another dtype": (
        Op(lambda s, x: F.softmax(x, dim=1, dtype=torch.float64).float()),
        ["softmax", "float"],
    ),
    "softmax to another dtype, positional": (
        Op(lambda s, x: torch.softmax(x, 1, torch.float64).float()),
        ["softmax", "float"],
    ),
    "dropout in eval, positional": (Op(lambda s, x: F.dropout(x, 0.5, False) + 1), []),
    "dropout in eval, by keyword": (Op(lambda s, x: F.dropout(x, p=0.5, training=False) + 1), []),
    "average pool, padded, ceil mode, padding not counted": (
        Op(first, nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)),
        [],
    ),
    "average pool, padding counted": (Op(first, nn.AvgPool2d(3, 1, padding=1)), []),
    "average pool with a divisor": (Op(first, nn.AvgPool2d(3, 2, 1, divisor_override=5)), []),
    "average pool with a divisor, a 2 x 3 window": (
        Op(first, nn.AvgPool2d((2, 3), 2, divisor_override=5)),
        [],
    ),
    "average pool with a divisor, padding not counted": (
        Op(first, nn.AvgPool2d(3, 2, 1, count_include_pad=False, divisor_override=5)),
        [],
    ),
    "global average pool": (Op(first, nn.AdaptiveAvgPool2d(1)), []),
    "global average pool, (1, 1)": (Op(first, nn.AdaptiveAvgPool2d((1, 1))), []),
    "adaptive average pool to 2 x 1": (Op(first, nn.AdaptiveAvgPool2d((2, 1))), ["layers.0"]),
    "adaptive average pool to 1 x 2": (Op(first, nn.AdaptiveAvgPool2d((1, 2))), ["layers.0"]),
    "batch norm after a ReLU": (
        Op(lambda s, x: s.layers[0](torch.relu(x)), with_stats(nn.BatchNorm2d(4, eps=0.1))),
        [],
    ),
    "batch norm without affine parameters": (
        Op(first, with_stats(nn.BatchNorm2d(4, eps=0.1, affine=False))),
        ["layers.0"],
    ),
    "hardtanh": (Op(first, nn.Hardtanh(-0.5, 0.75)), []),
    "a float conv": (Op(first, nn.Conv2d(4, 3, 3, padding=1)), []),
    "a float conv without a bias": (Op(first, nn.Conv2d(4, 3, 3, bias=False)), []),
    "a dilated float conv": (Op(first, nn.Conv2d(4, 3, 3, padding=2, dilation=2)), []),
    "a float conv that pads by reflection": (
        Op(first, nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect")),
        ["layers.0"],
    ),
    "a float linear layer on the last dim": (Op(first, nn.Linear(6, 5)), []),
    "a float linear layer without a bias": (Op(first, nn.Linear(6, 5, bias=False)), []),
    "hardsigmoid, the module": (Op(lambda s, x: s.layers[0](4 * x), nn.Hardsigmoid()), []),
    "hardsigmoid, the function": (Op(lambda s, x: F.hardsigmoid(4 * x)), []),
    "relu6": (Op(first, nn.ReLU6()), []),
    "flatten from dim 1": (Op(lambda s, x: first(s, x) + 1, nn.Flatten()), []),
    "flatten from dim 1 to -1, the function": (Op(lambda s, x: torch.flatten(x, 1, -1) + 1), []),
    "flatten from dim 2": (Op(lambda s, x: first(s, x) + 1, nn.Flatten(2)), ["layers.0"]),
    "flatten, the function, from dim 2": (
        Op(lambda s, x: torch.flatten(x, 2) + 1),
        ["flatten"],
    ),
    "flatten, the method, from dim 0": (Op(lambda s, x: x.flatten() + 1), ["flatten"]),
    "flatten from dim 1 to 2": (Op(lambda s, x: x.flatten(1, 2) + 1), ["flatten"]),
    "flatten, the function, from dim 1 to 2 by keyword": (
        Op(lambda s, x: torch.flatten(x, start_dim=1, end_dim=2) + 1),
        ["flatten"],
    ),
    "max pool, dilated, ceil mode": (
        Op(first, nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True)),
        [],
    ),
    "mean over H and W": (Op(lambda s, x: x.mean((2, 3))), []),
    "mean over H and W, dims kept": (Op(lambda s, x: x.mean((2, 3), keepdim=True)), []),
    # placement (`quant.tensors.global_pool_call`) does not know the rank, so negative dims are
    # not global pooling to it: torch.onnx writes that mean
    "mean over dims -2 and -1": (Op(lambda s, x: x.mean((-2, -1)) + 1), ["mean"]),
    "mean over H and W, dims kept, positional": (Op(lambda s, x: x.mean((2, 3), True)), []),
    "adaptive average pool to 1, the function": (
        Op(lambda s, x: F.adaptive_avg_pool2d(x, 1) + 1),
        [],
    ),
    "mean over the channels": (Op(lambda s, x: x.mean(1) + 1), ["mean"]),
    "mean over dims 2 and 3 of a 5-D tensor": (
        Op(lambda s, x: x.unsqueeze(-1).mean((2, 3)) + 1),
        ["unsqueeze", "mean"],
    ),
    "permute, dims as a tuple": (Op(lambda s, x: x.permute((0, 2, 1, 3)) + 1), []),
    "permute, dims one by one": (Op(lambda s, x: x.permute(0, 3, 1, 2) + 1), []),
    "permute of a vector": (Op(lambda s, x: x.flatten().permute(0) + 1), ["flatten"]),
    "transpose by keyword": (
        Op(lambda s, x: torch.transpose(x, dim0=1, dim1=2) + 1),
        ["transpose"],
    ),
    "cat, default dim (not the batch's)": (
        Op(lambda s, x: torch.cat([x.transpose(0, 1), 2 * x.transpose(0, 1)]).transpose(0, 1)),
        [],
    ),
    "matmul": (Op(lambda s, x: x @ x.transpose(-1, -2)), []),
    "matmul, the function": (Op(lambda s, x: torch.matmul(x, x)), []),
    # a node that reads a number (no tensor) or an integer buffer has no integer handler
    "a product with a size of the input": (
        Op(lambda s, x: x * x.shape[1]),
        ["getattr", "getitem", "mul"],
    ),
    "a product with an integer buffer": (Op(lambda s, x: x * s.layers[0].k, IntBuffer()), ["mul"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_form_is_written_by_its_handler_or_by_torch_onnx_as_expected(case):
    model, expected_fallbacks = CASES[case]
    model.eval()
    proto = to_onnx(model, SHAPE, "fp32")
    assert torch_onnx_ops_of(proto) == expected_fallbacks
    assert_runs_as_pytorch(model, proto, rtol=1e-5, atol=1e-5)


def test_each_conv_states_its_kernel_strides_pads_dilations_and_group():
    """Written out, not left to ONNX's defaults or to inference from the weight: converters
    from ONNX (and people reading the graph) take them from the node."""
    layer = nn.Conv2d(4, 3, (3, 1), stride=(2, 1), padding=(2, 0), dilation=(2, 1))
    proto = to_onnx(Op(first, layer).eval(), SHAPE, "fp32")
    (conv,) = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute} == {
        "kernel_shape": [3, 1],
        "strides": [2, 1],
        "pads": [2, 0, 2, 0],
        "dilations": [2, 1],
        "group": 1,
    }


def test_an_average_pool_with_a_divisor_and_ceil_mode_is_refused_by_name():
    """No ONNX form divides the overhanging windows by the divisor: one line, not a wrong graph."""
    model = Op(first, nn.AvgPool2d(2, 2, divisor_override=3, ceil_mode=True)).eval()
    with pytest.raises(QatkdError, match=r"^layers\.0: an AvgPool2d with divisor_override and "):
        to_onnx(model, [4, 5, 5], "fp32")


def test_dropout_that_stays_on_in_eval_is_left_to_torch_onnx():
    """`F.dropout(x, p)` drops in eval too (training defaults to True): not the identity."""
    proto = to_onnx(Op(lambda s, x: F.dropout(x, 0.5)).eval(), SHAPE, "fp32")
    assert torch_onnx_ops_of(proto) == ["dropout"]


class Clamped(nn.Module):
    """A Hardtanh between two convolutions, read by the second one's signed input quantizer,
    whose power-of-two range (±0.25, from max |x| = 0.2) holds both bounds."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 1, 1), nn.BatchNorm2d(8))
        self.clamp = nn.Hardtanh(-0.1, 0.2)
        self.b = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.clamp(self.a(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
def test_a_clamp_moved_onto_the_codes_keeps_both_bounds(tiny_model, bits):
    """The Clip runs on the codes after the quantizer (`emit_commuting`), its bounds turned into
    codes: dyadic, so every code must equal PyTorch's, the ones each bound cuts too."""
    model, x = tiny_model(bits, dyadic=True, name=Clamped)
    expected = pytorch_codes(model, x)
    got = code_runner(to_onnx(model, [1, 16, 16]), expected, optimize=True)(x)
    for name, codes in expected.items():
        np.testing.assert_array_equal(got[name], codes, err_msg=name)


class Swish(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.a(x), 1), 1))


def test_a_quantized_silu_is_quantized_in_the_int8_graph_only(tiny_model):
    """QuantSiLU's input and gate quantizers become Q/DQ pairs in the int8 graph; the FP32
    graph of the same model (the speed reference) has none."""
    model, _ = tiny_model("W8A8", name=Swish)
    assert any(isinstance(m, QuantSiLU) for m in model.modules())
    for precision, quantized in (("int8", True), ("fp32", False)):
        proto = to_onnx(model, [1, 16, 16], precision)
        ops = [n.op_type for n in proto.graph.node]
        assert "Sigmoid" in ops and "Mul" in ops
        assert ("QuantizeLinear" in ops) == quantized and ("DequantizeLinear" in ops) == quantized
    # each quantized tensor's codes under its quantizer's name, the SiLU's input and gate too
    codes = activation_codes(to_onnx(model, [1, 16, 16]))
    assert set(codes) == set(activation_quantizers(model))


# -- quantizers placed by hand ------------------------------------------------------------------


def quantizer(step: float, signed: bool, bits: int = 8) -> MinMaxQuantizer:
    """An initialised activation quantizer of step `step` (a power of two: exact)."""
    q = MinMaxQuantizer(bits)
    q.is_signed.fill_(signed)
    q.running_absmax.fill_(step * q.qrange[1])
    q.initialized.fill_(True)
    assert float(q.scale) == step
    return q


def int8_matches_pytorch(model: nn.Module) -> None:
    model.eval()
    proto = to_onnx(model, SHAPE)
    assert_runs_as_pytorch(model, proto, rtol=0, atol=1e-6)


def test_the_relu_function_before_a_signed_quantizer_keeps_the_negative_codes_out():
    """The QuantizeLinear moves before the ReLU (`emit_commuting`): the Clip after it must cut
    the codes at that of 0, which a signed quantizer's range does not do by itself."""
    int8_matches_pytorch(Op(lambda s, x: s.layers[0](F.relu(x)), QuantAct(quantizer(2**-6, True))))


@pytest.mark.parametrize("second", ["at another scale", "in float"])
def test_a_concatenation_of_tensors_not_at_one_scale_is_a_float_concat(second):
    """Codes at two scales (or codes and floats) are no one tensor's codes: the Concat runs on
    the dequantized values."""
    layers = [QuantAct(quantizer(2**-6, True))]
    if second == "at another scale":
        layers.append(QuantAct(quantizer(2**-4, True)))
    else:
        layers.append(nn.Identity())
    int8_matches_pytorch(
        Op(lambda s, x: torch.cat([s.layers[0](x), s.layers[1](2 * x)], 1), *layers)
    )


class Factor(nn.Module):
    """A parameter that multiplies a tensor (ConvNeXt's layer scale)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(value)


def _times(shape: tuple[int, ...], first: bool = True, take: slice = slice(None)):
    """`q2(factor * q1(x))` (or `q2(q1(x) * factor)`), factor a parameter of `shape` cycling
    through powers of two of both signs (exact products), x cut to channels `take`."""
    values = torch.tensor([-0.5, 0.25, -2.0, 1.0, -1.0, 0.5]).repeat(24)[: int(np.prod(shape))]
    if first:
        fn = lambda s, x: s.layers[1](s.layers[2].value * s.layers[0](x[:, take]))  # noqa: E731
    else:
        fn = lambda s, x: s.layers[1](s.layers[0](x[:, take]) * s.layers[2].value)  # noqa: E731
    return Op(
        fn,
        QuantAct(quantizer(2**-5, True)),
        QuantAct(quantizer(2**-4, True)),
        Factor(values.reshape(shape)),
    )


def _with_zero() -> Op:
    model = _times((4, 1, 1))
    with torch.no_grad():
        model.layers[2].value[1] = 0.0
    return model


SCALED = {  # model, the DequantizeLinear's axis where the Mul folds into it, else None
    "channels": (_times((4, 1, 1)), 1),
    "channels, factor second": (_times((4, 1, 1), first=False), 1),
    "as many dims as the tensor": (_times((1, 4, 1, 1)), 1),
    "last axis": (_times((1, 1, 6)), 3),
    "one value": (_times((1,)), "none"),
    "two axes": (_times((4, 6, 1)), None),
    "widens the tensor": (_times((4, 1, 1), take=slice(0, 1)), None),
    "more dims than the tensor": (_times((1, 1, 1, 1, 6)), None),
    "a zero factor": (_with_zero(), None),
    "a factor times a number": (
        Op(
            lambda s, x: s.layers[1]((s.layers[2].value * 2.0) * s.layers[0](x)),
            QuantAct(quantizer(2**-5, True)),
            QuantAct(quantizer(2**-4, True)),
            Factor(torch.tensor([-0.5, 0.25, -2.0, 1.0]).reshape(4, 1, 1)),
        ),
        None,
    ),
}


@pytest.mark.parametrize("case", list(SCALED))
def test_a_dequantized_tensor_times_a_parameter_is_one_dequantize_at_scaled_steps(tmp_path, case):
    """Varying along one axis at most, the parameter scales the DequantizeLinear's step along
    it (a scalar scale where it is one value), negative factors included; in every case
    onnxruntime and OpenVINO compute what PyTorch does. (What the fold avoids, OpenVINO's wrong
    result for ConvNeXt's float Mul, needs a deeper graph: test_architectures' convnext.)"""
    model, axis = SCALED[case]
    proto = to_onnx(model.eval(), SHAPE)
    ops = [n.op_type for n in proto.graph.node]
    names = [n.name for n in proto.graph.node] + [i.name for i in proto.graph.initializer]
    assert not any("None" in name for name in names)  # named after the Mul's hint
    if axis is None:
        assert "Mul" in ops
    else:
        assert "Mul" not in ops
        second = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"][1]
        folded = next(n for n in proto.graph.node if n.output[0] == second.input[0])
        assert folded.op_type == "DequantizeLinear"
        axes = [a.i for a in folded.attribute if a.name == "axis"]
        dims = {i.name: list(i.dims) for i in proto.graph.initializer}
        assert axes == ([] if axis == "none" else [axis])
        assert dims[folded.input[1]] == dims[folded.input[2]]
        assert dims[folded.input[1]] == ([] if axis == "none" else [[4, 6, 6][axis - 1]])
    x = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    onnx.save(proto, tmp_path / "model.onnx")
    for backend in ("onnxruntime", "openvino"):
        got = load_runner(tmp_path / "model.onnx", backend, threads=1)(x.numpy())
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=backend)


class Quantized(nn.Module):
    """A QuantAct, a QuantSiLU and a QuantGlobalAvgPool2d in a row, their quantizers given."""

    def __init__(self, act: Quantizer, silu: Quantizer, gate: Quantizer, pool: Quantizer) -> None:
        super().__init__()
        self.act, self.silu, self.pool = (
            QuantAct(act),
            QuantSiLU(silu, gate),
            QuantGlobalAvgPool2d(pool),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.silu(self.act(x)))


@pytest.mark.parametrize("named", [False, True], ids=["module names", "tensor hints"])
def test_each_quantized_tensor_is_named_by_its_quantizers_hint_or_else_its_module(named):
    """The graph's activation codes are keyed as `activation_quantizers` keys the model's:
    by the quantizer's `tensor_hint` (`prepare` names shared tensors so), by its module where
    it has none."""
    quantizers = [quantizer(2**-5, True), quantizer(2**-5, True)]
    quantizers += [quantizer(2**-7, False), quantizer(2**-6, True)]
    if named:
        for i, q in enumerate(quantizers):
            q.tensor_hint = f"tensor{i}"
    model = Quantized(*quantizers).eval()
    expected = ["act", "silu.input", "silu.gate", "pool.input"]
    assert list(activation_quantizers(model)) == (
        [f"tensor{i}" for i in range(4)] if named else expected
    )
    assert set(activation_codes(to_onnx(model, SHAPE))) == set(activation_quantizers(model))


@pytest.mark.parametrize(
    "where", ["act", "silu.input_quantizer", "silu.gate_quantizer", "pool.input_quantizer"]
)
def test_a_tensor_quantized_at_run_time_is_refused_naming_its_quantizer(where):
    """An activation quantizer of the `dynamic` method has no fixed scale for a Q/DQ pair."""
    quantizers = {
        "act": quantizer(2**-5, True),
        "silu.input_quantizer": quantizer(2**-5, True),
        "silu.gate_quantizer": quantizer(2**-7, False),
        "pool.input_quantizer": quantizer(2**-6, True),
    }
    dynamic = quantizers[where] = DynamicBlockQuantizer(8)
    dynamic.block = SHAPE[-1]
    model = Quantized(*quantizers.values()).eval()
    message = (
        f"{where}: the input is quantized per row at run time (quant.act_method=dynamic), which "
        "only the genai export of a language model deploys (int8 MatMulNBits); this export has "
        "one fixed scale per tensor"
    )
    with pytest.raises(QatkdError, match=f"^{re.escape(message)}$"):
        to_onnx(model, SHAPE)


@pytest.mark.parametrize("shape", [[64], [3, 64]], ids=["Gemm", "MatMul"])
def test_a_linear_layer_with_weight_groups_is_refused_naming_it(shape):
    """Per-group scales have no per-channel DequantizeLinear, for either form of a Linear."""
    torch.manual_seed(0)
    model = prepare(
        nn.Sequential(nn.Linear(64, 6)),
        QuantConfig(bits="W4A8", method="minmax", first_last_bits=None, group_size=32),
    )
    calibrate(model, [torch.randn(8, *shape)], 8)
    with pytest.raises(QatkdError, match=r"^0: per-group weight scales \(group_size=32\) have "):
        to_onnx(model.eval(), shape)


def test_the_hardsigmoid_function_before_a_signed_quantizer_keeps_the_negative_codes_out():
    """Quantized, the hardsigmoid is x + 3 at 6 times the scale (`emit_hardsigmoid`), its codes
    clipped at those of 0 and 1: a signed quantizer's range holds codes below 0's."""
    int8_matches_pytorch(
        Op(lambda s, x: s.layers[0](F.hardsigmoid(4 * x)), QuantAct(quantizer(2**-7, True)))
    )


class Tripled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x


class Sextupled(Tripled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 6 * x


def leaky_relu(b, m: nn.LeakyReLU, x: str, hint: str) -> str:
    return b.emit("LeakyRelu", [x], hint, alpha=m.negative_slope)


def sigmoid(b, node, hint: str) -> str:
    return b.emit("Sigmoid", [b.names[node.args[0]]], hint)


def test_a_module_handler_takes_its_exact_type_and_subclasses_only_where_registered_so():
    module_op(Tripled)(leaky_relu)
    try:
        assert (module_handler(Tripled()), module_handler(Sextupled())) == (leaky_relu, None)
        module_op(Tripled, subclasses=True)(leaky_relu)
        assert module_handler(Sextupled()) == leaky_relu
    finally:
        del MODULE_OPS[Tripled]


def test_handlers_registered_for_a_new_layer_and_function_export_them():
    """The builder's extension point (`onnx_registry`): a handler for a module the trace keeps
    whole (torch.nn's) and one for a function."""
    model = Op(lambda s, x: torch.sigmoid(s.layers[0](x)), nn.LeakyReLU(0.25)).eval()
    assert torch_onnx_ops_of(to_onnx(model, SHAPE, "fp32")) == ["layers.0", "sigmoid"]
    module_op(nn.LeakyReLU)(leaky_relu)
    function_op(torch.sigmoid)(sigmoid)
    try:
        assert FUNCTION_OPS[torch.sigmoid] == (sigmoid, None)
        proto = to_onnx(model, SHAPE, "fp32")
    finally:
        del MODULE_OPS[nn.LeakyReLU], FUNCTION_OPS[torch.sigmoid]
    assert torch_onnx_ops_of(proto) == []
    assert_runs_as_pytorch(model, proto, rtol=1e-6, atol=1e-6)


def test_a_quantized_layer_without_a_bias_exports_in_both_precisions():
    torch.manual_seed(0)
    model = prepare(
        Op(first, nn.Conv2d(4, 3, 3, bias=False)), QuantConfig(bits="W8A8", first_last_bits=None)
    )
    # enough calibration that the test inputs' extremes are inside the input's [min, max] grid
    calibrate(model, [torch.randn(64, *SHAPE)], 64)
    model.eval()
    # the FP32 graph keeps the quantized weights and leaves the activations float
    for precision, atol in (("fp32", 0.05), ("int8", 1e-3)):
        proto = to_onnx(model, SHAPE, precision)
        assert_runs_as_pytorch(model, proto, rtol=0, atol=atol, err_msg=precision)


def test_a_layer_whose_input_is_quantized_at_run_time_is_refused_naming_its_quantizer():
    model = prepare(
        nn.Sequential(nn.Linear(64, 32)),
        QuantConfig(bits="W8A8", act_method="dynamic", first_last_bits=None),
    )
    message = r"^0\.input_quantizer: the input is quantized per row at run time "
    with pytest.raises(QatkdError, match=message):
        to_onnx(model.eval(), [64])


def test_a_quantizer_without_a_tensor_hint_names_the_codes_by_its_layer(tiny_model):
    """`prepare` names every quantized tensor; one whose quantizer lost its name is keyed as
    `activation_quantizers` keys it, by its layer."""
    model, _ = tiny_model("W8A8")
    model.net.conv1.input_quantizer.tensor_hint = None
    names = set(activation_quantizers(model))
    assert "net.conv1.input" in names
    assert set(activation_codes(to_onnx(model, [1, 16, 16]))) == names


def test_only_the_inputs_of_convolutions_and_linear_layers_are_widened(tiny_model):
    """At 4 bits the codes a conv or linear layer reads are shifted left onto a finer grid for
    its int32 bias (`GraphBuilder.qdq`); an add, a pooling or a product reads them as they are."""
    model, _ = tiny_model("W4A4")
    proto = to_onnx(model, [1, 16, 16])
    readers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    widened = [n.output[0] for n in proto.graph.node if n.op_type == "BitShift"]
    assert widened
    for codes in widened:
        dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and codes in n.input]
        assert dq and {op for n in dq for op in readers[n.output[0]]} <= {"Conv", "Gemm"}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    dq_of = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    plain = [n for n in proto.graph.node if n.op_type in ("Add", "GlobalAveragePool")]
    assert layers and plain
    for node in plain:  # the float inputs an add or pooling reads are no widened codes
        assert not {dq_of[i].input[0] for i in node.input if i in dq_of} & set(widened)
    # 4-bit tensors that no conv or linear layer reads
    quantizers = [quantizer(2**-2, True, 4), quantizer(2**-2, True, 4)]
    quantizers += [quantizer(2**-4, False, 4), quantizer(2**-3, True, 4)]
    ops = {n.op_type for n in to_onnx(Quantized(*quantizers).eval(), SHAPE).graph.node}
    assert "QuantizeLinear" in ops and "BitShift" not in ops


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x - 1


@pytest.mark.parametrize(
    ("model", "what"),
    [(TwoInputs(), "input"), (TwoOutputs(), "output"), (Op(lambda s, x: x.size()), "output")],
    ids=["in", "out", "out-no-tensor"],
)
def test_a_model_of_several_inputs_or_outputs_is_refused_in_one_line(model, what):
    with pytest.raises(QatkdError, match=f"^export supports models with a single {what} tensor$"):
        to_onnx(model.eval(), SHAPE, "fp32")


def test_the_input_and_output_share_one_symbolic_batch_dimension():
    """`pixels` and `logits` are [batch, ...] with the same `batch`: any batch size runs, and
    a consumer knows the output has as many rows as the input."""
    model = Named().eval()
    proto = to_onnx(model, SHAPE, "fp32")
    ends = [*proto.graph.input, *proto.graph.output]
    assert [v.type.tensor_type.shape.dim[0].dim_param for v in ends] == ["batch", "batch"]
    assert_runs_as_pytorch(model, proto, rtol=1e-5, atol=1e-5)  # a batch of 3


def test_exporting_leaves_the_global_random_state_as_it_was():
    """The example runs draw from a generator of their own: a user's seeded run goes on as if
    the export had not happened."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    to_onnx(Op(lambda s, x: x.mean((2, 3))).eval(), SHAPE, "fp32")
    assert torch.equal(torch.rand(3), expected)


def test_a_tensor_dequantized_from_codes_is_not_quantized_again_at_their_scale():
    """A concatenation of codes read by the quantizer that made them reads those codes: one
    QuantizeLinear a tensor (x and 2x), none for the concatenation."""
    q = quantizer(2**-5, True)
    model = Op(
        lambda s, x: s.layers[1](torch.cat([s.layers[0](x), s.layers[0](2 * x)], 1)),
        QuantAct(q),
        QuantAct(q),
    )
    proto = to_onnx(model.eval(), SHAPE)
    assert [n.op_type for n in proto.graph.node].count("QuantizeLinear") == 2
    int8_matches_pytorch(model)


@pytest.mark.parametrize("name", [None, Clamped], ids=["plain", "clamp-on-codes"])
def test_the_graph_holds_no_initializer_that_no_node_reads(tiny_model, name):
    """Dropping the float ops a QuantizeLinear moved before (the Clip and its bounds) also
    drops their constants."""
    model, _ = tiny_model("W4A4", **({"name": name} if name else {}))
    proto = to_onnx(model, [1, 16, 16])
    read = {name for node in proto.graph.node for name in node.input}
    assert [t.name for t in proto.graph.initializer if t.name not in read] == []


def test_an_operand_that_is_no_tensor_and_no_real_number_is_refused_by_its_type():
    model = Op(lambda s, x: torch.view_as_real(x * 1j)).eval()
    with pytest.raises(QatkdError, match=r"^mul\.operand: cannot export a complex operand$"):
        to_onnx(model, SHAPE, "fp32")


class Named(nn.Module):
    """Layers named as the graph's input and output are."""

    def __init__(self) -> None:
        super().__init__()
        self.pixels = nn.Conv2d(4, 4, 3, padding=1)
        self.logits = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.pixels(x)).relu() + 1


def test_layers_named_as_the_graphs_input_and_output_take_other_names():
    model = Named().eval()
    proto = to_onnx(model, SHAPE, "fp32")
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert_runs_as_pytorch(model, proto, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("layer", "config", "shape", "message"),
    [
        (
            nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
            QuantConfig(bits="W8A8", first_last_bits=None),
            [1, 6, 6],
            "only explicit zero padding can be exported",
        ),
        (
            nn.Conv2d(1, 2, 3, padding="same"),
            QuantConfig(bits="W8A8", first_last_bits=None),
            [1, 6, 6],
            "only explicit zero padding can be exported",
        ),
        (
            nn.Linear(4, 2),
            QuantConfig(bits="W16A8", first_last_bits=None),
            [4],
            "the weight is not quantized (16 bits); nothing to freeze",
        ),
        (
            nn.Linear(4, 2),
            QuantConfig(bits="W8A8", method="dorefa", first_last_bits=None),
            [4],
            "integer codes [-255, 255] do not fit 8 bits, so no int8 kernel can run them (DoReFa "
            "8-bit weights need 9); use another method or fewer bits",
        ),
    ],
    ids=["reflect padding", "same padding", "16-bit weights", "9-bit codes"],
)
def test_a_layer_that_no_int8_kernel_runs_is_refused_by_name(layer, config, shape, message):
    torch.manual_seed(0)
    model = prepare(nn.Sequential(layer), config)
    calibrate(model, [torch.randn(4, *shape)], 4)
    with pytest.raises(QatkdError, match=f"^0: {re.escape(message)}$"):
        to_onnx(model.eval(), shape)


class PerChannelActs(MinMaxQuantizer):
    """A user's activation method with a scale per channel (of 2)."""

    def _scale(self) -> torch.Tensor:
        return super()._scale() * torch.ones(1, 2, 1, 1)


class WideActs(MinMaxQuantizer):
    """A user's activation method with DoReFa's symmetric codes, [-255, 255] at 8 bits."""

    @property
    def qrange(self) -> tuple[int, int]:
        return -255, 255


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (PerChannelActs, "activation scales must be per tensor for export"),
        (WideActs, "integer codes [-255, 255] do not fit 8 bits"),
    ],
    ids=["per-channel", "9-bit codes"],
)
def test_a_users_input_quantizer_that_no_int8_kernel_reads_is_refused_by_name(method, message):
    torch.manual_seed(0)
    model = prepare(
        nn.Sequential(nn.Conv2d(2, 2, 3)), QuantConfig(bits="W8A8", first_last_bits=None)
    )
    model[0].input_quantizer = method(8)
    calibrate(model, [torch.randn(4, 2, 6, 6)], 4)
    with pytest.raises(QatkdError, match=f"^0\\.input_quantizer: {re.escape(message)}"):
        to_onnx(model.eval(), [2, 6, 6])


@pytest.mark.parametrize(
    ("qmin", "qmax", "fits"),
    [(-128, 127, True), (0, 255, True), (-129, 127, False), (0, 256, False), (-1, 128, False)],
)
def test_codes_fit_8_bits_signed_or_unsigned_but_not_both_at_once(qmin, qmax, fits):
    if fits:
        _check_int8(qmin, qmax, "q")
    else:
        with pytest.raises(QatkdError, match=rf"^q: integer codes \[{qmin}, {qmax}\] do not fit"):
            _check_int8(qmin, qmax, "q")
