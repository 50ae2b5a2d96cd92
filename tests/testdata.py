"""Small datasets the tests write themselves, and the overrides of a run that takes a second."""

from __future__ import annotations

import csv
import gzip
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.train import engine


def make_images(n: int, num_classes: int, size: int, channels: int, seed: int):
    """Images whose class is a bright square at a class-specific place: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    cell = size // num_classes
    for i, label in enumerate(y):
        x[i, :, label * cell : (label + 1) * cell] = 230
    return x, y


def make_textures(n: int, seed: int, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """3 classes of 1×size×size images told apart by their texture: horizontal stripes, vertical
    stripes, a checkerboard. Unlike `make_images`' bars, the class survives the training
    augmentation (random crop, horizontal flip) and a CNN's global pooling, so a resnet8 learns
    it in a few steps (`learning_overrides`)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    rows, cols = np.indices((size, size))
    patterns = [rows % 2 == 0, cols % 2 == 0, (rows + cols) % 2 == 0]
    for i, label in enumerate(y):
        x[i][patterns[label]] += 150
    return x, y


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_npz(root: Path) -> Path:
    """train.npz / test.npz with 3 classes of 1×12×12 images."""
    root.mkdir()
    for split, n, seed in (("train", 64, 0), ("test", 24, 1)):
        x, y = make_images(n, 3, 12, 1, seed)
        np.savez(root / f"{split}.npz", x=x[..., 0], y=y)
    return root


def write_learnable_npz(root: Path) -> Path:
    """train.npz (128 images) / test.npz (48) of `make_textures`: data a model learns."""
    root.mkdir(parents=True)
    for split, n, seed in (("train", 128, 0), ("test", 48, 1)):
        x, y = make_textures(n, seed)
        np.savez(root / f"{split}.npz", x=x, y=y)
    return root


def write_learnable_yolo(root: Path, size: int = 32) -> Path:
    """A YOLO folder a detector learns in seconds: one bright square (12-16 px) per noisy dark
    `size` × `size` image, at a random place; 128 training and 32 test images, class "square"."""
    from PIL import Image

    for split, n, seed in (("train", 128, 0), ("test", 32, 1)):
        rng = np.random.default_rng(seed)
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir()
        for i in range(n):
            image = rng.integers(0, 40, (size, size)).astype(np.uint8)
            side = int(rng.integers(12, 17))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            image[y0 : y0 + side, x0 : x0 + side] = 220
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.png")
            box = [(x0 + side / 2) / size, (y0 + side / 2) / size, side / size, side / size]
            (root / split / "labels" / f"{i:03d}.txt").write_text(f"0 {' '.join(map(str, box))}\n")
    (root / "classes.txt").write_text("square\n")
    return root


def write_one_image_npz(root: Path) -> Path:
    """train.npz (128) / test.npz (24): one image repeated, under random labels of 3 classes.

    BatchNorm's batch statistics are then the same for any part of a batch, so training split
    over processes (each normalising its own share) computes what one process computes: the
    labels still differ from share to share, and so do the task loss and its gradients."""
    root.mkdir(parents=True)
    image = make_textures(1, seed=5)[0][0]
    for split, n, seed in (("train", 128, 0), ("test", 24, 1)):
        y = np.random.default_rng(seed).integers(0, 3, n)
        np.savez(root / f"{split}.npz", x=np.repeat(image[None], n, axis=0), y=y)
    return root


def majority_share(root: Path) -> float:
    """The test accuracy (%) of always predicting the most frequent test class."""
    y = np.load(root / "test.npz")["y"]
    return 100 * np.bincount(y).max() / len(y)


def learning_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """A run on `write_learnable_npz` data that learns it in about 2 s, FP32 or W4A4/W8A8 from
    scratch: over seeds 0-15, test accuracy 100 % and the loss of the last 3 steps at most 6 % of
    the first 3 (35 steps). At train.lr=0.05 a W8A8 run can stall (its first layer's LSQ input
    step grows to ~10), and with fewer epochs a QAT model can answer one class in eval mode
    (BatchNorm's running statistics lag its fast-moving weights)."""
    return [
        "data.name=npz",
        f"data.root={root}",
        "model.name=resnet8",
        f"out={out}",
        "train.epochs=5",
        "train.batch_size=16",
        "train.lr=0.02",
        "train.log_every=1",
        "train.threads=1",
        *extra,
    ]


def language_overrides(model: Path, text_files: tuple[Path, Path], *extra: str) -> list[str]:
    """A language run on the Hugging Face folder `model` (the tiny Llama of tests/language) and
    the test's (training, evaluation) text files, in blocks of 16 tokens; then `extra`."""
    train, evaluation = text_files
    return [
        "task=language",
        f"model.path={model}",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{evaluation}]",
        "data.block_size=16",
        *extra,
    ]


def tiny_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """A run on the npz fixture that takes a second or two."""
    return [
        "data.name=npz",
        f"data.root={root}",
        "model.name=resnet8",
        f"out={out}",
        "train.epochs=2",
        "train.batch_size=16",
        "train.lr=0.05",
        "train.log_every=1",
        *extra,
    ]


def measured_alignments(run_dir: Path) -> dict[str, list[float]]:
    """GoR form heldout's alignment columns of a run's steps.csv, after checking that every
    value is a cosine and that some are not zero (they were measured)."""
    with (run_dir / "steps.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {k: [float(r[k]) for r in rows] for k in rows[0] if k.startswith("align_")}
    values = [v for column in columns.values() for v in column]
    assert values and all(-1 <= v <= 1 for v in values) and any(values), columns
    return columns


def permuted_teacher(teacher: Path, out: Path) -> Path:
    """`teacher` (a run folder) with its output rows rotated, saved as `out`: it answers class
    (c+1) % 3 where it saw class c, so every answer is wrong."""
    state = load_checkpoint(teacher / "last.pt")
    for key in ("net.fc.weight", "net.fc.bias"):
        state["model"][key] = state["model"][key].roll(1, dims=0)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, out)
    return out


def nan_after_step(monkeypatch: pytest.MonkeyPatch, bad_step: int, group: str = "weights") -> None:
    """The update of step `bad_step` leaves a NaN in the first parameter of the optimizer's
    `group` (the student's weights, the balancer's, the KD loss's parts' `kd_weights`), its loss
    finite: what an overflowing update does."""
    original, calls = engine.optimizer_step, []

    def optimizer_step(total, optimizer, *args, **kwargs):
        original(total, optimizer, *args, **kwargs)
        calls.append(1)
        if len(calls) == bad_step:
            params = next(g["params"] for g in optimizer.param_groups if g["name"] == group)
            with torch.no_grad():
                params[0].view(-1)[0] = float("nan")

    monkeypatch.setattr(engine, "optimizer_step", optimizer_step)


def stop_after_epoch_1(monkeypatch: pytest.MonkeyPatch, start: Callable[[], object]) -> None:
    """Call `start` (a run), stopping it right after epoch 1's checkpoint is written: the
    epoch's line, printed next, raises Ctrl-C's KeyboardInterrupt."""

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(engine, "_print_epoch", interrupt)
        with pytest.raises(KeyboardInterrupt):
            start()


def signal_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, signum: int) -> None:
    """Send `signum` to this process once epoch `epoch` (counted from 0) has ended: its
    checkpoint written and its figures printed."""
    print_epoch = engine._print_epoch

    def print_then_signal(ended: int, *args: object) -> None:
        print_epoch(ended, *args)
        if ended == epoch:
            signal.raise_signal(signum)

    monkeypatch.setattr(engine, "_print_epoch", print_then_signal)


def slow_files_first(items: list[pytest.Item]) -> None:
    """Put the test files that hold a `slow` test first, in place: `make test`'s two workers take
    a file at a time in this order (`--no-loadscope-reorder`), and a long file taken last would
    leave the other worker idle to the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: else in collection order
