"""What a run writes when its output goes to a file: plain, throttled progress lines; `--quiet`
leaves only the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def train(root: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "qatkd", *flags, "train", "data.name=npz", f"data.root={root}"]
    argv += ["model.name=resnet8", f"out={out}", "train.epochs=3", "train.batch_size=8"]
    return subprocess.run([*argv, "train.threads=1"], capture_output=True, text=True, check=True)


def test_progress_in_a_file_is_a_few_plain_lines(many_steps_root, tmp_path):
    run = train(many_steps_root, tmp_path / "run")
    lines = run.stderr.splitlines()
    assert "\r" not in run.stderr and 3 <= len(lines) < 40
    epoch_lines = [line for line in lines if line.startswith("epoch 2/3: ")]
    assert 1 <= len(epoch_lines) <= 11  # every 10 % of the epoch at most (57 steps)
    assert "100% 57/57, loss=" in epoch_lines[-1] and "elapsed, 0:00 left" in epoch_lines[-1]
    assert run.stdout.count("epoch 3/3  loss") == 1  # the per-epoch summary, on stdout


def test_quiet_prints_only_the_result(many_steps_root, tmp_path):
    run = train(many_steps_root, tmp_path / "run", "--quiet")
    assert run.stderr == ""
    result, folder = run.stdout.rsplit("\n", 2)[:2]
    assert folder == f"run folder: {tmp_path / 'run'}"
    assert json.loads(result)["epochs"] == 3
