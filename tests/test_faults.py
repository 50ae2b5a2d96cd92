"""A training tool is trusted only if a killed run resumes to the same result and a bad input
never costs work: kill -9, non-finite losses, and a table of bad inputs, each one line."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from qatkd import pipeline
from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.cli import EXIT_USER_ERROR, main
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.tasks.classification.models import build_model
from qatkd.tasks.classification.task import ClassificationTask
from qatkd.train.stops import RunStopped
from testdata import make_images, nan_after_step, tiny_overrides, write_idx, write_npz

QATKD = [sys.executable, "-m", "qatkd"]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(npz_root: Path, tmp_path: Path):
    """Only the killed run is a process of its own; the others run here (a start costs more
    than their training)."""
    args = ("train.epochs=3", "train.threads=1")
    assert main(["--quiet", "train", *tiny_overrides(npz_root, tmp_path / "full", *args)]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*QATKD, "train", *tiny_overrides(npz_root, cut, *args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (cut / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(cut / "last.pt")["epoch"]  # never truncated
    assert 1 <= interrupted_at < 3
    assert main(["--quiet", "train", "--resume", str(cut)]) == 0
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(cut / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"] == b["metrics"]


def _nan_at_step(monkeypatch: pytest.MonkeyPatch, bad_step: int, signum: int | None = None) -> None:
    """Step `bad_step`'s task loss is NaN (and, with `signum`, that signal arrives with it)."""
    original, calls = ClassificationTask.task_loss, []

    def task_loss(self, outputs, batch):
        calls.append(1)
        loss = original(self, outputs, batch)
        if len(calls) != bad_step:
            return loss
        if signum is not None:
            signal.raise_signal(signum)
        return loss * float("nan")

    monkeypatch.setattr(ClassificationTask, "task_loss", task_loss)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    npz_root, tmp_path, monkeypatch
):
    _nan_at_step(monkeypatch, bad_step=6)  # 4 steps per epoch: epoch 2, step 6
    config = load_config(overrides=tiny_overrides(npz_root, tmp_path / "run"))
    last = re.escape(str(tmp_path / "run" / "last.pt"))
    message = (
        rf"^the loss became non-finite at step 6 \(epoch 2; nan on this process\); the last good "
        rf"checkpoint is {last}: lower train\.lr and resume, or set train\.on_nonfinite=skip$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.train(config)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_nan_loss_can_skip_the_step(npz_root, tmp_path, monkeypatch, capsys):
    _nan_at_step(monkeypatch, bad_step=2)
    overrides = tiny_overrides(
        npz_root, tmp_path / "run", "train.on_nonfinite=skip", "data.val_split=0"
    )
    _, metrics = pipeline.train(load_config(overrides=overrides))  # 64 images: 4 steps an epoch
    assert metrics["steps"] == 8 and "skipped step 2" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "run")["model"].values())


def test_a_stop_at_a_skipped_step_resumes_to_the_run_that_skipped_it_and_went_on(
    npz_root, tmp_path, monkeypatch
):
    """A stop request arrives with step 2's non-finite loss: the step is skipped, the checkpoint
    holds epoch 1 after two batches with step 1's figures, and the resumed run ends on the
    weights and figures of the run never stopped."""
    extra = ("train.on_nonfinite=skip", "data.val_split=0")
    with monkeypatch.context() as m:
        _nan_at_step(m, bad_step=2)
        full, _ = pipeline.train(
            load_config(overrides=tiny_overrides(npz_root, tmp_path / "full", *extra))
        )
    cut = tmp_path / "cut"
    with monkeypatch.context() as m, pytest.raises(RunStopped):
        _nan_at_step(m, bad_step=2, signum=signal.SIGTERM)
        pipeline.train(load_config(overrides=tiny_overrides(npz_root, cut, *extra)))
    state = load_checkpoint(cut / "last.pt")
    position = state["position"]
    assert (state["epoch"], state["step"], position["batches"]) == (0, 2, 2)
    assert position["sums"][2] == 16  # the samples of step 1 only: batches of 16
    resumed, _ = pipeline.resume(cut)
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"] == b["metrics"]


def test_an_epoch_whose_every_step_was_skipped_stops_the_run(
    npz_root, tmp_path, monkeypatch, recwarn
):
    """Nothing was learnt and there are no figures to report: one line says so, and no warning
    of PyTorch's that the schedule stepped before the optimizer (it does, on purpose)."""
    original = ClassificationTask.task_loss
    monkeypatch.setattr(
        ClassificationTask, "task_loss", lambda self, *args: original(self, *args) * float("nan")
    )
    run = tmp_path / "run"
    config = load_config(overrides=tiny_overrides(npz_root, run, "train.on_nonfinite=skip"))
    with pytest.raises(QatkdError, match=r"^every step of epoch 1 had a non-finite loss$"):
        pipeline.train(config)
    assert not (run / "last.pt").exists()
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


def test_skipping_stops_once_the_weights_are_not_finite(npz_root, tmp_path, monkeypatch):
    """A skipped step cannot repair NaN weights: the run stops at the first skip after them
    (here in the middle of an epoch) rather than skipping every step to the end, and points at
    the last good checkpoint."""
    nan_after_step(monkeypatch, bad_step=4)  # 3 steps per epoch: the first of epoch 2
    run = tmp_path / "run"
    config = load_config(overrides=tiny_overrides(npz_root, run, "train.on_nonfinite=skip"))
    last = re.escape(str(run / "last.pt"))
    message = (
        rf"^the weights became non-finite \(student: .+\) by step 5 \(epoch 2\); the last good "
        rf"checkpoint is {last}: lower train\.lr and resume$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.train(config)
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_weights_are_never_saved_at_an_epochs_end(npz_root, tmp_path, monkeypatch):
    """The last step of epoch 1 leaves a NaN weight: the epoch's end refuses to write it."""
    nan_after_step(monkeypatch, bad_step=3)  # 3 steps per epoch
    run = tmp_path / "run"
    message = (
        r"^the weights became non-finite \(student: .+\) by step 3 \(epoch 1\); no checkpoint "
        r"was written yet: lower train\.lr and start again$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.train(load_config(overrides=tiny_overrides(npz_root, run)))
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_non_finite_balancer_weights_are_named_as_the_balancers(npz_root, tmp_path, monkeypatch):
    """GoR's learned weights become NaN in the last step of epoch 1: the message names them."""
    teacher, _ = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "t")))
    nan_after_step(monkeypatch, bad_step=3, group="balancer")  # 3 steps per epoch
    run = tmp_path / "run"
    overrides = tiny_overrides(npz_root, run, f"teachers=[{teacher / 'last.pt'}]")
    message = (
        r"^the weights became non-finite \(balancer: params\.0\) by step 3 \(epoch 1\); no "
        r"checkpoint was written yet: lower train\.lr and start again$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.distill(load_config(overrides=overrides))


def test_non_finite_weights_are_never_saved_inside_an_epoch(npz_root, tmp_path, monkeypatch):
    """A checkpoint due after every step (`train.save_every_min`): step 1's is written, step 2
    leaves a NaN weight and its checkpoint is refused, so last.pt stays step 1's."""
    nan_after_step(monkeypatch, bad_step=2)
    run = tmp_path / "run"
    overrides = tiny_overrides(npz_root, run, "train.save_every_min=1e-9")
    last = re.escape(str(run / "last.pt"))
    message = (
        rf"by step 2 \(epoch 1\); the last good checkpoint is {last}: lower train\.lr and resume$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.train(load_config(overrides=overrides))
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good FP32 run and checkpoint, a truncated copy, one whose weights are another model's,
    one carrying a pickled object, one recorded for 5 classes, a miniature Fashion-MNIST, a
    language model folder without weights, YOLO folders with a bad label, an empty image
    folder."""
    tmp_path = tmp_path_factory.mktemp("checkpoints")
    npz_root = write_npz(tmp_path / "npz")
    good, _ = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "good")))
    data = (good / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 3])
    state = load_checkpoint(good)
    other = build_model("resnet20", 1, 3, [0.5], [0.5])
    save_checkpoint({**state, "model": other.state_dict()}, tmp_path / "other_arch.pt")
    diverged = {k: v.clone() for k, v in state["model"].items()}
    next(v for v in diverged.values() if v.is_floating_point()).view(-1)[0] = float("inf")
    save_checkpoint({**state, "model": diverged}, tmp_path / "diverged.pt")
    five = {**state["meta"], "class_names": list("abcde")}
    save_checkpoint({**state, "meta": five}, tmp_path / "classes5.pt")
    torch.save({"format": "qatkd-checkpoint-v1", "meta": object()}, tmp_path / "pickled.pt")
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for prefix, n in (("train", 16), ("t10k", 8)):
        x, y = make_images(n, 10, 28, 1, 0)
        write_idx(fashion / f"{prefix}-images-idx3-ubyte.gz", x[..., 0])
        write_idx(fashion / f"{prefix}-labels-idx1-ubyte.gz", y)
    no_weights = tmp_path / "lm"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    for name, line in (("yolo_class", "3 0.5 0.5 0.2 0.2"), ("yolo_box", "0 1.5 0.5 0.2 0.2")):
        for split in ("train", "test"):
            (tmp_path / name / split / "images").mkdir(parents=True)
            (tmp_path / name / split / "labels").mkdir()
            Image.new("L", (16, 16)).save(tmp_path / name / split / "images" / "a.png")
            (tmp_path / name / split / "labels" / "a.txt").write_text(line + "\n")
        (tmp_path / name / "classes.txt").write_text("thing\n")
    for split in ("train", "test"):
        (tmp_path / "empty" / split).mkdir(parents=True)
    return {
        "good": good / "last.pt",
        "run": good,
        "truncated": tmp_path / "truncated.pt",
        "other_arch": tmp_path / "other_arch.pt",
        "classes5": tmp_path / "classes5.pt",
        "diverged": tmp_path / "diverged.pt",
        "pickled": tmp_path / "pickled.pt",
        "npz": npz_root,
        "fashion": fashion,
        "no_weights": no_weights,
        "yolo_class": tmp_path / "yolo_class",
        "yolo_box": tmp_path / "yolo_box",
        "empty": tmp_path / "empty",
    }


NPZ = ["data.name=npz", "data.root={npz}", "model.name=resnet8"]
CANVAS = ["task=detection", "data.root={fashion}", "data.train_limit=8", "data.test_limit=4"]
YOLO = ["task=detection", "data.name=yolo", "data.image_size=16"]
BAD_INPUTS = [
    ("missing dataset", ["train", "data.root=/nonexistent"], "Fashion-MNIST not found"),
    (
        "wrong config key",
        ["train", "train.epoch=1"],
        "unknown config key 'train.epoch' (did you mean 'train.epochs'?)",
    ),
    ("wrong config type", ["train", "train.epochs=zero"], "config key 'train.epochs' = 'zero'"),
    ("unsupported bit-width", ["train", "quant.bits=W5A5"], "bit-width 5 is not supported"),
    ("unknown quantizer", ["train", "quant.method=lsqq"], "unknown quantizer 'lsqq'"),
    ("unknown balancer", ["distill", "balancer.name=gorr"], "unknown balancer 'gorr'"),
    ("unknown model", ["train", "model.name=resnt20"], "unknown model 'resnt20'"),
    ("missing config file", ["train", "--config", "missing.yaml"], "config file not found"),
    ("missing checkpoint", ["eval", "--ckpt", "missing.pt"], "checkpoint not found: missing.pt"),
    ("missing teacher", ["distill", "teachers=[t.pt]"], "teacher checkpoint not found: t.pt"),
    ("no teacher for KD", ["distill", "balancer.name=fixed"], "needs at least one teacher"),
    ("teachers with train", ["train", "teachers=[t.pt]"], "train learns from labels only"),
    ("truncated checkpoint", ["eval", "--ckpt", "{truncated}"], "truncated or corrupt"),
    ("another architecture", ["eval", "--ckpt", "{other_arch}"], "does not fit model 'resnet8'"),
    ("pickled checkpoint", ["eval", "--ckpt", "{pickled}"], "holds pickled objects"),
    ("diverged checkpoint", ["eval", "--ckpt", "{diverged}"], "holds non-finite weights"),
    (
        "run folder is a file",
        ["train", "data.name=npz", "data.root={npz}", "model.name=resnet8", "out={pickled}"],
        "is a file: name a folder for the run",
    ),
    (
        "language option on images",
        ["train", "train.gradient_checkpointing=true"],
        "train.gradient_checkpointing is for language models",
    ),
    (
        "activation bits for an LLM",
        ["train", "task=language", "quant.bits=W4A8"],
        "language models are quantized weight-only (W4A16), or with int8 activations",
    ),
    ("unknown language model", ["train", "task=language", "model.name=gpt-17"], "is unknown"),
    ("missing text file", ["train", "task=language", "data.train_files=[nope.txt]"], "not found"),
    (
        "GGUF format on classification",
        ["train", "quant.format=q4_0"],
        "quant.format=q4_0 is a GGUF grid for language models",
    ),
    (
        "GGUF format on detection",
        ["train", "task=detection", "quant.format=q8_0"],
        "quant.format=q8_0 is a GGUF grid for language models; detection models",
    ),
    (
        "group scales on images",
        ["train", "quant.bits=W4A4", "quant.group_size=32"],
        "quant.group_size=32: per-group weight scales are for language models",
    ),
    (
        "zero points on images",
        ["train", "quant.asymmetric=true"],
        "quant.asymmetric gives the weight groups of language models offsets; classification",
    ),
    (
        "GPTQ start on images",
        ["train", "task=detection", "quant.init=gptq"],
        "quant.init=gptq calibrates on a language model's training text; detection models",
    ),
    (
        "GPTQ start on min-max grids",
        ["train", "task=language", "quant.init=gptq"],
        "quant.init=gptq takes the lsq weight method, not minmax: minmax recomputes its grid",
    ),
    ("truncated teacher", ["distill", *NPZ, "teachers=[{truncated}]"], "truncated or corrupt"),
    ("truncated model.init", ["train", *NPZ, "model.init={truncated}"], "truncated or corrupt"),
    (
        "teacher of another family",
        ["distill", *CANVAS, "teachers=[{good}]"],
        "is a classification model, but this run's task is detection",
    ),
    (
        "model.init of another family",
        ["train", *CANVAS, "model.init={good}"],
        "is a classification model, but this run's task is detection",
    ),
    (
        "teacher with other classes",
        ["distill", *NPZ, "teachers=[{classes5}]"],
        "was trained for 5 classes and 1 input channels, but data 'npz' has 3 classes",
    ),
    (
        "teacher-logit cache with augmentation",
        ["distill", *NPZ, "teachers=[{good}]", "kd.cache=true"],
        "kd.cache=true needs data.augment=false",
    ),
    (
        "empty image folder",
        ["train", "data.name=imagefolder", "data.root={empty}"],
        "Couldn't find any class folder",
    ),
    ("YOLO class out of range", ["train", *YOLO, "data.root={yolo_class}"], "out of range"),
    ("YOLO box outside the image", ["train", *YOLO, "data.root={yolo_box}"], "[0, 1]"),
    (
        "out inside a file",
        ["train", *NPZ, "out={pickled}/run"],
        "cannot be made: ",
    ),
    ("resume of a missing folder", ["train", "--resume", "gone"], "checkpoint not found: gone"),
    (
        "resume with other settings",
        ["train", "--resume", "{run}", "train.epochs=9"],
        "--resume continues a run with its saved config",
    ),
    (
        "resume with a config file",
        ["train", "--resume", "{run}", "--config", "other.yaml"],
        "--resume continues a run with its saved config: drop --config and key=value",
    ),
    (
        "language folder without weights",
        ["train", "task=language", "model.path={no_weights}"],
        "holds no weights",
    ),
    ("no GPU", ["train", "train.device=cuda"], "no CUDA device is available here"),
]


@pytest.mark.parametrize(("case", "argv", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_with_nonzero_exit(
    case, argv, message, capsys, checkpoints, tmp_path, monkeypatch
):
    """Exit status 2, one line naming the problem, no traceback, and nothing written: no run
    folder, in well under 10 s."""
    monkeypatch.chdir(tmp_path)
    argv = [a.format(**checkpoints) for a in argv]
    capsys.readouterr()  # drop what building the checkpoints printed
    started = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert err.count("\n") == 1 and err.startswith("qatkd: error: ") and "Traceback" not in err
    assert message in err
    assert list(tmp_path.iterdir()) == []  # no run folder (nor runs/)
    assert seconds < 10
