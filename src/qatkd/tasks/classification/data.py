"""Image-classification datasets: Fashion-MNIST idx files, CIFAR-10/100, ImageFolder trees, npz.

Every loader yields `(image, label)` with the image a float tensor in [0, 1], CHW. Normalisation is
part of the model (see `models.Normalize`), so an exported model takes raw pixels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from qatkd.config import DataConfig
from qatkd.errors import QatkdError
from qatkd.tasks.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    fashion_mnist_arrays,
)
from qatkd.tasks.image import ImageData

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGEFOLDER_SIZE = 32


class TensorImages(Dataset):
    """Images held in memory as uint8 NCHW, converted to float and augmented per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def content_digest(self) -> str:
        """sha256 of the images, labels and transform: what a model reads from this dataset."""
        digest = hashlib.sha256(repr(self.transform).encode())
        for tensor in (self.images, self.labels):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i].float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


def train_augmentation(image_size: int) -> v2.Compose:
    """Padded random crop and horizontal flip: the standard recipe for small images."""
    return v2.Compose(
        [v2.RandomCrop(image_size, padding=image_size // 8), v2.RandomHorizontalFlip()]
    )


def load_fashion_mnist(root: Path, augment: bool) -> ImageData:
    splits = fashion_mnist_arrays(root)
    return ImageData(
        name="fashion-mnist",
        train=TensorImages(*splits["train"], train_augmentation(28) if augment else None),
        test=TensorImages(*splits["test"]),
        class_names=FASHION_MNIST_CLASSES,
        in_channels=1,
        image_size=28,
        mean=(0.2860,),
        std=(0.3530,),
    )


def load_cifar(name: str, root: Path, augment: bool) -> ImageData:
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError as e:
        raise QatkdError(
            f"{name} not found in {root}: put the python-version archive's folder "
            f"({cls.base_folder}) there, as torchvision lays it out"
        ) from e

    def to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    mean, std = CIFAR_STATS[name]
    return ImageData(
        name=name,
        train=TensorImages(*to_tensors(train), train_augmentation(32) if augment else None),
        test=TensorImages(*to_tensors(test)),
        class_names=list(train.classes),
        in_channels=3,
        image_size=32,
        mean=mean,
        std=std,
    )


def _npz_arrays(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    if not path.is_file():
        raise QatkdError(f"npz data: {path} not found (data.root must hold train.npz and test.npz)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise QatkdError(f"{path} must hold arrays 'x' (images) and 'y' (labels)")
            x, y = f["x"], f["y"]
            classes = [str(c) for c in f["classes"]] if "classes" in f else None
    except (OSError, ValueError) as e:
        raise QatkdError(f"cannot read {path}: {e}") from e
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise QatkdError(f"{path}: 'x' must be N×H×W, N×H×W×C or N×C×H×W with C in (1, 3)")
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if len(x) != len(y):
        raise QatkdError(f"{path}: 'x' has {len(x)} images but 'y' has {len(y)} labels")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)), classes


def load_npz(root: Path, augment: bool) -> ImageData:
    x_train, y_train, classes = _npz_arrays(root / "train.npz")
    x_test, y_test, _ = _npz_arrays(root / "test.npz")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    pixels = x_train.float().div(255).transpose(0, 1).flatten(1)
    size = x_train.shape[-1]
    return ImageData(
        name="npz",
        train=TensorImages(x_train, y_train, train_augmentation(size) if augment else None),
        test=TensorImages(x_test, y_test),
        class_names=classes or [str(i) for i in range(num_classes)],
        in_channels=x_train.shape[1],
        image_size=size,
        mean=tuple(pixels.mean(1).tolist()),
        std=tuple(pixels.std(1).clamp_min(1e-3).tolist()),
    )


def _checked_pil_loader(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise QatkdError(f"cannot read image {path}: not a readable image file") from e


def load_imagefolder(root: Path, augment: bool) -> ImageData:
    splits = {s: root / s for s in ("train", "test")}
    if not (root / "test").is_dir() and (root / "val").is_dir():
        splits["test"] = root / "val"
    for folder in splits.values():
        if not folder.is_dir():
            raise QatkdError(
                f"imagefolder: {folder} not found (data.root needs train/ and test/ or val/)"
            )
    base = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((IMAGEFOLDER_SIZE,) * 2)]
    train_tf = v2.Compose(
        base + ([*train_augmentation(IMAGEFOLDER_SIZE).transforms] if augment else [])
    )
    try:
        train = datasets.ImageFolder(str(splits["train"]), train_tf, loader=_checked_pil_loader)
        test = datasets.ImageFolder(
            str(splits["test"]), v2.Compose(base), loader=_checked_pil_loader
        )
    except FileNotFoundError as e:
        raise QatkdError(f"imagefolder: {e}") from e
    if train.classes != test.classes:
        raise QatkdError(f"imagefolder: train and test class folders differ in {root}")
    mean, std = IMAGENET_STATS
    return ImageData("imagefolder", train, test, train.classes, 3, IMAGEFOLDER_SIZE, mean, std)


def labels(dataset: Dataset) -> torch.Tensor:
    """The label of every image of a dataset `load_data` made (or a Subset of one), without
    reading the images."""
    if isinstance(dataset, Subset):
        return labels(dataset.dataset)[list(dataset.indices)]
    if isinstance(dataset, TensorImages):
        return dataset.labels
    return torch.as_tensor(dataset.targets)  # torchvision's ImageFolder


def load_data(config: DataConfig) -> ImageData:
    """Build the train/test datasets that `config` names, capped by train_limit / test_limit."""
    if config.name == "fashion-mnist":
        data = load_fashion_mnist(
            Path(config.root) if config.root else FASHION_MNIST_ROOT, config.augment
        )
    else:
        if config.root is None:
            raise QatkdError(f"data.name={config.name} needs data.root=PATH (where the data lies)")
        root = Path(config.root)
        if not root.exists():
            raise QatkdError(f"data.root not found: {root}")
        if config.name in CIFAR_STATS:
            data = load_cifar(config.name, root, config.augment)
        elif config.name == "npz":
            data = load_npz(root, config.augment)
        else:
            data = load_imagefolder(root, config.augment)
    if config.train_limit is not None and config.train_limit < len(data.train):
        data.train = Subset(data.train, range(config.train_limit))
    if config.test_limit is not None and config.test_limit < len(data.test):
        data.test = Subset(data.test, range(config.test_limit))
    return data
