"""The int8 ONNX graph computes exactly what the fake-quantized PyTorch model computes."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

from qatkd.errors import QatkdError
from qatkd.export import (
    INPUT_NAME,
    align_biases,
    class_names_of,
    fused_ops,
    int32_bias_layers,
    to_onnx,
    torch_onnx_ops_of,
)
from qatkd.export.codes import (
    CodeMismatch,
    activation_codes,
    activation_quantizers,
    code_runner,
    pytorch_codes,
)
from qatkd.export.runtime import ort_session
from qatkd.quant import QuantConfig, QuantConv2d, Quantizer, QuantLinear, prepare

SHAPE = [1, 16, 16]


@pytest.mark.parametrize("bits", ["W8A8", "W4A4", "W2A2"])
@pytest.mark.parametrize("optimize", [False, True], ids=["qdq", "int8-kernels"])
def test_integer_exact_on_every_quantized_tensor(tiny_model, bits, optimize):
    """Dyadic model (conftest): no float rounding anywhere, so codes and logits must be equal on
    any CPU. Without VNNI this holds only in onnxruntime's precise int8 mode, which `ort_session`
    sets there (`PRECISE_INT8`): the default u8 x s8 kernels saturated 16-bit pair sums and were
    up to 56 codes off at W8A8 on an AMD EPYC with AVX2 only."""
    model, x = tiny_model(bits, dyadic=True)
    expected = pytorch_codes(model, x)
    got = code_runner(to_onnx(model, SHAPE), expected, optimize)(x)
    assert len(expected) == 15  # 14 quantized tensors (each once, whatever reads it) + logits
    for name, codes in expected.items():
        np.testing.assert_array_equal(got[name], codes, err_msg=name)


@pytest.mark.parametrize(
    "kwargs, optimize", [({}, True), ({"optimize": True}, True), ({"optimize": False}, False)]
)
def test_the_codes_come_from_the_int8_kernels_unless_the_qdq_graph_is_asked_for(
    tiny_model, monkeypatch, kwargs, optimize
):
    """Both give the same codes on an exact model, so which one ran is read from the session's
    settings: int8 kernels (all graph optimizations) by default, as deployed."""
    asked = []

    def session(*args: Any, **options: Any) -> Any:
        asked.append(options.get("optimize", True))
        return ort_session(*args, **options)

    monkeypatch.setattr("qatkd.export.codes.ort_session", session)
    model, x = tiny_model("W8A8", dyadic=True)
    code_runner(to_onnx(model, SHAPE), pytorch_codes(model, x), **kwargs)
    assert asked == [optimize]


@pytest.mark.parametrize("bits", ["W8A8", "W4A4", "W2A2"])
@pytest.mark.parametrize("seed", [1, 2])
def test_aligned_model_matches_the_kernels_codes_within_one_rounding_step(tiny_model, bits, seed):
    """Real (non-dyadic) scales, biases on the int32 grid (`align_biases`): PyTorch sums float
    products, the kernel sums integers, so near a tie a code may differ by one step (seen on an
    AMD EPYC with AVX-512 VNNI: 1 code of 131,072; on one with AVX2 only: 0.03 % of all codes
    once the first flips travel downstream, in 3 of 32 samples). The bound: the first differing
    tensor is at most one step off, fewer than 0.1 % of the codes differ, and every sample whose
    codes all agree has the same logits."""
    model, x = tiny_model(bits, seed=seed)
    align_biases(model, int32_bias_layers(model, SHAPE))
    expected = pytorch_codes(model, x)
    got = code_runner(to_onnx(model, SHAPE), expected)(x)
    mismatch = CodeMismatch()
    exact = mismatch.add(expected, got)
    figures = mismatch.figures()
    assert figures["codes_compared"] == sum(c.size for n, c in expected.items() if n != "logits")
    assert figures["code_first_mismatch_max_diff"] <= 1, figures
    assert figures["code_mismatch_rate"] < 0.1, figures
    assert exact.mean() >= 0.75, figures  # and the logits check below is not vacuous
    np.testing.assert_allclose(got["logits"][exact], expected["logits"][exact], rtol=0, atol=1e-4)


def test_code_mismatch_of_equal_codes_is_zero_with_no_first_mismatch():
    codes = {"logits": np.zeros((2, 10)), "a": np.arange(8.0).reshape(2, 4)}
    mismatch = CodeMismatch()
    np.testing.assert_array_equal(mismatch.add(codes, dict(codes)), [True, True])
    assert mismatch.figures() == {
        "codes_compared": 8,
        "code_mismatch_rate": 0.0,
        "code_max_diff": 0.0,
        "code_first_mismatch": None,
        "code_first_mismatch_max_diff": 0.0,
    }


def test_code_mismatch_takes_the_first_differing_tensor_of_a_batch_only():
    codes = {"logits": np.zeros((1, 10)), "a": np.zeros((1, 2)), "b": np.zeros((1, 2))}
    got = {**codes, "a": np.array([[1.0, 0.0]]), "b": np.array([[3.0, 0.0]])}
    mismatch = CodeMismatch()
    mismatch.add(codes, got)
    figures = mismatch.figures()
    assert (figures["code_first_mismatch"], figures["code_first_mismatch_max_diff"]) == ("a", 1.0)
    assert figures["code_max_diff"] == 3.0


def test_code_mismatch_rate_of_a_single_code():
    mismatch = CodeMismatch()
    mismatch.add({"logits": np.zeros((1, 1)), "a": np.zeros((1, 1))}, {"a": np.ones((1, 1))})
    assert mismatch.figures()["code_mismatch_rate"] == 100.0


def test_code_mismatch_counts_differences_and_finds_the_first():
    # the logits first: they are skipped, and the tensors after them still compared
    codes = {"logits": np.zeros((2, 10)), "a": np.zeros((2, 4)), "b": np.zeros((2, 3))}
    got = {"a": np.zeros((2, 4)), "b": np.array([[0, 1, 0], [0, 0, 0]]), "logits": codes["logits"]}
    got["b"] = got["b"] * 1.0
    later = {**got, "a": np.array([[0, 0, 0, 0], [2, 0, 0, 0]]) * 1.0}
    mismatch = CodeMismatch()
    np.testing.assert_array_equal(mismatch.add(codes, got), [False, True])
    np.testing.assert_array_equal(mismatch.add(codes, later), [False, False])
    assert mismatch.figures() == {
        "codes_compared": 28,
        "code_mismatch_rate": 100 * 3 / 28,
        "code_max_diff": 2.0,
        "code_first_mismatch": "b",
        "code_first_mismatch_max_diff": 2.0,
    }


def test_unaligned_biases_flip_codes_at_w8a8(tiny_model):
    """Why the alignment exists: without it the kernel's bias rounding changes some codes."""
    model, x = tiny_model("W8A8", seed=1)
    expected = pytorch_codes(model, x)
    got = code_runner(to_onnx(model, SHAPE), expected)(x)
    flipped = sum(int((got[n] != c).sum()) for n, c in expected.items() if n != "logits")
    assert flipped > 0


def test_qdq_around_every_quantized_layer(tiny_model):
    model, _ = tiny_model("W4A4")
    proto = to_onnx(model, SHAPE, metadata={"class_names": [f"c{i}" for i in range(10)]})
    producer = {out: node for node in proto.graph.node for out in node.output}
    inits = {t.name: t for t in proto.graph.initializer}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    quantized = [m for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    assert len(layers) == len(quantized) == 10
    for node in layers:
        x_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        assert x_dq.op_type == w_dq.op_type == "DequantizeLinear", node.name
        chain = producer[x_dq.input[0]]
        while chain.op_type in ("Clip", "BitShift", "Flatten"):  # the classifier's: codes
            chain = producer[chain.input[0]]
        assert chain.op_type == "QuantizeLinear", node.name
        assert inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8, node.name
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == len(activation_quantizers(model)) == 14  # each tensor once
    # the metadata names every quantized tensor's codes: uint8 at zero point -qmin, 0 for
    # unsigned codes, nonzero for signed ones (the residual adds' operands: 128 on a symmetric
    # grid, an even z on one with a zero point)
    codes, quantizers = activation_codes(proto), activation_quantizers(model)
    assert set(codes) == set(quantizers)
    assert any(q.signed for q in quantizers.values())
    for hint, (tensor, zero_point) in codes.items():
        assert producer[tensor].op_type in ("QuantizeLinear", "Clip", "Flatten"), hint
        qmin = quantizers[hint].qrange[0]
        assert zero_point == -qmin and zero_point % 2 == 0, hint
    assert class_names_of(proto) == [f"c{i}" for i in range(10)]
    assert proto.graph.input[0].name == INPUT_NAME


@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
def test_onnxruntime_runs_int8_kernels(tiny_model, tmp_path, bits):
    model, _ = tiny_model(bits)
    onnx.save(to_onnx(model, SHAPE), tmp_path / "m.onnx")
    ops = fused_ops(tmp_path / "m.onnx")
    integer = {"QLinearConv": 9, "QLinearAdd": 3, "QLinearGlobalAveragePool": 1, "QGemm": 1}
    assert {op: ops.get(op) for op in integer} == integer, ops
    assert ops.get("QuantizeLinear") == 1, ops  # the input, after the in-graph normalisation
    float_ops = {"Conv", "FusedConv", "Add", "Relu", "GlobalAveragePool", "DequantizeLinear"}
    assert not float_ops & set(ops), ops


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:mobilenet_v2"])
def test_torchvision_models_run_entirely_on_integer_kernels(tiny_model, tmp_path, name):
    """Stem, max pooling, every residual add (with its ReLU or none), ReLU6 and the global
    pooling run as integer kernels, with one QuantizeLinear at the input; dyadic, so every code
    is PyTorch's exactly."""
    shape = [3, 32, 32]
    model, x = tiny_model("W8A8", dyadic=True, name=name, channels=3, size=shape[-1])
    proto = to_onnx(model, shape)
    onnx.save(proto, tmp_path / "m.onnx")
    ops = fused_ops(tmp_path / "m.onnx")
    assert ops.get("QuantizeLinear") == 1, ops
    float_ops = {"Conv", "FusedConv", "Add", "Relu", "MaxPool", "DequantizeLinear"}
    assert not float_ops & set(ops), ops
    producer = {out: node for node in proto.graph.node for out in node.output}
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]  # ReLU6 on the codes
    assert all(producer[n.input[0]].op_type == "QuantizeLinear" for n in clips)
    expected = pytorch_codes(model, x[:4])
    got = code_runner(proto, expected)(x[:4])
    for name, codes in expected.items():
        np.testing.assert_array_equal(got[name], codes, err_msg=name)


def test_fp32_graph_matches_unquantized_computation(tiny_model):
    model, x = tiny_model("W4A4")
    proto = to_onnx(model, SHAPE, precision="fp32")
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    session = ort_session(proto.SerializeToString())
    for m in model.modules():
        if isinstance(m, Quantizer) and not m.is_weight:
            m.forward = lambda t: t  # the activations stay float, the weights are fake-quantized
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(
        session.run(None, {INPUT_NAME: x.numpy()})[0], expected, rtol=1e-4, atol=1e-4
    )


class Zoo(nn.Module):
    """The integer ops that `quant.placement` serves, in one network: a concatenation of a ReLU
    branch and a signed one, a chunk of it concatenated again, a channel shuffle, a
    squeeze-excite product (a ReLU gate: onnxruntime's sigmoid table holds its own float
    sigmoid's values) and a residual add."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, *tail: nn.Module) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), *tail)

        self.stem = conv_bn(in_channels, 8, nn.ReLU())
        self.a, self.b, self.c = conv_bn(8, 8, nn.ReLU()), conv_bn(8, 8), conv_bn(8, 8)
        self.se = SqueezeExcitation(16, 8, scale_activation=nn.ReLU)
        self.d = conv_bn(16, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([self.a(x), self.b(x)], 1)
        keep, other = y.chunk(2, dim=1)
        y = torch.cat([keep, self.c(other)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        y = self.se(y)
        return self.fc(torch.flatten(self.pool(self.d(y) + y), 1))


@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
def test_concatenation_shuffle_squeeze_excite_and_add_run_on_integers_exactly(
    tiny_model, tmp_path, bits
):
    """Dyadic (conftest): the codes of every quantized tensor equal PyTorch's bit for bit, and
    no op of the graph onnxruntime runs reads a DequantizeLinear: the concatenations, the
    chunk and the shuffle move codes, the product and the add are QLinearMul and QLinearAdd."""
    model, x = tiny_model(bits, dyadic=True, name=Zoo)
    proto = to_onnx(model, SHAPE)
    onnx.save(proto, tmp_path / "m.onnx")
    ops = fused_ops(tmp_path / "m.onnx")
    assert {op: ops.get(op) for op in ("QLinearMul", "QLinearAdd", "Concat")} == {
        "QLinearMul": 1, "QLinearAdd": 1, "Concat": 2,
    }  # fmt: skip
    assert "DequantizeLinear" not in ops and ops.get("QuantizeLinear") == 1, ops
    # at 4 bits the conv / linear inputs are widened (codes stored in [0, 16) at zero point
    # -qmin, shifted with them: 0, or 8 << 4 for signed codes), for a 16 times finer int32 bias
    # grid; the codes above stay exact
    inits = {t.name: t for t in proto.graph.initializer}
    widened = {n.output[0] for n in proto.graph.node if n.op_type == "BitShift"}
    fine_zero_points = {
        int(onnx.numpy_helper.to_array(inits[n.input[2]]))
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in widened
    }
    assert bool(widened) == (bits == "W4A4") and fine_zero_points <= {0, 128}
    expected = pytorch_codes(model, x)
    for optimize in (False, True):
        got = code_runner(proto, expected, optimize)(x)
        for name, codes in expected.items():
            np.testing.assert_array_equal(got[name], codes, err_msg=f"{name} {optimize}")


class HardGate(nn.Module):
    """The hardsigmoid function, whose output the module's boundary can quantize."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.hardsigmoid(x)


class Hard(nn.Module):
    """MobileNetV3's float islands: Hardswish activations, a squeeze-excite block gated by a
    Hardsigmoid module, and a product gated by the hardsigmoid function."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.Hardswish()
        )
        self.se = SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid)
        self.gate = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), HardGate())
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.stem(x))
        y = y * self.gate(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.head(y), 1), 1))


@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
@pytest.mark.parametrize("gate_range", [1, 2], ids=["gate-range-1", "gate-range-2"])
def test_hardswish_and_hardsigmoid_gates_run_on_integers_exactly(
    tiny_model, tmp_path, bits, gate_range
):
    """Dyadic: a hardsigmoid's codes at scale s are those of x + 3 at 6 s, clipped at 1 / s, so
    onnxruntime runs every Hardswish and Hardsigmoid as an integer add (QLinearAdd) and every
    product as QLinearMul, and the codes of every tensor equal PyTorch's bit for bit. A gate
    quantizer whose range passes 1 (a learned scale can grow) needs the clip at the code of 1."""
    model, x = tiny_model(bits, dyadic=True, name=Hard)
    gates = ["stem.2.gate", "se.scale_activation.quant_output", "gate.2.quant_output"]
    quantizers = ["stem.2.gate_quantizer", *(f"{g}.quantizer" for g in gates[1:])]
    with torch.no_grad():
        for quantizer in quantizers:
            model.net.get_submodule(quantizer).step.mul_(gate_range)
    proto = to_onnx(model, SHAPE)
    onnx.save(proto, tmp_path / "m.onnx")
    ops = fused_ops(tmp_path / "m.onnx")
    assert {op: ops.get(op) for op in ("QLinearAdd", "QLinearMul")} == {
        "QLinearAdd": 4, "QLinearMul": 4,
    }, ops  # fmt: skip
    float_ops = {"HardSigmoid", "HardSwish", "Mul", "Add", "DequantizeLinear"}
    assert not float_ops & set(ops), ops
    expected = pytorch_codes(model, x)
    assert {f"net.{g}" for g in [*gates, "head.2.gate"]} <= set(expected), list(expected)
    if gate_range == 2:  # gates at 1 saturate at the code of 1, inside the codes' range
        tops = [
            (expected[f"net.{g}"].max(), model.net.get_submodule(q))
            for g, q in zip(gates, quantizers, strict=True)
        ]
        assert any(top == round(1 / float(q.scale)) < q.qrange[1] for top, q in tops), tops
    for optimize in (False, True):
        got = code_runner(proto, expected, optimize)(x)
        for name, codes in expected.items():
            np.testing.assert_array_equal(got[name], codes, err_msg=f"{name} {optimize}")


class Parts(nn.Module):
    """Items of calls in the forms a trace records beside the zoo's `chunk(2, dim=1)`: a chunk
    with its dim positional, one with the default dim 0 (the channels, after a permute that
    moves the batch to dim 2), and the item of a call that is no split (a max's values)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(4, 8, 3, 1, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        left, right = x.chunk(2, 1)
        y = self.conv(left) + self.conv(right)
        first, second = y.permute(1, 2, 0, 3).chunk(2)
        y = torch.cat([second, first]).permute(2, 0, 1, 3)
        top = y.max(dim=1, keepdim=True)[0]
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y - top, 1), 1))


def test_chunks_in_every_form_and_other_items_export_exactly(tiny_model):
    """Dyadic: the codes of every quantized tensor equal PyTorch's bit for bit, so each part
    was cut along the dim the call names (a wrong dim or a max taken for a split changes them)."""
    model, x = tiny_model("W4A4", dyadic=True, name=Parts)
    proto = to_onnx(model, SHAPE)
    assert torch_onnx_ops_of(proto) == ["max", "getitem"]  # the chunks are Slices
    expected = pytorch_codes(model, x)
    got = code_runner(proto, expected, optimize=True)(x)
    for name, codes in expected.items():
        np.testing.assert_array_equal(got[name], codes, err_msg=name)


def test_codes_of_an_input_quantized_at_run_time_are_refused_naming_the_layer():
    model = prepare(
        nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32)),
        QuantConfig(bits="W4A8", act_method="dynamic", group_size=32, first_last_bits=None),
    )
    with pytest.raises(QatkdError, match=r"^0\.input: the input is quantized per row at run"):
        activation_quantizers(model)
