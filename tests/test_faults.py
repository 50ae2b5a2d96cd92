"""A training tool is trusted only if a killed run resumes to the same result and a bad input
never costs work: kill -9, non-finite losses, and a table of bad inputs, each one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qatkd import pipeline
from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.cli import EXIT_USER_ERROR, main
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.tasks.classification.models import build_model
from qatkd.tasks.classification.task import ClassificationTask
from testdata import tiny_overrides, write_npz

QATKD = [sys.executable, "-m", "qatkd"]


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(npz_root: Path, tmp_path: Path):
    args = ("train.epochs=6", "train.threads=1")
    subprocess.run(
        [*QATKD, "train", *tiny_overrides(npz_root, tmp_path / "full", *args)],
        check=True,
        capture_output=True,
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*QATKD, "train", *tiny_overrides(npz_root, cut, *args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (cut / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(cut / "last.pt")["epoch"]  # never truncated
    assert 1 <= interrupted_at < 6
    subprocess.run([*QATKD, "train", "--resume", str(cut)], check=True, capture_output=True)
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(cut / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"] == b["metrics"]


def _nan_at_step(monkeypatch: pytest.MonkeyPatch, bad_step: int) -> None:
    original, calls = ClassificationTask.task_loss, []

    def task_loss(self, outputs, batch):
        calls.append(1)
        loss = original(self, outputs, batch)
        return loss * float("nan") if len(calls) == bad_step else loss

    monkeypatch.setattr(ClassificationTask, "task_loss", task_loss)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    npz_root, tmp_path, monkeypatch
):
    _nan_at_step(monkeypatch, bad_step=6)  # 4 steps per epoch: epoch 2, step 6
    config = load_config(overrides=tiny_overrides(npz_root, tmp_path / "run"))
    message = r"loss became non-finite at step 6 \(epoch 2; nan .*last\.pt"
    with pytest.raises(QatkdError, match=message):
        pipeline.train(config)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_nan_loss_can_skip_the_step(npz_root, tmp_path, monkeypatch, capsys):
    _nan_at_step(monkeypatch, bad_step=2)
    overrides = tiny_overrides(
        npz_root, tmp_path / "run", "train.on_nonfinite=skip", "data.val_split=0"
    )
    _, metrics = pipeline.train(load_config(overrides=overrides))  # 64 images: 4 steps an epoch
    assert metrics["steps"] == 8 and "skipped step 2" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "run")["model"].values())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good FP32 checkpoint, a truncated copy, one whose weights are another model's, and one
    carrying a pickled object."""
    tmp_path = tmp_path_factory.mktemp("checkpoints")
    npz_root = write_npz(tmp_path / "npz")
    good, _ = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "good")))
    data = (good / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 3])
    state = load_checkpoint(good)
    other = build_model("resnet20", 1, 3, [0.5], [0.5])
    save_checkpoint({**state, "model": other.state_dict()}, tmp_path / "other_arch.pt")
    torch.save({"format": "qatkd-checkpoint-v1", "meta": object()}, tmp_path / "pickled.pt")
    return {
        "good": good / "last.pt",
        "truncated": tmp_path / "truncated.pt",
        "other_arch": tmp_path / "other_arch.pt",
        "pickled": tmp_path / "pickled.pt",
        "npz": npz_root,
    }


BAD_INPUTS = [
    ("missing dataset", ["train", "data.root=/nonexistent"], "Fashion-MNIST not found"),
    (
        "wrong config key",
        ["train", "train.epoch=1"],
        "unknown config key 'train.epoch' (did you mean 'train.epochs'?)",
    ),
    ("wrong config type", ["train", "train.epochs=zero"], "config key 'train.epochs' = 'zero'"),
    ("unsupported bit-width", ["train", "quant.bits=W5A5"], "bit-width 5 is not supported"),
    ("unknown quantizer", ["train", "quant.method=lsqq"], "unknown quantizer 'lsqq'"),
    ("unknown balancer", ["distill", "balancer.name=gorr"], "unknown balancer 'gorr'"),
    ("unknown model", ["train", "model.name=resnt20"], "unknown model 'resnt20'"),
    ("missing config file", ["train", "--config", "missing.yaml"], "config file not found"),
    ("missing checkpoint", ["eval", "--ckpt", "missing.pt"], "checkpoint not found: missing.pt"),
    ("missing teacher", ["distill", "teachers=[t.pt]"], "teacher checkpoint not found: t.pt"),
    ("no teacher for KD", ["distill", "balancer.name=fixed"], "needs at least one teacher"),
    ("teachers with train", ["train", "teachers=[t.pt]"], "train learns from labels only"),
    ("truncated checkpoint", ["eval", "--ckpt", "{truncated}"], "truncated or corrupt"),
    ("another architecture", ["eval", "--ckpt", "{other_arch}"], "does not fit model 'resnet8'"),
    ("pickled checkpoint", ["eval", "--ckpt", "{pickled}"], "holds pickled objects"),
    (
        "run folder is a file",
        ["train", "data.name=npz", "data.root={npz}", "model.name=resnet8", "out={pickled}"],
        "is a file: name a folder for the run",
    ),
    (
        "language option on images",
        ["train", "train.gradient_checkpointing=true"],
        "train.gradient_checkpointing is for language models",
    ),
    (
        "activation bits for an LLM",
        ["train", "task=language", "quant.bits=W4A8"],
        "language models are quantized weight-only (W4A16), or with int8 activations",
    ),
    ("unknown language model", ["train", "task=language", "model.name=gpt-17"], "is unknown"),
    ("missing text file", ["train", "task=language", "data.train_files=[nope.txt]"], "not found"),
]


@pytest.mark.parametrize(("case", "argv", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_with_nonzero_exit(
    case, argv, message, capsys, checkpoints, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(**checkpoints) for a in argv]
    capsys.readouterr()  # drop what building the checkpoints printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert err.count("\n") == 1 and err.startswith("qatkd: error: ") and "Traceback" not in err
    assert message in err
