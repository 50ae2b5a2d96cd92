"""`openvino_reference` is what OpenVINO computes for a residual network's int8 graph: the graph
without the roundings OpenVINO drops when it fuses a residual Add into the convolution before it.
On a model whose scales are powers of two every float op is exact, so the reference and OpenVINO
agree bit for bit, while the graph itself (what onnxruntime and PyTorch compute) does not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from torch import nn

from qatkd.export import INPUT_NAME, to_onnx
from qatkd.export.openvino_reference import dropped_roundings, openvino_reference
from qatkd.export.runtime import load_runner, openvino_available, ort_session

pytestmark = pytest.mark.skipif(not openvino_available(), reason="needs openvino")


def test_the_reference_is_what_openvino_computes_and_the_graph_is_not(tiny_model, tmp_path):
    model, x = tiny_model("W8A8", dyadic=True)
    path = tmp_path / "model.onnx"
    onnx.save(to_onnx(model, list(x.shape[1:])), path)
    blocks = ["net_layers_0", "net_layers_1", "net_layers_2"]  # ResNet-8's residual blocks
    assert dropped_roundings(path) == [f"{block}_branch_point_q" for block in blocks]

    in_openvino = load_runner(path, "openvino", threads=1)(x.numpy())
    graph = ort_session(str(path), 1).run(None, {INPUT_NAME: x.numpy()})[0]
    reference = openvino_reference(path)
    onnx.checker.check_model(reference)
    as_openvino = ort_session(reference.SerializeToString(), 1).run(None, {INPUT_NAME: x.numpy()})
    np.testing.assert_array_equal(in_openvino, as_openvino[0])
    assert np.mean(in_openvino != graph) > 0.5


def test_a_graph_without_residual_adds_drops_no_rounding(tiny_model, tmp_path):
    model, x = tiny_model("W8A8", name=_plain)
    path = tmp_path / "model.onnx"
    onnx.save(to_onnx(model, list(x.shape[1:])), path)
    assert dropped_roundings(path) == []
    assert openvino_reference(path).graph == onnx.load(path).graph


def _plain(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )
