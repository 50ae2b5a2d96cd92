"""The int8 ONNX graph computes exactly what the fake-quantized PyTorch model computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qatkd.export import (
    INPUT_NAME,
    align_biases,
    class_names_of,
    fused_ops,
    int32_bias_layers,
    to_onnx,
)
from qatkd.quant import QuantAct, QuantConv2d, Quantizer, QuantLinear

SHAPE = [1, 16, 16]


def _quantized_codes(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every activation quantizer's integer codes in PyTorch, keyed by the ONNX name of the
    node that holds the same codes (the Q output, or the Clip that saturates sub-8-bit codes)."""
    codes, hooks = {}, []
    for name, q in model.named_modules():
        if isinstance(q, Quantizer) and not q.is_weight:
            key = name.replace(".input_quantizer", ".input").replace(".quantizer", "")
            key = key.replace(".", "_") + ("_clip" if q.bits < 8 else "_q")

            def hook(m: nn.Module, inp: tuple, out: torch.Tensor, key: str = key) -> None:
                codes[key] = torch.round(out / m.scale).numpy()

            hooks.append(q.register_forward_hook(hook))
    with torch.no_grad():
        codes["logits"] = model(x).numpy()
    for h in hooks:
        h.remove()
    return codes


def _run_with_codes(proto: onnx.ModelProto, x: torch.Tensor, names: list[str], optimize: bool):
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in names:
        if name != "logits":
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    outputs = session.run(None, {INPUT_NAME: x.numpy()})
    return dict(zip([o.name for o in session.get_outputs()], outputs, strict=True))


@pytest.mark.parametrize("bits", ["W8A8", "W4A4", "W2A2"])
@pytest.mark.parametrize("optimize", [False, True], ids=["qdq", "int8-kernels"])
def test_integer_exact_on_every_quantized_tensor(tiny_model, bits, optimize):
    """Dyadic model (conftest): no float rounding anywhere, so codes and logits must be equal."""
    model, x = tiny_model(bits, dyadic=True)
    expected = _quantized_codes(model, x)
    got = _run_with_codes(to_onnx(model, SHAPE), x, list(expected), optimize)
    assert len(expected) == 17  # 16 activation quantizers + logits
    for name, codes in expected.items():
        np.testing.assert_array_equal(got[name], codes, err_msg=name)


@pytest.mark.parametrize("bits", ["W8A8", "W4A4", "W2A2"])
def test_aligned_model_has_the_kernels_codes_with_calibrated_scales(tiny_model, bits):
    """Real (non-dyadic) scales: with the biases on the int32 grid (`align_biases`), every
    quantized tensor of PyTorch and of onnxruntime's int8 kernels holds the same codes."""
    model, x = tiny_model(bits, seed=1)
    align_biases(model, int32_bias_layers(model, SHAPE))
    expected = _quantized_codes(model, x)
    got = _run_with_codes(to_onnx(model, SHAPE), x, list(expected), optimize=True)
    for name, codes in expected.items():
        if name != "logits":
            np.testing.assert_array_equal(got[name], codes, err_msg=name)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=0, atol=1e-4)


def test_unaligned_biases_flip_codes_at_w8a8(tiny_model):
    """Why the alignment exists: without it the kernel's bias rounding changes some codes."""
    model, x = tiny_model("W8A8", seed=1)
    expected = _quantized_codes(model, x)
    got = _run_with_codes(to_onnx(model, SHAPE), x, list(expected), optimize=True)
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
        while chain.op_type in ("Clip", "BitShift"):
            chain = producer[chain.input[0]]
        assert chain.op_type == "QuantizeLinear", node.name
        assert inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8, node.name
    acts = [m for m in model.modules() if isinstance(m, QuantAct)]
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == len(layers) + len(acts)
    assert class_names_of(proto) == [f"c{i}" for i in range(10)]
    assert proto.graph.input[0].name == INPUT_NAME


@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
def test_onnxruntime_runs_int8_kernels(tiny_model, tmp_path, bits):
    model, _ = tiny_model(bits)
    onnx.save(to_onnx(model, SHAPE), tmp_path / "m.onnx")
    ops = fused_ops(tmp_path / "m.onnx")
    # The stem conv stays float: its output feeds two quantizers (block input and shortcut).
    assert ops.get("QLinearConv") == 8 and ops.get("QGemm") == 1, ops


def test_fp32_graph_matches_unquantized_computation(tiny_model):
    model, x = tiny_model("W4A4")
    proto = to_onnx(model, SHAPE, precision="fp32")
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for m in model.modules():
        if isinstance(m, Quantizer) and not m.is_weight:
            m.forward = lambda t: t  # the activations stay float, the weights are fake-quantized
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(
        session.run(None, {INPUT_NAME: x.numpy()})[0], expected, rtol=1e-4, atol=1e-4
    )
