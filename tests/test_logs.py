"""What a run writes: CSV logs that survive a resume, and, when its output goes to a file, plain,
throttled progress lines (`--quiet` leaves only the result)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from qatkd.train.logs import CsvLog


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_resume_keeps_the_rows_up_to_its_checkpoint_and_a_fresh_start_none(tmp_path):
    log = CsvLog(tmp_path / "steps.csv", ["step", "loss"])
    log.start(None)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 1 / step, "not_a_column": 0})
    assert rows(log.path) == [
        {"step": "1", "loss": "1"},
        {"step": "2", "loss": "0.5"},
        {"step": "3", "loss": "0.333333"},  # 6 significant digits
    ]
    log.start(("step", 2))  # resumed from the checkpoint of step 2: step 3 runs again
    log.append({"step": 3, "loss": 0.25})
    assert [r["loss"] for r in rows(log.path)] == ["1", "0.5", "0.25"]
    log.start(None)  # a fresh run in the same folder
    assert log.path.read_bytes() == b"step,loss\r\n"


def test_a_resume_whose_log_is_gone_starts_it_again(tmp_path):
    log = CsvLog(tmp_path / "log.csv", ["epoch", "seconds"])
    log.start(("epoch", 3))
    assert log.path.read_bytes() == b"epoch,seconds\r\n"


def train(root: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "qatkd", *flags, "train", "data.name=npz", f"data.root={root}"]
    argv += ["model.name=resnet8", f"out={out}", "train.epochs=2", "train.batch_size=8"]
    return subprocess.run([*argv, "train.threads=1"], capture_output=True, text=True, check=True)


def test_progress_in_a_file_is_a_few_plain_lines(many_steps_root, tmp_path):
    run = train(many_steps_root, tmp_path / "run")
    lines = run.stderr.splitlines()
    assert "\r" not in run.stderr and 3 <= len(lines) < 40
    epoch_lines = [line for line in lines if line.startswith("epoch 2/2: ")]
    assert 1 <= len(epoch_lines) <= 11  # every 10 % of the epoch at most (57 steps)
    assert "100% 57/57, loss=" in epoch_lines[-1] and "elapsed, 0:00 left" in epoch_lines[-1]
    assert run.stdout.count("epoch 2/2  loss") == 1  # the per-epoch summary, on stdout


def test_quiet_prints_only_the_result(npz_root, tmp_path):
    run = train(npz_root, tmp_path / "run", "--quiet")
    assert run.stderr == ""
    result, folder = run.stdout.rsplit("\n", 2)[:2]
    assert folder == f"run folder: {tmp_path / 'run'}"
    assert json.loads(result)["epochs"] == 2
