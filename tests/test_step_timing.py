"""The step timing behind `qatkd check` (qatkd.train.step.time_steps), on a fake clock: the mean
of three real steps after a warm-up step, and a held-out balancer pass, timed on every step,
counted at its share of one every `balancer.every` steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qatkd import pipeline
from qatkd.balance import GoR
from qatkd.config import load_config
from qatkd.train import step
from testdata import learning_overrides, tiny_overrides


def fake_clock(monkeypatch: pytest.MonkeyPatch, ticks: list[float]) -> Iterator[float]:
    """Make `time_steps` read `ticks`, one a call; what is left of them, to check that every
    one was read."""
    left = iter(ticks)
    monkeypatch.setattr(step, "time", SimpleNamespace(perf_counter=lambda: next(left)))
    return left


def test_a_step_takes_the_mean_of_three_after_a_warm_up_step(npz_root, tmp_path, monkeypatch):
    # (start, end) of each step: the warm-up takes 100 s, the next three 1, 2 and 3 s
    left = fake_clock(monkeypatch, [0, 100, 100, 101, 101, 103, 103, 106])
    facts = pipeline.check(load_config(overrides=tiny_overrides(npz_root, tmp_path / "r")))
    assert facts["seconds_per_step"] == 2.0
    assert next(left, None) is None
    expected = facts["seconds_per_step"] * facts["steps"]
    expected += facts["evaluation_seconds_per_epoch"] * facts["epochs"]
    assert facts["estimated_seconds"] == pytest.approx(expected)


def test_a_held_out_pass_counts_at_its_share_of_the_steps(
    learn_root: Path, learned_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # (start, pass start, pass end, end) of each step: after the warm-up, 6 s a step of which
    # the pass takes 5; it runs one step in ten, so a step costs 1 + 5 / 10 on average
    ticks = [0, 0, 50, 100]
    for start in (100, 106, 112):
        ticks += [start, start, start + 5, start + 6]
    left = fake_clock(monkeypatch, ticks)
    overrides = learning_overrides(
        learn_root,
        tmp_path / "r",
        f"teachers=[{learned_fp32 / 'best.pt'}]",
        "balancer.form=heldout",
        "balancer.every=10",
    )
    facts = pipeline.check(load_config(overrides=overrides), "distill")
    assert facts["seconds_per_step"] == pytest.approx(1.5)
    assert next(left, None) is None


def test_the_timed_steps_take_the_runs_batches_precision_and_held_out_pass(
    learn_root: Path, learned_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What is timed is the run's step: batches of train.batch_size, in its precision, and the
    balancer's held-out pass run (not only timed) on every step."""
    seen: dict[str, list] = {"batch_sizes": [], "precisions": [], "observed": []}
    forward_losses, observe = step.forward_losses, GoR.observe

    def spy_forward(model, task, batch, balancer, outputs, precision):
        seen["batch_sizes"].append(len(batch[1]))
        seen["precisions"].append((precision.enabled, precision.dtype))
        return forward_losses(model, task, batch, balancer, outputs, precision)

    def spy_observe(self: GoR, alignments: torch.Tensor) -> None:
        seen["observed"].append(alignments.shape)
        observe(self, alignments)

    monkeypatch.setattr(step, "forward_losses", spy_forward)
    monkeypatch.setattr(GoR, "observe", spy_observe)
    overrides = learning_overrides(
        learn_root,
        tmp_path / "r",
        f"teachers=[{learned_fp32 / 'best.pt'}]",
        "balancer.form=heldout",
        "balancer.every=10",
        "train.bf16=true",
    )
    config = load_config(overrides=overrides)
    pipeline.check(config, "distill")
    assert seen == {
        "batch_sizes": [config.train.batch_size] * 4,
        "precisions": [(True, torch.bfloat16)] * 4,
        "observed": [torch.Size([2])] * 4,
    }
