"""Small datasets the tests write themselves, and the overrides of a run that takes a second."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def make_images(n: int, num_classes: int, size: int, channels: int, seed: int):
    """Images whose class is a bright square at a class-specific place: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    cell = size // num_classes
    for i, label in enumerate(y):
        x[i, :, label * cell : (label + 1) * cell] = 230
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
