"""Small datasets the tests write themselves: no test needs a download or the Debian package."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def make_images(n: int, num_classes: int, size: int, channels: int, seed: int):
    """Images whose class is a bright square at a class-specific place: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    cell = size // num_classes
    for i, label in enumerate(y):
        x[i, :, label * cell : (label + 1) * cell] = 230
    return x, y


def write_npz(root: Path) -> Path:
    """train.npz / test.npz with 3 classes of 1×12×12 images."""
    root.mkdir()
    for split, n, seed in (("train", 64, 0), ("test", 24, 1)):
        x, y = make_images(n, 3, 12, 1, seed)
        np.savez(root / f"{split}.npz", x=x[..., 0], y=y)
    return root


@pytest.fixture
def npz_root(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "npz")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    """A miniature Fashion-MNIST in the Debian package's idx.gz layout."""
    root = tmp_path / "fashion"
    root.mkdir()
    for prefix, n, seed in (("train", 40, 0), ("t10k", 20, 1)):
        x, y = make_images(n, 10, 28, 1, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x[..., 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
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
