"""The validation split: seeded, stratified, without augmentation, and what `best.pt` is
chosen on."""

import csv
import json
from pathlib import Path

import pytest
import torch

from qatkd import pipeline
from qatkd.checkpoint import load_checkpoint
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.tasks import task_family
from qatkd.tasks.classification.data import labels
from qatkd.tasks.classification.task import ClassificationTask
from qatkd.tasks.language.data import hold_out_blocks
from qatkd.train.validation import split_indices
from testdata import tiny_overrides


def test_split_is_stratified_disjoint_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = split_indices(100, 0.1, seed=3, labels=y)
    assert sorted(kept + held) == list(range(100)) and not set(kept) & set(held)
    assert kept == sorted(kept) and held == sorted(held)
    assert torch.bincount(y[held]).tolist() == [5, 3, 2]
    assert split_indices(100, 0.1, seed=3, labels=y) == (kept, held)
    assert split_indices(100, 0.1, seed=4, labels=y)[1] != held
    assert len(split_indices(100, 0.25, seed=0)[1]) == 25  # no labels: a plain random share


@pytest.mark.parametrize(
    ("share", "per_class"),
    [(0.1, [0, 1, 1, 2]), (0.5, [0, 1, 2, 10]), (0.9, [0, 1, 2, 18])],
)
def test_each_class_keeps_its_rounded_share_one_of_two_or_more_and_never_all(share, per_class):
    """Classes of 1, 2, 3 and 20 samples: round(share * n) of each, at least one where a
    class has two or more, and always one left to train on."""
    y = torch.tensor([0] + [1] * 2 + [2] * 3 + [3] * 20)
    held = split_indices(len(y), share, seed=0, labels=y)[1]
    assert torch.bincount(y[held], minlength=4).tolist() == per_class


def test_split_share_zero_and_bad_shares():
    assert split_indices(10, 0.0, seed=0) == (list(range(10)), [])
    with pytest.raises(QatkdError, match=r"data\.val_split=1\.0: use a share in"):
        split_indices(10, 1.0, seed=0)
    with pytest.raises(QatkdError, match="holds out no sample of 1"):
        split_indices(1, 0.1, seed=0)
    with pytest.raises(QatkdError, match=r"^2 labels for 3 training samples$"):
        split_indices(3, 0.5, seed=0, labels=[0, 1])
    with pytest.raises(QatkdError, match=r"data\.val_split"):
        load_config(overrides=["data.val_split=1"])


def test_validation_images_are_held_out_of_training_and_not_augmented(npz_root, tmp_path):
    config = load_config(overrides=tiny_overrides(npz_root, tmp_path, "data.val_split=0.25"))
    data = task_family("classification").load(config)
    assert data.train.dataset.transform is not None and data.val.dataset.transform is None
    assert not set(data.train.indices) & set(data.val.indices)
    total = len(data.train) + len(data.val)
    assert len(data.val) == pytest.approx(total / 4, abs=len(data.class_names))
    everything = labels(data.train.dataset)
    assert set(everything[data.val.indices].tolist()) == set(everything.tolist())
    assert task_family("classification").load(config, training=False).val is None


def test_language_blocks_are_held_out_and_scored_on_every_token():
    blocks = torch.utils.data.TensorDataset(torch.arange(40).reshape(10, 4))
    train, val = hold_out_blocks(blocks, 0.2, seed=0)
    ids, labels_ = val.tensors
    assert len(train) == 8 and len(val) == 2 and torch.equal(ids, labels_)
    assert not {int(r[0]) for r in ids} & {int(r[0]) for r in train.tensors[0]}


def test_best_checkpoint_is_chosen_on_validation_and_reported_on_test(
    npz_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    scripted = {"val": iter([10.0, 30.0, 20.0]), "test": iter([50.0, 10.0, 40.0])}
    monkeypatch.setattr(
        ClassificationTask,
        "evaluate",
        lambda self, model, loader, split: {"acc": next(scripted[split])},
    )
    overrides = tiny_overrides(npz_root, tmp_path / "run", "train.epochs=3")
    run_dir, metrics = pipeline.train(load_config(overrides=overrides))
    assert metrics["selected_on"] == "val" and metrics["best_epoch"] == 2
    assert (metrics["best_val_acc"], metrics["best_test_acc"]) == (30.0, 10.0)
    assert (metrics["val_acc"], metrics["test_acc"]) == (20.0, 40.0)  # the last epoch
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["best_test_acc"] == 10.0
    with (run_dir / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["val_acc"], r["test_acc"]) for r in rows] == [
        ("10", "50"),
        ("30", "10"),
        ("20", "40"),
    ]


def test_without_validation_the_test_set_chooses(npz_root, tmp_path, monkeypatch):
    scripted = iter([50.0, 10.0])
    monkeypatch.setattr(
        ClassificationTask, "evaluate", lambda self, model, loader, split: {"acc": next(scripted)}
    )
    overrides = tiny_overrides(npz_root, tmp_path / "run", "data.val_split=0")
    run_dir, metrics = pipeline.train(load_config(overrides=overrides))
    assert metrics["selected_on"] == "test" and metrics["best_test_acc"] == 50.0
    assert "val_acc" not in metrics and load_checkpoint(run_dir / "best.pt")["epoch"] == 1


def test_validation_split_belongs_to_the_data_not_to_the_seed(npz_root, tmp_path):
    family = task_family("classification")

    def held(*extra: str) -> list[int]:
        config = load_config(overrides=tiny_overrides(npz_root, tmp_path, *extra))
        return list(family.load(config).val.indices)

    assert held("seed=0") == held("seed=1") == held("seed=7")
    assert held("data.val_seed=1") != held()


def test_runs_record_whether_teachers_trained_on_their_validation_images(
    npz_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    def trained(name: str, *extra: str) -> Path:
        overrides = tiny_overrides(npz_root, tmp_path / name, "train.epochs=1", *extra)
        return pipeline.train(load_config(overrides=overrides))[0] / "last.pt"

    same, everything = trained("same"), trained("all", "data.val_split=0")
    other = trained("other", "data.val_seed=1")
    unrecorded = tmp_path / "unrecorded.pt"
    state = load_checkpoint(same)
    del state["meta"]["held_out"]
    torch.save(state, unrecorded)
    teachers = f"teachers=[{same},{everything},{other},{unrecorded}]"
    overrides = tiny_overrides(npz_root, tmp_path / "s", "train.epochs=1", teachers)
    capsys.readouterr()
    _, metrics = pipeline.distill(load_config(overrides=overrides))
    verdicts = metrics["validation_independence"]
    data = task_family("classification").load(load_config(overrides=overrides))
    held = len(data.val)
    assert verdicts[f"teacher {same}"] == "independent"
    assert verdicts[f"teacher {everything}"] == (
        f"{held} of {held} validation samples in its training data"
    )
    overlap = int(verdicts[f"teacher {other}"].split()[0])
    assert 0 < overlap < held  # its own held-out images overlap ours in part
    assert verdicts[f"teacher {unrecorded}"].startswith("unknown (its checkpoint does not record")
    printed = capsys.readouterr().out
    assert f"note: teacher {everything}: {held} of {held} validation samples" in printed
    assert f"teacher {same}" not in printed
