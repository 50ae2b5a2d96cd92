"""`openvino_reference` is what OpenVINO computes for a residual network's int8 graph: the graph
without the roundings OpenVINO drops when it fuses a residual Add into the convolution before it.
On a model whose scales are powers of two every float op is exact, so the reference and OpenVINO
agree bit for bit, while the graph itself (what onnxruntime and PyTorch compute) does not. And
OpenVINO runs each batch size on a graph compiled for that shape (`load_runner`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from torch import nn

from qatkd.export import INPUT_NAME, runtime, to_onnx
from qatkd.export.openvino_reference import dropped_roundings, openvino_reference
from qatkd.export.runtime import (
    load_runner,
    openvino_available,
    openvino_compiled,
    ort_session,
)

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


def test_openvino_runs_each_batch_size_on_a_graph_compiled_for_it(
    tiny_model, tmp_path, monkeypatch
):
    """`load_runner` compiles the file for each input shape it is given, once: one image
    alone, or in a batch of 32, gives the same logits."""
    model, x = tiny_model("W8A8")
    path = tmp_path / "model.onnx"
    onnx.save(to_onnx(model, list(x.shape[1:])), path)
    shapes = []

    def compiled(path, shape, *settings):
        shapes.append(tuple(shape))
        return openvino_compiled(path, shape, *settings)

    monkeypatch.setattr(runtime, "openvino_compiled", compiled)
    run = load_runner(path, "openvino", threads=1)
    whole = run(x.numpy())
    np.testing.assert_allclose(run(x[:1].numpy()), whole[:1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(run(x[5:9].numpy()), whole[5:9], rtol=0, atol=1e-5)
    run(x[1:2].numpy())
    assert whole.shape == (32, 10)
    assert shapes == [(32, 1, 16, 16), (1, 1, 16, 16), (4, 1, 16, 16)]


def test_freed_openvino_runners_leave_signals_to_their_handlers(tiny_model, tmp_path):
    """With an `openvino.Core` for each compiled model, freeing a runner that compiled two batch
    sizes made the next signal the process raised a segfault, where a stop handler should run
    (the stop-signal tests died in a worker that had run OpenVINO's). In a fresh process."""
    model, x = tiny_model("W8A8")
    path = tmp_path / "model.onnx"
    onnx.save(to_onnx(model, list(x.shape[1:])), path)
    script = f"""
import gc, signal, numpy as np
from qatkd.export.runtime import load_runner
run = load_runner({str(path)!r}, "openvino", threads=1)
for batch in (2, 1):
    run(np.zeros((batch, 1, 16, 16), np.float32))
del run
gc.collect()
signal.signal(signal.SIGTERM, lambda *_: print("handled"))
signal.raise_signal(signal.SIGTERM)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "handled\n"), done.stderr[-500:]
