"""A run stopped by a real signal, or killed after a periodic checkpoint, resumes to exactly the
weights of the run that was never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.cli import main
from qatkd.train.logs import read_csv
from qatkd.train.stops import StopRequests

EPOCHS, BATCH = 2, 8


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        *["train", "data.name=npz", f"data.root={root}"],
        *["model.name=resnet8", f"out={out}", f"train.epochs={EPOCHS}"],
        *[f"train.batch_size={BATCH}", "train.lr=0.05", "train.log_every=1", "train.threads=1"],
        *extra,
    ]


def command(root: Path, out: Path, *extra: str) -> list[str]:
    """The run as its own process, to receive real signals."""
    return [sys.executable, "-m", "qatkd", *train_args(root, out, *extra)]


def resume(out: Path) -> None:
    """`qatkd train --resume out`, in this process: a process start costs more than the rest."""
    assert main(["--quiet", "train", "--resume", str(out)]) == 0


@pytest.fixture(scope="module")
def uninterrupted(many_steps_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(["--quiet", *train_args(many_steps_root, out)]) == 0
    return out


def start_and_signal(argv: list[str], out: Path, signum: int, after_steps: int):
    """Start `argv`, send `signum` once steps.csv shows `after_steps` steps, and wait."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(read_csv(out / "steps.csv")) < after_steps:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_the_position_and_resume_is_exact(
    many_steps_root, uninterrupted, tmp_path, signum, status
):
    out = tmp_path / "cut"
    code, err = start_and_signal(command(many_steps_root, out), out, signum, after_steps=75)
    lines = err.strip().splitlines()
    state = load_checkpoint(out / "last.pt")
    assert code == status, err[-3000:]
    assert lines[-1] == (
        f"qatkd: stopped at step {state['step']} of {EPOCHS * 57}; "
        f"continue with: qatkd train --resume {out}"
    )
    assert state["epoch"] == 1 and state["position"]["batches"] == state["step"] - 57
    assert not (out / "metrics.json").exists()
    assert state["train_seconds"] > state["eval_seconds"] > 0  # one epoch was evaluated
    long_first_part = {"train_seconds": 1e6, "eval_seconds": 5e5}
    save_checkpoint({**state, **long_first_part}, out / "last.pt")
    resume(out)
    assert same_weights(out, uninterrupted)
    # the run's training and evaluation times count the part before the stop
    metrics = json.loads((out / "metrics.json").read_text())
    assert 1e6 < metrics["train_seconds"] < 1e6 + 600
    assert 5e5 <= metrics["eval_seconds"] < 5e5 + 600  # rounded to 0.1 s
    assert (out / "steps.csv").read_text() == (uninterrupted / "steps.csv").read_text()


def test_the_first_signal_asks_to_stop_and_a_second_aborts():
    """The second signal goes to the handler the process had before: Python's KeyboardInterrupt
    for SIGINT as a terminal gives it (a shell's background job starts with SIGINT ignored, so
    the test sets it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        second_signal_aborts()
    finally:
        signal.signal(signal.SIGINT, before)


def first_signal(signum: int) -> None:
    """Raise the first stop signal: were it to abort, the KeyboardInterrupt would stop pytest
    itself, reported as a user's Ctrl-C rather than as this test's failure."""
    try:
        signal.raise_signal(signum)
    except KeyboardInterrupt:
        pytest.fail("the first signal aborted instead of asking the run to stop")


def second_signal_aborts() -> None:
    with StopRequests() as stops:
        first_signal(signal.SIGINT)
        assert stops.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with StopRequests() as stops:
        signal.raise_signal(signal.SIGTERM)
        assert stops.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.slow
def test_a_kill_after_a_periodic_checkpoint_loses_at_most_that(
    many_steps_root, uninterrupted, tmp_path
):
    """`train.save_every_min` writes last.pt inside the epoch (here after every step: a longer
    period lets a fast step skip a save, and the kill would land two steps after the last one);
    SIGKILL leaves no chance to save more, and the resumed run still ends with the uninterrupted
    run's weights."""
    out = tmp_path / "killed"
    argv = command(many_steps_root, out, "train.save_every_min=1e-9")
    code, _ = start_and_signal(argv, out, signal.SIGKILL, after_steps=80)
    assert code == -signal.SIGKILL
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["position"]["batches"] >= 80 - 57 - 1
    resume(out)
    assert same_weights(out, uninterrupted)
