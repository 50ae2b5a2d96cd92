"""The engine on the tiny npz data: it learns, it is deterministic, and resume is exact."""

import itertools
import json
import math
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from qatkd import pipeline
from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.tasks import task_family
from qatkd.tasks.classification.task import ClassificationTask
from qatkd.train import engine, optim
from qatkd.train.distributed import World
from qatkd.train.logs import read_csv
from qatkd.train.stops import RunStopped
from testdata import learning_overrides, signal_after_epoch, stop_after_epoch_1, tiny_overrides


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


def fake_clock(
    monkeypatch: pytest.MonkeyPatch, readings: Iterator[float], clock: str = "perf_counter"
) -> None:
    """The engine reads its `clock` (perf_counter: the training and evaluation times; monotonic:
    the save period) from `readings`, and the other one from the machine."""
    clocks = {"perf_counter": time.perf_counter, "monotonic": time.monotonic}
    clocks[clock] = lambda: float(next(readings))
    monkeypatch.setattr(engine, "time", SimpleNamespace(**clocks))


def test_training_changes_weights_and_writes_the_run_folder(npz_root: Path, tmp_path: Path):
    config = load_config(overrides=tiny_overrides(npz_root, tmp_path / "run"))
    family = task_family(config.task)
    model, _ = family.build_student(config, family.load(config))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_dir, metrics = pipeline.train(config)
    after = final_weights(run_dir)
    assert not torch.equal(before["net.conv1.weight"], after["net.conv1.weight"])
    for name in (
        "config.yaml",
        "last.pt",
        "best.pt",
        "log.csv",
        "steps.csv",
        "metrics.json",
        "curves.png",
    ):
        assert (run_dir / name).is_file(), name
    assert 0 <= metrics["test_acc"] <= 100 and metrics["epochs"] == 2
    assert metrics["device"] == "cpu"  # what benchmark pages name when a GPU trained a run
    assert len((run_dir / "log.csv").read_text().splitlines()) == 1 + 2
    header = (run_dir / "steps.csv").read_text().splitlines()[0]  # no diagnostics (diag.every=0)
    assert header == "step,epoch,lr,loss,l_ts,l_kd,w_ts,w_kd"
    # what the run returned, indented for a person to read
    assert (run_dir / "metrics.json").read_text() == json.dumps(metrics, indent=2) + "\n"


@pytest.mark.parametrize(("redraw_seconds", "after_epochs"), [(60.0, [3]), (0.0, [1, 2, 3])])
def test_the_curves_are_redrawn_once_a_minute_at_most_and_after_the_last_epoch(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redraw_seconds, after_epochs
):
    """Titled with the model and the run; a run of three quick epochs draws them once, after
    its last epoch (the epochs log.csv holds at each drawing)."""
    drawn, run = [], tmp_path / "run"

    def plot_run(*args: object) -> None:
        drawn.append((*args, len(read_csv(run / "log.csv"))))

    monkeypatch.setattr(engine, "plot_run", plot_run)
    monkeypatch.setattr(engine, "REDRAW_SECONDS", redraw_seconds)
    pipeline.train(load_config(overrides=tiny_overrides(npz_root, run, "train.epochs=3")))
    assert drawn == [(run, "resnet8 — run", epochs) for epochs in after_epochs]


@pytest.mark.parametrize(("after", "step"), [("optimizer_step", 2), ("evaluate_splits", 3)])
def test_a_stop_signal_draws_the_curves_before_the_run_stops(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str, step: int
):
    """A signal after step 2 stops the run inside epoch 1; one during epoch 1's evaluation,
    after its last step, stops it at the epoch's end."""
    drawn, original, calls = [], getattr(engine, after), []

    def then_signal(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2 or after == "evaluate_splits":
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(engine, "plot_run", lambda *args: drawn.append(args))
    monkeypatch.setattr(engine, after, then_signal)
    with pytest.raises(RunStopped, match=rf"^stopped at step {step} of 6$"):
        pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "run")))
    assert drawn == [(tmp_path / "run", "resnet8 — run")]


def test_each_split_is_evaluated_in_batches_of_the_tasks_evaluation_size(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Not one sample at a time: evaluation would take many times as long."""
    sizes = []
    evaluate = ClassificationTask.evaluate

    def recorded(self: ClassificationTask, model: torch.nn.Module, loader, split: str = "test"):
        sizes.append((split, loader.batch_size))
        return evaluate(self, model, loader, split)

    monkeypatch.setattr(ClassificationTask, "evaluate", recorded)
    pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path)))
    batch = ClassificationTask.eval_batch_size
    assert sizes and all(size == batch for _, size in sizes) and batch > 1, sizes


def test_same_seed_same_numbers(npz_root: Path, tmp_path: Path):
    runs = [
        pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / f"r{i}")))[0]
        for i in range(2)
    ]
    a, b = (final_weights(r) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_interruption_matches_uninterrupted_run(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    full, _ = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "full")))
    stop_after_epoch_1(
        monkeypatch,
        lambda: pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "cut"))),
    )
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed, _ = pipeline.resume(tmp_path / "cut")
    a, b = final_weights(full), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "log.csv").read_text().count("\n") == (resumed / "log.csv").read_text().count(
        "\n"
    )


def test_a_stop_inside_an_epoch_resumes_to_the_uninterrupted_weights(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """In this process (tests/test_stops.py signals a CLI process, which mutation testing cannot
    trace): a stop request after the second of three steps saves the position in epoch 1 and the
    RNG state (the last batch's augmentation draws from it), and the resumed run ends on the
    weights and the steps of the run never stopped."""
    full, _ = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "full")))
    steps = 0

    def step_then_stop(*args: object) -> None:
        nonlocal steps
        original(*args)
        steps += 1
        if steps == 2:
            signal.raise_signal(signal.SIGTERM)

    original = engine.optimizer_step
    with monkeypatch.context() as m:
        m.setattr(engine, "optimizer_step", step_then_stop)
        with pytest.raises(RunStopped):
            pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "cut")))
    state = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (state["epoch"], state["step"], state["position"]["batches"]) == (0, 2, 2)
    resumed, _ = pipeline.resume(tmp_path / "cut")
    a, b = final_weights(full), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "steps.csv").read_text() == (full / "steps.csv").read_text()


def test_a_stop_request_at_an_epochs_end_stops_the_run_there(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Epoch 1's checkpoint is written when the request comes: the run stops on it, without a
    step of epoch 2, and RunStopped says where (step 3 of 6) and which folder resumes."""
    signal_after_epoch(monkeypatch, 0, signal.SIGINT)  # Ctrl-C
    run = tmp_path / "run"
    with pytest.raises(RunStopped, match=r"^stopped at step 3 of 6$") as stopped:
        pipeline.train(load_config(overrides=tiny_overrides(npz_root, run)))
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"], state.get("position")) == (1, 3, None)
    assert (stopped.value.signum, stopped.value.run_dir) == (signal.SIGINT, str(run))


def test_a_stop_request_once_the_last_epoch_is_saved_lets_the_run_finish(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Nothing would be left to resume: the run writes its metrics and returns."""
    signal_after_epoch(monkeypatch, 1, signal.SIGTERM)  # the last of 2
    run_dir, metrics = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path)))
    assert metrics["steps"] == 6 and (run_dir / "metrics.json").is_file()


def test_a_run_resumed_twice_keeps_its_best_epoch_and_the_metrics_before_each_stop(
    learn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The best epoch comes before both stops (the task minimizes, and the run learns: epoch 1
    is its worst), so only the checkpoints carry it: stopped after epoch 1, resumed and stopped
    inside epoch 2 (that checkpoint holds epoch 1's figures), resumed to the end, the run
    reports what the run never stopped reports, but for its times."""
    monkeypatch.setattr(ClassificationTask, "maximize", False)
    _, expected = pipeline.train(
        load_config(overrides=learning_overrides(learn_root, tmp_path / "full"))
    )
    assert expected["best_epoch"] == 1, expected  # or this test tests nothing
    cut = tmp_path / "cut"
    stop_after_epoch_1(
        monkeypatch,
        lambda: pipeline.train(load_config(overrides=learning_overrides(learn_root, cut))),
    )
    epoch_1 = load_checkpoint(cut / "last.pt")["metrics"]
    original = engine.optimizer_step

    def step_then_stop(*args: object) -> None:
        original(*args)
        signal.raise_signal(signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(engine, "optimizer_step", step_then_stop)
        with pytest.raises(RunStopped) as stopped:
            pipeline.resume(cut)
    inside = load_checkpoint(cut / "last.pt")
    assert (inside["epoch"], inside["position"]["batches"]) == (1, 1)
    assert inside["metrics"] == epoch_1 and inside["best_epoch"] == 1
    assert (stopped.value.signum, stopped.value.exit_status) == (signal.SIGINT, 130)  # Ctrl-C
    assert (stopped.value.step, stopped.value.run_dir) == (inside["step"], str(cut))
    other = shutil.copytree(cut, tmp_path / "two_processes")  # as if stopped under torchrun
    inside["position"]["rng"] *= 2
    save_checkpoint({k: v for k, v in inside.items() if k != "format"}, other / "last.pt")
    message = (
        f"^{re.escape(str(other / 'last.pt'))} stopped inside an epoch of a run of 2 processes: "
        "resume it with as many$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.resume(other)
    _, metrics = pipeline.resume(cut)
    times = ("train_seconds", "eval_seconds")
    assert {k: v for k, v in metrics.items() if k not in times} == {
        k: v for k, v in expected.items() if k not in times
    }


def test_a_checkpoint_from_before_best_epochs_were_recorded_resumes_with_the_best_unknown(
    learn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Such a checkpoint holds the best score but not its epoch or figures: the resumed run
    reports epoch 0 and no best figures until an epoch beats that score (none here: the task
    minimizes, and the run learns, so epoch 1 stays the best)."""
    monkeypatch.setattr(ClassificationTask, "maximize", False)
    overrides = learning_overrides(learn_root, tmp_path / "cut", "train.epochs=2")
    stop_after_epoch_1(monkeypatch, lambda: pipeline.train(load_config(overrides=overrides)))
    state = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert state.pop("best_epoch") == 1 and state.pop("best_metrics")
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, tmp_path / "cut" / "last.pt")
    _, metrics = pipeline.resume(tmp_path / "cut")
    assert metrics["best_epoch"] == 0
    assert not [k for k in metrics if k.startswith("best_") and k != "best_epoch"], metrics


@pytest.mark.parametrize("before", [(1000.0, 400.0), None])
def test_a_resumed_run_adds_the_times_its_checkpoint_counted(
    npz_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    before: tuple[float, float] | None,
):
    """The training and evaluation seconds before a stop count in the resumed run's, and a
    checkpoint from before they were recorded counts none; on a clock that moves a millisecond
    a reading, the resumed part adds less than a second (the first part's clock moves a second
    a reading, so that its checkpoint holds whole seconds)."""
    overrides = tiny_overrides(npz_root, tmp_path / "cut")
    with monkeypatch.context() as m:
        fake_clock(m, itertools.count())
        stop_after_epoch_1(m, lambda: pipeline.train(load_config(overrides=overrides)))
    state = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert state["train_seconds"] >= 1 and state["eval_seconds"] >= 1  # epoch 1's, recorded
    state = {k: v for k, v in state.items() if k not in ("format", "train_seconds", "eval_seconds")}
    if before is not None:
        state["train_seconds"], state["eval_seconds"] = before
    save_checkpoint(state, tmp_path / "cut" / "last.pt")
    ticks = itertools.count()
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(ticks) * 1e-3)
    _, metrics = pipeline.resume(tmp_path / "cut")
    train, evaluation = before or (0.0, 0.0)
    assert train <= metrics["train_seconds"] < train + 0.9, metrics
    assert evaluation <= metrics["eval_seconds"] < evaluation + 0.9, metrics


def test_the_position_is_saved_each_time_the_save_period_has_passed(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """On a clock that moves 30 s a reading, with train.save_every_min=1: the period is read
    after every step and restarts at each save and at each epoch's end, so the position is saved
    when 60 s have passed, at steps 2 and 5 of two epochs of 3."""
    fake_clock(monkeypatch, itertools.count(step=30.0), "monotonic")
    saved: list[int] = []
    original = engine.save_checkpoint

    def save(state: dict, path: Path) -> None:
        if state["position"] is not None:
            saved.append(state["step"])
        original(state, path)

    monkeypatch.setattr(engine, "save_checkpoint", save)
    overrides = tiny_overrides(npz_root, tmp_path / "run", "train.save_every_min=1")
    _, metrics = pipeline.train(load_config(overrides=overrides))
    assert metrics["steps"] == 6 and saved == [2, 5]


def test_the_training_time_is_the_clocks_since_the_start_to_a_tenth_of_a_second(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The engine's clock reads 1000 s at the start, then 1001.26 s (and a few microseconds
    more on each later reading): the run trained for 1.3 s."""
    fake_clock(
        monkeypatch, itertools.chain([1000.0], (1001.26 + i * 1e-7 for i in itertools.count()))
    )
    _, metrics = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path)))
    assert metrics["train_seconds"] == 1.3 and metrics["eval_seconds"] == 0.0


def test_the_evaluation_time_is_the_evaluations_clock_to_a_tenth_of_a_second(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """On a clock that moves 0.13 s a reading, each epoch's evaluation (read before and after
    it) takes 0.13 s: 0.26 s over two epochs, reported as 0.3 s."""
    fake_clock(monkeypatch, (i * 0.13 for i in itertools.count()))
    _, metrics = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path)))
    assert metrics["eval_seconds"] == 0.3


def test_an_epochs_training_figures_are_the_means_of_its_steps(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """train_loss: the mean of the epoch's logged step losses (equal batches); train_acc: the
    mean of the batches' accuracies, all 50 % here; the step and rate: its last step's; its
    seconds: within the run's."""
    monkeypatch.setattr(ClassificationTask, "batch_metrics", lambda *args: {"train_acc": 50.0})
    run_dir, metrics = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path)))
    steps, epochs = read_csv(run_dir / "steps.csv"), read_csv(run_dir / "log.csv")
    for row in epochs:
        rows = [s for s in steps if s["epoch"] == row["epoch"]]
        losses = [s["loss"] for s in rows]
        assert len(losses) == 3 and row["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
        assert row["train_acc"] == 50.0
        assert (row["step"], row["lr"]) == (rows[-1]["step"], rows[-1]["lr"])
        assert row["seconds"] > 0
    assert sum(row["seconds"] for row in epochs) <= metrics["train_seconds"] + 0.05
    assert [row["lr"] for row in epochs] == sorted({row["lr"] for row in epochs}, reverse=True)


def test_each_epoch_shows_its_progress_and_a_resumed_one_counts_from_where_it_stopped(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """stderr is no terminal here: progress comes as plain lines, each epoch's last at 3 of 3
    steps, a resumed epoch's too (it starts at the steps done before the stop). On a clock that
    moves a second a reading (read once at the epoch's start and once a step), each step of 16
    images shows a rate of 16 images a second, the resumed epoch's too (its rate counts only the
    images it trained on)."""
    run = tmp_path / "run"
    overrides = tiny_overrides(npz_root, run)
    fake_clock(monkeypatch, itertools.count())
    original = engine.optimizer_step

    steps = itertools.count(1)

    def second_step_then_stop(*args: object) -> None:
        original(*args)
        if next(steps) == 2:
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(engine, "optimizer_step", second_step_then_stop)
        with pytest.raises(RunStopped):
            pipeline.train(load_config(overrides=overrides))
    stopped = capsys.readouterr().err.splitlines()
    assert stopped and all(line.startswith("epoch 1/2: ") for line in stopped), stopped
    assert all(", img_s=16, " in line for line in stopped), stopped
    pipeline.resume(run)
    lines = capsys.readouterr().err.splitlines()
    for epoch, logged in zip((1, 2), read_csv(run / "log.csv"), strict=True):
        last = [line for line in lines if line.startswith(f"epoch {epoch}/2: ")][-1]
        shown = re.match(
            rf"epoch {epoch}/2: 100% 3/3, loss=([\d.]+), acc=([\d.]+), img_s=16, ", last
        )
        assert shown, last  # the epoch's means, as log.csv holds them (to its 6 digits)
        assert float(shown[1]) == pytest.approx(logged["train_loss"], abs=6e-4), last
        assert float(shown[2]) == pytest.approx(logged["train_acc"], abs=6e-2), last


def test_only_the_main_process_shows_an_epochs_progress_from_where_it_resumed(
    capsys: pytest.CaptureFixture[str],
):
    """Every process iterates the epoch's batches, but a second one drawing its own bar would
    print each line twice (stderr is captured here, not a terminal: the bar writes lines)."""
    lines = {}
    for rank in (0, 1):
        world = World(rank=rank, size=2)
        bar = engine.epoch_progress(iter(range(4)), epoch=2, epochs=4, steps=5, done=1, world=world)
        assert list(bar) == [0, 1, 2, 3]
        lines[rank] = [line.split(",")[0] for line in capsys.readouterr().err.splitlines()]
    shown = [f"epoch 3/4: {100 * n // 5}% {n}/5" for n in (2, 3, 4, 5)]
    assert lines == {0: shown, 1: []}


def test_a_resumed_epoch_skips_the_samples_it_trained_on_and_nothing_else():
    order = [5, 3, 8, 1]  # a sampler's indices
    remaining = engine.SkipFirst(order)
    assert list(remaining) == order and len(remaining) == 4
    remaining.count = 3
    assert list(remaining) == [1] and len(remaining) == 1


def test_each_seed_epoch_and_process_draw_their_own_random_numbers():
    draws = set()
    for seed in range(3):
        for epoch in range(4):
            for rank in range(2):
                torch.manual_seed(engine.epoch_seed(seed, epoch, rank))
                draws.add(torch.rand(1).item())
    assert len(draws) == 24
    assert engine.epoch_seed(3, 2, 0) == 3 * 1_000_003 + 2
    assert engine.epoch_seed(3, 2, 1) == 3 * 1_000_003 + 2 + 2**20


def test_each_epoch_shuffles_the_training_images_and_the_seed_decides_the_order(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    orders: list[list[int]] = []

    class Recording(DistributedSampler):
        def __iter__(self) -> Iterator[int]:
            orders.append(list(super().__iter__()))
            return iter(orders[-1])

    monkeypatch.setattr(engine, "DistributedSampler", Recording)
    for seed in (0, 1):
        overrides = tiny_overrides(npz_root, tmp_path / f"seed{seed}", f"seed={seed}")
        pipeline.train(load_config(overrides=overrides))
    assert len(orders) == 4  # two runs of two epochs
    assert all(sorted(order) == list(range(len(order))) for order in orders)
    assert orders[0] != sorted(orders[0]) and orders[0] != orders[1]  # shuffled, anew each epoch
    assert orders[:2] != orders[2:]  # another seed, another order


def test_the_global_batch_splits_evenly_over_the_processes_or_is_refused():
    assert engine.per_rank_batch_size(12, World(size=4)) == 3
    message = r"^train\.batch_size=10 does not split over 4 processes: use a multiple of 4$"
    with pytest.raises(QatkdError, match=message):
        engine.per_rank_batch_size(10, World(size=4))


def test_each_epoch_prints_one_line_of_its_figures_and_the_balancers_weights(
    npz_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    def figures(epoch: int) -> str:
        two = r"\d+\.\d\d"
        return (
            rf"epoch {epoch}/2  loss \d+\.\d{{4}}  train_acc {two}  val_acc {two}  test_acc {two}"
        )

    def epoch_lines() -> list[str]:
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]

    teacher, _ = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "t")))
    lines = epoch_lines()
    assert len(lines) == 2, lines
    assert all(re.fullmatch(figures(i + 1), line) for i, line in enumerate(lines)), lines
    overrides = tiny_overrides(npz_root, tmp_path / "s", f"teachers=[{teacher / 'last.pt'}]")
    pipeline.distill(load_config(overrides=overrides))
    lines = epoch_lines()
    weights = r"  w_ts=\S+ w_kd=\S+"  # the default balancer's, one per loss
    assert len(lines) == 2, lines
    assert all(re.fullmatch(figures(i + 1) + weights, x) for i, x in enumerate(lines)), lines


def test_the_learning_rate_warms_up_over_the_first_epoch_then_decays_to_zero(
    npz_root: Path, tmp_path: Path
):
    run_dir, metrics = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path)))
    total = metrics["steps"]
    warmup = total // 2  # train.warmup_epochs=1 of 2
    rows = read_csv(run_dir / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))

    def factor(k: int) -> float:  # LambdaLR after k steps
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))

    assert [r["lr"] for r in rows] == pytest.approx([0.05 * factor(k) for k in range(1, total + 1)])


def test_the_kept_epoch_is_the_best_in_the_tasks_direction(
    learn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """best.pt is the epoch with the highest validation accuracy, or the lowest where the task
    minimizes its metric (a language model's perplexity)."""
    kept = {}
    for maximize in (True, False):
        monkeypatch.setattr(ClassificationTask, "maximize", maximize)
        out = tmp_path / str(maximize)
        run_dir, metrics = pipeline.train(
            load_config(overrides=learning_overrides(learn_root, out))
        )
        accuracy = [row["val_acc"] for row in read_csv(run_dir / "log.csv")]
        best = max(accuracy) if maximize else min(accuracy)
        assert metrics["best_epoch"] == accuracy.index(best) + 1, (accuracy, metrics)
        assert load_checkpoint(run_dir / "best.pt")["epoch"] == metrics["best_epoch"]
        kept[maximize] = metrics["best_epoch"]
    assert kept[True] != kept[False]  # the run learns: its best and worst epochs differ


def test_a_fresh_run_counts_its_training_and_evaluation_time_from_zero(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """On a clock that moves a millisecond a reading, the whole run reads it a few hundred
    times: its times stay below a second unless they start from more than zero."""
    ticks = itertools.count()
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(ticks) * 1e-3)
    _, metrics = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path)))
    assert 0 <= metrics["eval_seconds"] <= metrics["train_seconds"] < 0.9, metrics


def test_existing_run_folder_is_not_overwritten(npz_root: Path, tmp_path: Path):
    pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "run")))
    with pytest.raises(QatkdError, match="already holds a run: resume it with --resume"):
        pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "run")))


def test_warmup_cosine_schedule():
    factor = optim.warmup_cosine(total_steps=10, warmup_steps=2)
    assert [round(factor(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_weight_decay_skips_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    decay, no_decay = optim.parameter_groups(model, 1e-4)
    assert [p.shape for p in decay["params"]] == [(2, 1, 3, 3)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
