"""`qatkd check`: the preflight, then a few real steps, and the facts a user plans a run with;
nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qatkd import pipeline, run_dirs
from qatkd.cli import EXIT_USER_ERROR, main
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.tasks.classification.models import MODELS
from testdata import tiny_overrides


def test_check_counts_steps_times_them_and_writes_nothing(npz_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    code = main(["check", *tiny_overrides(npz_root, out, "train.epochs=3")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and not out.exists()
    facts = pipeline.check(load_config(overrides=tiny_overrides(npz_root, out, "train.epochs=3")))
    train = facts["samples"]["train"]
    assert facts["samples"] == {"train": train, "val": 64 - train, "test": 24}
    assert facts["steps_per_epoch"] == train // 16 and facts["steps"] == 3 * (train // 16)
    assert facts["seconds_per_step"] > 0 and facts["peak_memory_bytes"] > 0
    estimate = facts["seconds_per_step"] * facts["steps"]
    assert facts["estimated_seconds"] >= estimate
    assert [line.split(":")[0] for line in lines] == [
        "model",
        "samples",
        "steps",
        "seconds per step",
        "evaluation",
        "estimated time",
        "peak memory",
    ]
    assert lines[0] == "model: resnet8 (77,299 parameters, full precision)"


def test_check_of_a_distill_run_refuses_what_distill_would(npz_root: Path, tmp_path: Path, capsys):
    argv = ["check", "--command", "distill", *tiny_overrides(npz_root, tmp_path / "r")]
    assert main(argv) == EXIT_USER_ERROR
    assert "balancer 'gor' needs at least one teacher" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_too_little_free_disk_is_refused_before_the_run_folder(
    npz_root: Path, tmp_path: Path, monkeypatch
):
    class Usage:
        free = 10_000  # bytes: less than one checkpoint of the model

    monkeypatch.setattr(run_dirs.shutil, "disk_usage", lambda path: Usage())
    out = tmp_path / "run"
    with pytest.raises(QatkdError, match=r"not enough free disk for the checkpoints of this run"):
        pipeline.train(load_config(overrides=tiny_overrides(npz_root, out)))
    assert not out.exists()


class _Cumprod(nn.Module):
    """A network with an op that no exporter writes (torch.onnx has no cumprod at opset 17)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)).cumprod(1))


def test_a_model_that_cannot_export_is_refused_before_training(
    npz_root: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setitem(MODELS._items, "cumprod_net", _Cumprod)
    out = tmp_path / "run"
    argv = ["check", *tiny_overrides(npz_root, out, "model.name=cumprod_net", "quant.bits=W8A8")]
    assert main(argv) == EXIT_USER_ERROR
    assert "cannot export 'cumprod' (graph node cumprod)" in capsys.readouterr().err
    with pytest.raises(QatkdError, match=r"cannot export 'cumprod'"):
        pipeline.train(
            load_config(
                overrides=tiny_overrides(npz_root, out, "quant.bits=W8A8", "model.name=cumprod_net")
            )
        )
    assert not out.exists()
