"""`train.tensorboard`: the run folder's event file holds the figures of steps.csv and log.csv,
resumes leave no step twice, and without the package the run refuses before it starts."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from qatkd import pipeline
from qatkd.cli import EXIT_USER_ERROR, main
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.train import engine
from qatkd.train.logs import read_csv
from qatkd.train.tensorboard import ScalarLog
from testdata import tiny_overrides, write_npz

BOARD = "train.tensorboard=true"
MISSING = "train.tensorboard=true needs the tensorboard package, which is not installed: "
FIX = "pip install 'qatkd[tensorboard]'"


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for `run_dir`, by tag: (step, value), purges applied.

    The event files are read in name order, which is time order unless one process opens a 10th
    writer within the second of its 9th (the counter in the name): keep this module's runs few."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def csv_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What the event file should hold: each number of steps.csv and log.csv at its row's step."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for name, section in (("steps.csv", "steps"), ("log.csv", "epochs")):
        for row in read_csv(run_dir / name):
            for column, value in row.items():
                if column not in ("step", "epoch"):
                    expected.setdefault(f"{section}/{column}", []).append((int(row["step"]), value))
    return expected


def assert_mirrors_csv(run_dir: Path) -> None:
    """Same tags, same steps in the same order, same values: the CSV keeps 6 significant digits
    (relative error <= 5e-6) and the event file float32 (6e-8)."""
    board, expected = scalars(run_dir), csv_scalars(run_dir)
    assert sorted(board) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in points], tag
        assert [v for _, v in board[tag]] == pytest.approx([v for _, v in points], rel=6e-6), tag


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


def next_second() -> None:
    """Wait for the next second before opening an event file: the files of one second sort by a
    count of this process's writers, as text (10 before 9), so two opened in one second may be
    read in the wrong order; runs, each in its own process, never open theirs so close."""
    time.sleep(1 - time.time() % 1)


def open_writers() -> int:
    """Event writers still open in this process: each holds a thread until it is closed."""
    return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("board") / "npz")


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    return pipeline.train(load_config(overrides=tiny_overrides(data, out, BOARD)))[0]


def test_a_train_run_logs_the_figures_of_its_csv_logs(trained):
    assert len(event_files(trained)) == 1  # in the run folder itself: one run per folder
    assert open_writers() == 0
    assert_mirrors_csv(trained)
    tags = scalars(trained)
    assert {"steps/loss", "steps/lr", "steps/w_ts", "epochs/val_acc", "epochs/test_acc"} <= set(
        tags
    )
    assert not {"steps/step", "steps/epoch", "epochs/epoch", "epochs/step"} & set(tags)
    assert [s for s, _ in tags["epochs/test_acc"]] == [3, 6]  # 3 steps an epoch, at its end


def test_a_distill_run_logs_balancer_weights_and_gradient_conflict(data, trained, tmp_path):
    teacher = trained / "last.pt"
    extra = (BOARD, f"teachers=[{teacher},{teacher}]", "balancer.per_teacher=true")
    extra += ("train.log_every=2", "diag.every=3")  # diagnostic rows between the logged ones
    out, _ = pipeline.distill(load_config(overrides=tiny_overrides(data, tmp_path / "d", *extra)))
    assert_mirrors_csv(out)
    tags = scalars(out)
    assert {"steps/w_kd0", "steps/w_kd1", "steps/l_kd", "steps/grad_cosine"} <= set(tags)
    assert [s for s, _ in tags["steps/grad_cosine"]] == [1, 4]  # diag.every=3: before steps 1, 4
    assert [s for s, _ in tags["steps/loss"]] == [1, 2, 4, 6]


def test_without_the_key_there_is_no_event_file(data, tmp_path):
    out, _ = pipeline.train(load_config(overrides=tiny_overrides(data, tmp_path / "r")))
    assert (out / "steps.csv").is_file() and event_files(out) == []


def test_without_the_package_the_run_refuses_before_its_folder(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    out = tmp_path / "none"
    with pytest.raises(QatkdError) as refused:
        pipeline.train(load_config(overrides=tiny_overrides(data, out, BOARD)))
    assert str(refused.value) == MISSING + FIX
    assert not out.exists()


def test_qatkd_check_refuses_in_one_line_too(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    code = main(["check", *tiny_overrides(data, tmp_path / "c", BOARD)])
    assert code == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [f"qatkd: error: {MISSING}{FIX}"]


def test_a_resume_after_a_crash_shows_no_step_twice(data, tmp_path, monkeypatch):
    """last.pt is written after step 2 only, then the run logs steps 3-5 and epoch 1 and dies:
    the resumed run logs them again, and TensorBoard must show each once, as the CSVs do."""
    real_save = engine.save_checkpoint

    def save_at_step_2_die_at_5(state, path):
        logged = [s for s, _ in scalars(path.parent).get("steps/loss", [])]
        assert logged == list(range(1, state["step"] + 1))  # on disk before any checkpoint
        if state["step"] == 5:
            raise KeyboardInterrupt
        if state["step"] <= 2:
            real_save(state, path)

    overrides = tiny_overrides(data, tmp_path / "cut", BOARD, "train.save_every_min=1e-9")
    with monkeypatch.context() as m:
        m.setattr(engine, "save_checkpoint", save_at_step_2_die_at_5)
        with pytest.raises(KeyboardInterrupt):
            pipeline.train(load_config(overrides=overrides))
    assert open_writers() == 0  # closed on the way out
    before = scalars(tmp_path / "cut")
    assert [s for s, _ in before["steps/loss"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in before["epochs/test_acc"]] == [3]
    out, _ = pipeline.resume(tmp_path / "cut")
    assert len(event_files(out)) == 2
    assert_mirrors_csv(out)
    assert [s for s, _ in scalars(out)["steps/loss"]] == [1, 2, 3, 4, 5, 6]


def test_a_stop_signal_closes_the_writer_and_the_resume_continues_it(data, tmp_path, monkeypatch):
    calls = 0
    real_to_device = engine.to_device

    def signal_on_the_fourth_batch(batch, device):
        nonlocal calls
        calls += 1
        if calls == 4:
            signal.raise_signal(signal.SIGTERM)  # StopRequests takes it: the step still runs
        return real_to_device(batch, device)

    overrides = tiny_overrides(data, tmp_path / "stop", BOARD)
    with monkeypatch.context() as m:
        m.setattr(engine, "to_device", signal_on_the_fourth_batch)
        with pytest.raises(engine.RunStopped, match="stopped at step 4 of 6"):
            pipeline.train(load_config(overrides=overrides))
    assert open_writers() == 0
    assert [s for s, _ in scalars(tmp_path / "stop")["steps/loss"]] == [1, 2, 3, 4]
    out, _ = pipeline.resume(tmp_path / "stop")
    assert_mirrors_csv(out)
    assert [s for s, _ in scalars(out)["steps/loss"]] == [1, 2, 3, 4, 5, 6]


def test_a_run_started_afresh_in_a_folder_shows_only_its_own_steps(data, tmp_path):
    """A run that left events but no checkpoint (killed before its first one) is run again
    from step 1: TensorBoard shows the new run's steps once, as its CSV logs do."""
    overrides = tiny_overrides(data, tmp_path / "again", BOARD)
    out, _ = pipeline.train(load_config(overrides=overrides))
    for name in ("last.pt", "metrics.json"):  # as if killed before its first checkpoint
        (out / name).unlink()
    next_second()
    pipeline.train(load_config(overrides=[*overrides, "train.lr=0.01"]))
    assert len(event_files(out)) == 2
    assert_mirrors_csv(out)


def test_a_fresh_start_hides_the_events_of_a_run_that_left_no_checkpoint(tmp_path):
    """A folder without last.pt is started afresh, its CSV logs emptied: so are its scalars."""
    runs = [(0, [(1, 1.0), (2, 2.0)]), (0, [(1, 3.0), (2, 4.0)]), (1, [(2, 5.0)])]
    for keep_until, points in runs:  # a start, a fresh start, a resume after step 1
        next_second()
        board = ScalarLog(tmp_path, keep_until=keep_until)
        for step, loss in points:
            board.add("steps", {"step": step, "loss": loss, "l_kd": None, "note": "x"}, step)
        board.close()
    assert scalars(tmp_path) == {"steps/loss": [(1, 3.0), (2, 5.0)]}
