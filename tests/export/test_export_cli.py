"""`qatkd export RUN_DIR` and `qatkd bench RUN_DIR` from the command line, for a classification
run and a detection run: the exit status, the files written, and the int8 ONNX checked here, with
onnxruntime, against the fake-quantized PyTorch model restored from the checkpoint
(`qatkd.artifacts.load_model`), not only through the figures the exporter wrote itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qatkd.artifacts import checkpoint_source, load_model
from qatkd.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from qatkd.cli import main
from qatkd.export.runtime import ort_session

FILES = ("model.int8.onnx", "model.fp32.onnx", "model.qpack", "parity.json")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def export_and_bench(capsys, run: Path, limit: int) -> None:
    """`qatkd export RUN --data-limit N`, then `qatkd bench RUN` at batch 1, one repeat: both
    exit 0, write their files and print what they wrote."""
    code, out, err = cli(capsys, "--quiet", "export", str(run), "--data-limit", str(limit))
    assert code == 0, err
    assert all((run / name).is_file() for name in FILES)
    written = json.loads((run / "parity.json").read_text())
    printed = json.loads(out)
    assert printed["parity"] == written["parity"]["onnxruntime"]
    assert printed["bytes"] == written["bytes"]
    assert written["checkpoint_sha256"] == file_sha256(run / "last.pt")
    assert written["parity"]["onnxruntime"]["samples"] == limit
    assert printed["integer_kernels"]["QLinearConv"] >= 1
    for name in FILES[:3]:
        assert printed["bytes"][name] == (run / name).stat().st_size
    argv = ["bench", str(run), "--batch", "1", "--repeats", "1", "--data-limit", str(limit)]
    code, out, err = cli(capsys, "--quiet", *argv)
    assert code == 0, err
    assert "re-exporting" not in out  # the export of this very checkpoint is reused
    assert out == (run / "bench.md").read_text() + "\n"
    bench = json.loads((run / "bench.json").read_text())
    assert {r["batch"] for r in bench["records"]} == {1}
    kinds = {(r["backend"], r["precision"]) for r in bench["records"]}
    assert {("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")} <= kinds
    assert bench["parity"]["onnxruntime"] == written["parity"]["onnxruntime"]


def onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    """The file's outputs in onnxruntime, as docs/deployment.md tells a user to run it (exact
    int8 kernels on a CPU without VNNI, whose default ones saturate 16-bit pair sums)."""
    return ort_session(path).run(None, {"pixels": x.numpy()})[0]


def pytorch_outputs(run: Path, x: torch.Tensor) -> np.ndarray:
    model, _ = load_model(run)
    with torch.no_grad():
        return model(x).numpy()


def test_export_and_bench_a_classification_run(capsys, learn_root, learned_fp32, tmp_path):
    run = tmp_path / "ptq"
    ptq = ["ptq", "--ckpt", str(learned_fp32), "quant.bits=W4A4", "quant.method=minmax"]
    assert main(["--quiet", *ptq, f"out={run}"]) == 0
    capsys.readouterr()
    export_and_bench(capsys, run, limit=16)
    with np.load(learn_root / "test.npz") as f:  # every test image, not only the 16 above
        x, y = torch.from_numpy(f["x"][:, None]).float() / 255, f["y"]
    expected = pytorch_outputs(run, x)
    assert (expected.argmax(1) == y).mean() >= 0.9  # a model with answers worth comparing
    got = onnx_outputs(run / "model.int8.onnx", x)
    assert got.shape == expected.shape == (48, 3)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    # the same logits up to the int32 bias grid (`bias_grid`): a small share of their range
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


def test_export_and_bench_a_detection_run(capsys, fashion_root, tmp_path):
    common = [
        "task=detection",
        f"data.root={fashion_root}",
        "data.train_limit=32",
        "data.test_limit=8",
        "train.epochs=1",
        "train.batch_size=16",
        "train.threads=1",
    ]
    assert main(["--quiet", "train", *common, f"out={tmp_path / 'fp32'}"]) == 0
    # An untrained detector's class logits all sit at the prior (ties an argmax cannot tell
    # apart): redraw its prediction layer so that every location has a clear top class.
    state = load_checkpoint(tmp_path / "fp32" / "last.pt")
    generator = torch.Generator().manual_seed(0)
    for key in ("net.head.predict.weight", "net.head.predict.bias"):
        shape = state["model"][key].shape
        state["model"][key] = torch.randn(shape, generator=generator) * 0.5
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, tmp_path / "fp32.pt")
    run = tmp_path / "ptq"
    ptq = ["ptq", "--ckpt", str(tmp_path / "fp32.pt"), "quant.bits=W8A8", f"out={run}"]
    assert main(["--quiet", *ptq]) == 0
    capsys.readouterr()
    export_and_bench(capsys, run, limit=6)
    _, state = load_model(run)
    test = checkpoint_source(state).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    expected = pytorch_outputs(run, x)
    got = onnx_outputs(run / "model.int8.onnx", x)
    classes = len(state["meta"]["class_names"])
    assert got.shape == expected.shape == (8, classes + 5, 12, 12)
    top = np.sort(expected[:, :classes], axis=1)
    assert (top[:, -1] - top[:, -2]).min() > 0.05  # no ties: every argmax below is decided
    np.testing.assert_array_equal(got[:, :classes].argmax(1), expected[:, :classes].argmax(1))
    assert np.abs(got - expected).max() <= 0.01 * np.abs(expected).max()
