"""Everything reused is keyed by what it depends on: teacher logits by sample and content, finished
runs by their whole configuration and the content of their model files, exports by the
checkpoint they were made from."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from qatkd import pipeline, reuse, run_dirs
from qatkd.checkpoint import file_sha256, load_checkpoint
from qatkd.cli import EXIT_USER_ERROR, main
from qatkd.config import load_config
from qatkd.distill import TeacherEnsemble
from qatkd.errors import QatkdError
from qatkd.run_dirs import data_digest
from qatkd.tasks import task_family
from qatkd.tasks.classification.data import TensorImages
from qatkd.tasks.data_identity import content_digest
from testdata import stop_after_epoch_1, tiny_overrides


@pytest.fixture
def teacher(npz_root: Path, tmp_path: Path) -> Path:
    run_dir, _ = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "t")))
    return run_dir / "last.pt"


def cached_overrides(npz_root: Path, tmp_path: Path, teacher: Path, *extra: str) -> list[str]:
    cache = f"kd.cache_dir={tmp_path / 'cache'}"
    common = ["data.augment=false", f"teachers=[{teacher}]", "kd.cache=true", cache, *extra]
    return tiny_overrides(npz_root, tmp_path / "run", *common)


@pytest.mark.parametrize("extra", [["seed=1"], ["data.val_seed=1"], ["data.train_limit=40"]])
def test_cached_logits_are_the_live_teachers_on_each_runs_own_images(
    npz_root: Path, tmp_path: Path, teacher: Path, extra: list[str]
):
    """The cache one run wrote serves a run over another subset of the same images: each batch
    gets the logits of its own images (a cache keyed by position served seed 0's logits to seed
    1's images)."""
    family = task_family("classification")
    for overrides in ([], extra):
        config = load_config(overrides=cached_overrides(npz_root, tmp_path, teacher, *overrides))
        data = family.load(config)
        task = family.make_task(config, data)
        lookup, train_set = family.teacher_outputs(config, data, task, torch.device("cpu"))
        live = TeacherEnsemble([family.restore(load_checkpoint(teacher))])
        for batch in DataLoader(train_set, batch_size=16, shuffle=True):
            torch.testing.assert_close(lookup(batch)[0], live(batch[0])[0], rtol=0, atol=1e-4)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one file serves every subset


def test_a_cache_that_disagrees_with_the_live_teacher_stops_the_run(npz_root, tmp_path, teacher):
    overrides = cached_overrides(npz_root, tmp_path, teacher)
    pipeline.distill(load_config(overrides=overrides))
    (file,) = (tmp_path / "cache").iterdir()
    stored = torch.load(file, weights_only=True)
    stored["logits"] = stored["logits"].roll(1, dims=0)  # every row now another sample's
    torch.save(stored, file)
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(QatkdError, match=r"teacher-logit cache .* disagrees with teacher 0"):
        pipeline.distill(load_config(overrides=overrides))


def test_a_corrupt_cache_file_is_one_line_from_the_cli(npz_root, tmp_path, teacher, capsys):
    overrides = cached_overrides(npz_root, tmp_path, teacher)
    pipeline.distill(load_config(overrides=overrides))
    (file,) = (tmp_path / "cache").iterdir()
    file.write_bytes(file.read_bytes()[:100])  # a copy cut short
    shutil.rmtree(tmp_path / "run")
    capsys.readouterr()
    assert main(["distill", *overrides]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"qatkd: error: teacher-logit cache {file} is unreadable")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_another_teacher_or_other_data_misses_the_cache(npz_root, tmp_path, teacher):
    """One cache file per teacher content and data content: a changed teacher weight or one
    changed pixel is a miss, the same images in another folder a hit."""

    def cache_files_after_distill(root: Path, teacher_file: Path) -> set[str]:
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        pipeline.distill(load_config(overrides=cached_overrides(root, tmp_path, teacher_file)))
        return {file.name for file in (tmp_path / "cache").iterdir()}

    first = cache_files_after_distill(npz_root, teacher)
    assert len(first) == 1
    assert (
        cache_files_after_distill(shutil.copytree(npz_root, tmp_path / "moved"), teacher) == first
    )

    other = tmp_path / "other.pt"
    state = load_checkpoint(teacher)
    state["model"] = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()
    }
    torch.save(state, other)
    second = cache_files_after_distill(npz_root, other)
    assert len(second) == 2 and first < second

    changed = shutil.copytree(npz_root, tmp_path / "changed")
    train = dict(np.load(changed / "train.npz"))
    train["x"][0, 0, 0] ^= 1  # one pixel of one training image
    np.savez(changed / "train.npz", **train)
    assert len(cache_files_after_distill(changed, teacher)) == 3


def test_content_digest_follows_images_labels_and_transform():
    images, labels = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    base = content_digest(TensorImages(images, labels))
    changed = images.clone()
    changed[2, 0, 3, 3] = 1
    assert content_digest(TensorImages(changed, labels)) != base
    assert content_digest(TensorImages(images, labels.flip(0))) != base
    assert content_digest(TensorImages(images, labels, torch.nn.Identity())) != base
    assert content_digest(TensorImages(images.clone(), labels.clone())) == base


class _Augmenting(torch.utils.data.Dataset):
    """A dataset with no digest of its own whose samples carry torch-random noise."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (self.images[i] + torch.rand(()),)


def test_digest_of_samples_is_stable_under_augmentation_and_leaves_the_random_state():
    images = torch.zeros(3, 2)
    before = torch.get_rng_state()
    base = content_digest(_Augmenting(images))
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)  # another random state
    assert content_digest(_Augmenting(images.clone())) == base
    assert content_digest(_Augmenting(images + 1)) != base


def test_data_that_cannot_be_read_for_its_digest_leaves_no_run_folder(
    npz_root, tmp_path, monkeypatch, capsys
):
    def unreadable(source: object) -> str:
        raise QatkdError("cannot read image x.png: gone")

    monkeypatch.setattr(run_dirs, "data_digest", unreadable)
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(npz_root, out)]) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "qatkd: error: cannot read image x.png: gone\n"
    assert not out.exists()


def test_run_or_reuse_compares_every_key_not_only_those_set(npz_root, tmp_path):
    run = tmp_path / "run"
    unset = [o for o in tiny_overrides(npz_root, run) if not o.startswith("train.epochs")]
    first = reuse.run_or_reuse(run, "train", [*unset, "train.epochs=1"])
    assert reuse.run_or_reuse(run, "train", [*unset, "train.epochs=1"]) == first
    with pytest.raises(QatkdError, match=r"made with other settings \(train\.epochs: 1 there, 5"):
        reuse.run_or_reuse(run, "train", unset)  # the default, 5 epochs

    # A folder made before a key existed is refused too: a new key's default need not be what
    # the older code did, so reusing it could report an old experiment under the new name.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["train"]["tensorboard"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(QatkdError, match=r"train\.tensorboard: not in its config\.yaml, which an"):
        reuse.run_or_reuse(run, "train", [*unset, "train.epochs=1"])


def test_a_key_declared_with_the_old_behaviour_may_be_missing_from_a_saved_config(
    npz_root, tmp_path
):
    """`quant.asymmetric` came after symmetric grids, its default False: a quantized run saved
    without it (or without `quant.init_samples`, or `quant.act_grid` at symmetric) is that run;
    one saved without `quant.act_grid` is not a run at today's default (auto). Nothing is added
    to a section the saved config does not have: an FP32 run (quant null) is still reused as
    FP32."""
    run = tmp_path / "run"
    symmetric = "quant.act_grid=symmetric"
    overrides = tiny_overrides(npz_root, run, "train.epochs=1", "quant.bits=W4A4", symmetric)
    first = reuse.run_or_reuse(run, "train", overrides)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["quant"]["asymmetric"], saved["quant"]["init_samples"], saved["quant"]["act_grid"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert reuse.run_or_reuse(run, "train", overrides) == first
    at_default = [o for o in overrides if o != symmetric]
    with pytest.raises(QatkdError, match=r"quant\.act_grid: 'symmetric' there"):
        reuse.run_or_reuse(run, "train", at_default)
    fp32 = tmp_path / "fp32"
    fp32_overrides = tiny_overrides(npz_root, fp32, "train.epochs=1")
    assert reuse.run_or_reuse(fp32, "train", fp32_overrides) == reuse.run_or_reuse(
        fp32, "train", fp32_overrides
    )


def test_run_or_reuse_refuses_a_run_made_from_another_teacher(npz_root, tmp_path, teacher):
    run = tmp_path / "student"
    overrides = tiny_overrides(npz_root, run, "train.epochs=1", f"teachers=[{teacher}]")
    reuse.run_or_reuse(run, "distill", overrides)
    inputs = json.loads((run / "inputs.json").read_text())
    assert inputs.keys() == {f"teacher {teacher}", "data"}
    assert inputs[f"teacher {teacher}"] == file_sha256(teacher)
    assert reuse.run_or_reuse(run, "distill", overrides)["epochs"] == 1  # reused
    pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "t2", "seed=5")))
    shutil.copy(tmp_path / "t2" / "last.pt", teacher)  # the teacher retrained in place
    with pytest.raises(QatkdError, match=rf"not made from the current teacher {teacher}"):
        reuse.run_or_reuse(run, "distill", overrides)


@pytest.mark.parametrize(
    ("command", "split"), [("train", "train"), ("train", "test"), ("ptq", "test")]
)
def test_run_or_reuse_refuses_a_run_made_from_other_data_under_the_same_root(
    npz_root, tmp_path, command, split
):
    """The configuration names the data by its place; a file rewritten there is other data.
    One pixel of a training image, or one test label, refuses the folder."""
    run = tmp_path / "run"
    fp32 = tmp_path / "fp32"
    if command == "ptq":
        pipeline.train(load_config(overrides=tiny_overrides(npz_root, fp32, "train.epochs=1")))
    extra = [f"model.init={fp32}", "quant.bits=W4A4"] if command == "ptq" else []
    overrides = tiny_overrides(npz_root, run, "train.epochs=1", *extra)
    first = reuse.run_or_reuse(run, command, overrides)
    assert reuse.run_or_reuse(run, command, overrides) == first
    arrays = dict(np.load(npz_root / f"{split}.npz"))
    if split == "train":
        arrays["x"][0, 0, 0] ^= 1
    else:
        arrays["y"][0] = (arrays["y"][0] + 1) % 3
    np.savez(npz_root / f"{split}.npz", **arrays)
    with pytest.raises(QatkdError, match=rf"{run} was not made from the current data \("):
        reuse.run_or_reuse(run, command, overrides)


def test_the_data_digest_covers_every_split_of_any_family():
    """Language text is a TensorDataset of token ids: another token anywhere, in the training,
    validation or test text, is other data; the same tokens in new tensors are the same."""

    def source(train, val, test):
        return SimpleNamespace(
            train=TensorDataset(train),
            val=None if val is None else TensorDataset(val, val),
            test=TensorDataset(test, test),
        )

    ids = [torch.arange(12).reshape(3, 4) + k for k in range(3)]
    base = data_digest(source(*ids))
    for k in range(3):
        changed = [t.clone() for t in ids]
        changed[k][1, 2] += 100
        assert data_digest(source(*changed)) != base
    assert data_digest(source(*(t.clone() for t in ids))) == base
    assert data_digest(source(ids[0], None, ids[2])) != base


def test_bench_re_exports_a_checkpoint_that_changed_since_its_export(npz_root, tmp_path, capsys):
    quant = ["quant.bits=W8A8", "train.epochs=1"]
    first, _ = pipeline.train(
        load_config(overrides=tiny_overrides(npz_root, tmp_path / "a", *quant))
    )
    pipeline.export(first)
    exported = json.loads((first / "parity.json").read_text())
    assert exported["checkpoint_sha256"] == file_sha256(first / "last.pt")
    other, _ = pipeline.train(
        load_config(overrides=tiny_overrides(npz_root, tmp_path / "b", *quant, "seed=3"))
    )
    shutil.copy(other / "last.pt", first / "last.pt")  # e.g. a resumed run, trained further
    result = pipeline.bench(first, batch_sizes=(1,), repeats=1)
    assert "re-exporting" in capsys.readouterr().out
    current = file_sha256(first / "last.pt")
    assert result["checkpoint_sha256"] == current
    assert json.loads((first / "parity.json").read_text())["checkpoint_sha256"] == current
    assert result["parity"]["onnxruntime"]["agreement"] == 100.0


def test_run_or_reuse_resumes_an_interrupted_run_to_the_uninterrupted_weights(
    npz_root, tmp_path, monkeypatch
):
    """A folder with last.pt but no metrics.json (a stage stopped after epoch 1) is resumed, not
    refused or started again: its weights end as those of a run never stopped."""
    whole = reuse.run_or_reuse(tmp_path / "whole", "train", tiny_overrides(npz_root, tmp_path))
    cut = tmp_path / "cut"
    stop_after_epoch_1(
        monkeypatch, lambda: reuse.run_or_reuse(cut, "train", tiny_overrides(npz_root, tmp_path))
    )
    assert load_checkpoint(cut / "last.pt")["epoch"] == 1
    assert not (cut / "metrics.json").exists()
    resumed = reuse.run_or_reuse(cut, "train", tiny_overrides(npz_root, tmp_path))
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(cut / "last.pt")
    assert b["epoch"] == a["epoch"] == 2 and b["step"] == a["step"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == whole["test_acc"] and resumed["epochs"] == 2
    assert [line.split(",")[0] for line in (cut / "log.csv").read_text().splitlines()] == [
        "epoch",
        "1",
        "2",
    ]
    assert reuse.run_or_reuse(cut, "train", tiny_overrides(npz_root, tmp_path)) == resumed
