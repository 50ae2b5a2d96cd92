"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (idx files, gzipped or not): the
embedded default data of the classification family and the items of the detection canvases."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from qatkd.errors import QatkdError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally .gz), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype_code != 0x08:
                raise QatkdError(f"{path} is not an idx file of unsigned bytes")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as e:
        raise QatkdError(f"cannot read idx file {path}: {e}") from e
    if data.size != int(np.prod(shape)):
        raise QatkdError(f"idx file {path} is truncated: expected {int(np.prod(shape))} values")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise QatkdError(
        f"Fashion-MNIST not found: no {stem}.gz in {root}; install it with "
        "'apt-get install dataset-fashion-mnist' (as root) "
        "or set data.root to a folder with the idx files"
    )


def fashion_mnist_arrays(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train"/"test": (uint8 images [N, 1, 28, 28], int64 labels [N])} from the idx files."""
    splits = {}
    for split, (images_stem, labels_stem) in FASHION_MNIST_FILES.items():
        images = torch.from_numpy(read_idx(_find_idx(root, images_stem)).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(_find_idx(root, labels_stem)).astype(np.int64))
        if len(images) != len(labels):
            raise QatkdError(
                f"Fashion-MNIST {split} split in {root}: images and labels differ in count"
            )
        splits[split] = (images, labels)
    return splits
