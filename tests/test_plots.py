"""A run's training-curves figure (qatkd.train.plots.plot_run), read back from the figure it
draws: which panels it shows for which logs, and that every curve plots its log's rows."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from qatkd.train import plots


def write(path: Path, rows: list[dict[str, float]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Figure]]:
    """The figures `plot_run` draws, kept open until the test ends."""
    figures: list[Figure] = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", figures.append)
    yield figures
    for figure in figures:
        close(figure)


def curves(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
    }


def test_a_plain_run_shows_its_loss_and_metrics(tmp_path: Path, drawn: list[Figure]):
    write(tmp_path / "steps.csv", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    epochs = [
        {"epoch": 1, "train_loss": 1.7, "train_acc": 40.0, "val_acc": 35.0, "test_acc": 30.0},
        {"epoch": 2, "train_loss": 1.2, "train_acc": 60.0, "val_acc": 55.0, "test_acc": 50.0},
    ]
    write(tmp_path / "log.csv", epochs)
    path = plots.plot_run(tmp_path, "resnet8 — run")
    assert path == tmp_path / "curves.png"
    assert plots.plt.imread(path).shape[:2] == (374, 924)  # 8.4 x 3.4 in at 110 dpi
    (figure,) = drawn
    assert figure.get_suptitle() == "resnet8 — run"
    loss, metric = figure.axes
    assert (loss.get_title(), loss.get_xlabel(), loss.get_yscale()) == (
        "training loss",
        "step",
        "log",
    )
    assert curves(loss) == {"loss": ([1.0, 2.0], [2.0, 1.5])}
    assert (metric.get_title(), metric.get_xlabel()) == ("accuracy (%)", "epoch")
    assert curves(metric) == {  # every metric but the loss, by name
        "test_acc": ([1.0, 2.0], [30.0, 50.0]),
        "train_acc": ([1.0, 2.0], [40.0, 60.0]),
        "val_acc": ([1.0, 2.0], [35.0, 55.0]),
    }
    assert [t.get_text() for t in metric.get_legend().get_texts()] == list(curves(metric))


def test_a_distilled_run_adds_its_losses_weights_alignments_and_conflict(
    tmp_path: Path, drawn: list[Figure]
):
    steps = [
        {"step": 1, "loss": 3.0, "l_ts": 2.0, "l_kd": 1.0, "w_ts": 0.9, "w_kd": 0.4},
        {"step": 2, "loss": 2.0, "l_ts": 1.5, "l_kd": 0.5, "w_ts": 0.8, "w_kd": 0.5},
        {"step": 3, "loss": 1.0, "align_ts": 0.5, "align_kd": -0.25},
        {"step": 4, "loss": 0.9, "grad_ratio": 4.0, "grad_cosine": -0.5},
    ]
    write(tmp_path / "steps.csv", steps)
    write(tmp_path / "log.csv", [{"epoch": 1, "train_acc": 50.0}])
    plots.plot_run(tmp_path, "t")
    (figure,) = drawn
    loss, metric, weights, alignment, conflict, twin = figure.axes
    assert tuple(figure.get_size_inches()) == pytest.approx((5 * 4.2, 3.4))  # as wide a panel
    assert curves(loss) == {
        "loss": ([1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.9]),
        "l_ts": ([1.0, 2.0], [2.0, 1.5]),
        "l_kd": ([1.0, 2.0], [1.0, 0.5]),
    }
    assert curves(metric) == {"train_acc": ([1.0], [50.0])}
    assert weights.get_title() == "balancer effective weights"
    assert curves(weights) == {"w_kd": ([1.0, 2.0], [0.4, 0.5]), "w_ts": ([1.0, 2.0], [0.9, 0.8])}
    assert (alignment.get_title(), alignment.get_ylim()) == ("cos(∇L_held, ∇L_k)", (-1.0, 1.0))
    assert curves(alignment) == {"align_kd": ([3.0], [-0.25]), "align_ts": ([3.0], [0.5])}
    assert (conflict.get_title(), conflict.get_yscale()) == ("gradient conflict", "log")
    assert curves(conflict) == {"‖∇TS‖/‖∇KD‖": ([4.0], [4.0])}
    assert curves(twin) == {"cosine": ([4.0], [-0.5])} and twin.get_ylim() == (-1.0, 1.0)
    (ratio,), (cosine,) = conflict.get_lines(), twin.get_lines()
    assert ratio.get_color() != cosine.get_color()  # two axes, two colours
    gridlines = [line for ax in figure.axes[:-1] for line in ax.get_xgridlines()]
    assert gridlines and all(0 < line.get_alpha() < 1 for line in gridlines)  # a faint grid
    legends = [ax.get_legend() for ax in figure.axes]
    assert len({t.get_fontsize() for legend in legends for t in legend.get_texts()}) == 1
    figure.canvas.draw()  # where the two legends of the conflict panel are
    assert (
        not conflict.get_legend()
        .get_window_extent()
        .overlaps(twin.get_legend().get_window_extent())
    )
    assert all(ax.get_xlabel() == "step" for ax in (loss, weights, alignment, conflict))
    markers = {ax: {line.get_marker() for line in ax.get_lines()} for ax in figure.axes}
    assert markers.pop(metric) == {"o"} and set(map(frozenset, markers.values())) == {
        frozenset(".")
    }  # every logged point marked: a dot a step, a disc an epoch


def test_a_run_without_logs_yet_draws_empty_panels(tmp_path: Path, drawn: list[Figure]):
    plots.plot_run(tmp_path, "new")
    (figure,) = drawn
    assert [ax.get_title() for ax in figure.axes] == ["training loss", "accuracy (%)"]
    assert tuple(figure.get_size_inches()) == pytest.approx((2 * 4.2, 3.4))  # as any run's
    assert all(not ax.get_lines() and ax.get_legend() is None for ax in figure.axes)
