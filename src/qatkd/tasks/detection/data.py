"""Detection data: Fashion-MNIST items pasted on a larger canvas (generated), or a YOLO folder.

Every dataset yields `(image, boxes, labels)`: the image a float tensor in [0, 1], CHW; boxes
`[MAX_OBJECTS, 4]` in pixels (x1, y1, x2, y2); labels `[MAX_OBJECTS]`, with -1 marking the padding
rows (a fixed size, so the default collation batches them).

The generated set is deterministic: canvas `i` of a split depends only on the split's seed and
`i`. Each canvas holds 1-5 items, each scaled to 22-44 pixels and placed at random where its box
overlaps every earlier box by IoU <= 0.3; overlapping pixels take the brighter value. A box is the
tight extent of its item's visible pixels (value > 10 of 255), so boxes are exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert, box_iou
from torchvision.transforms import v2

from qatkd.errors import QatkdError
from qatkd.tasks.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    fashion_mnist_arrays,
)
from qatkd.tasks.image import ImageData

MAX_OBJECTS = 32
CANVAS = 96
ITEM_SIZES = (22, 44)
OBJECTS_PER_CANVAS = (1, 5)
MAX_IOU = 0.3
VISIBLE = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SPLIT_SEEDS = {"train": 0, "test": 1}

Sample = tuple[Tensor, Tensor, Tensor]


def padded(boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Boxes and labels padded to MAX_OBJECTS rows; padding labels are -1."""
    n = len(labels)
    if n > MAX_OBJECTS:
        raise QatkdError(f"an image has {n} objects; at most {MAX_OBJECTS} are supported")
    out_boxes = torch.zeros(MAX_OBJECTS, 4)
    out_labels = torch.full((MAX_OBJECTS,), -1, dtype=torch.long)
    out_boxes[:n], out_labels[:n] = boxes[:n], labels[:n]
    return out_boxes, out_labels


def unpadded(boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    keep = labels >= 0
    return boxes[keep], labels[keep]


def make_canvas(
    items: Tensor, item_labels: Tensor, generator: torch.Generator, canvas: int = CANVAS
) -> tuple[Tensor, Tensor, Tensor]:
    """One canvas (uint8 [canvas, canvas]) with its boxes and labels, drawing items from `items`
    (uint8 [N, h, w]) with `generator` (module doc)."""
    image = torch.zeros(canvas, canvas, dtype=torch.uint8)
    boxes: list[Tensor] = []
    labels: list[int] = []
    low, high = OBJECTS_PER_CANVAS
    wanted = int(torch.randint(low, high + 1, (1,), generator=generator))
    for _ in range(wanted):
        index = int(torch.randint(len(items), (1,), generator=generator))
        size = int(torch.randint(ITEM_SIZES[0], ITEM_SIZES[1] + 1, (1,), generator=generator))
        item = F.interpolate(items[index][None, None].float(), size=(size, size), mode="bilinear")
        item = item[0, 0].round().clamp(0, 255).to(torch.uint8)
        rows, cols = torch.nonzero(item > VISIBLE, as_tuple=True)
        if len(rows) == 0:
            continue
        for _attempt in range(20):
            y, x = (int(v) for v in torch.randint(canvas - size + 1, (2,), generator=generator))
            box = torch.tensor(
                [x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1],
                dtype=torch.float32,
            )
            if not boxes or box_iou(box[None], torch.stack(boxes)).max() <= MAX_IOU:
                region = image[y : y + size, x : x + size]
                image[y : y + size, x : x + size] = torch.maximum(region, item)
                boxes.append(box)
                labels.append(int(item_labels[index]))
                break
    stacked = torch.stack(boxes) if boxes else torch.zeros(0, 4)
    return image, stacked, torch.tensor(labels, dtype=torch.long)


class CanvasDetection(Dataset):
    """`count` generated canvases from `items`, made once at construction (uint8 in memory)."""

    def __init__(
        self,
        items: Tensor,
        item_labels: Tensor,
        count: int,
        seed: int,
        augment: v2.Transform | None = None,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        canvases = [make_canvas(items, item_labels, generator) for _ in range(count)]
        self.images = torch.stack([c[0] for c in canvases])
        self.targets = [padded(c[1], c[2]) for c in canvases]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def content_digest(self) -> str:
        """sha256 of the canvases, their boxes and labels and the augmentation."""
        digest = hashlib.sha256(repr(self.augment).encode())
        for tensor in (self.images, *(t for target in self.targets for t in target)):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def __getitem__(self, i: int) -> Sample:
        image = self.images[i][None].float() / 255
        boxes, labels = self.targets[i]
        if self.augment is not None:
            image, boxes, labels = apply_augment(self.augment, image, *unpadded(boxes, labels))
            boxes, labels = padded(boxes, labels)
        return image, boxes, labels


def box_augmentation() -> v2.Transform:
    """Horizontal flip and scale jitter (0.8-1.2, same canvas size) that move the boxes with the
    pixels (torchvision's box-aware v2 transforms); boxes that leave the canvas are dropped."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=0, scale=(0.8, 1.2)),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=2),
        ]
    )


def apply_augment(
    transform: v2.Transform, image: Tensor, boxes: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    size = image.shape[-2:]
    boxed = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(size))
    out = transform({"image": tv_tensors.Image(image), "boxes": boxed, "labels": labels})
    return out["image"].as_subclass(Tensor), out["boxes"].as_subclass(Tensor), out["labels"]


@dataclass
class YoloLabel:
    """One labelled object of a YOLO text file (normalised centre and size)."""

    cls: int
    cx: float
    cy: float
    w: float
    h: float


def read_yolo_labels(path: Path, num_classes: int) -> list[YoloLabel]:
    """The objects of one YOLO label file: lines `class cx cy w h` (class an integer id, the
    rest in [0, 1] relative to the image); empty lines are skipped. Errors name file and line."""
    objects = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise QatkdError(
                f"{where}: expected 'class cx cy w h' (5 fields), "
                f"got {len(fields)}: {line.strip()!r}"
            )
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise QatkdError(
                f"{where}: expected an integer class and 4 numbers, got {line.strip()!r}"
            ) from None
        if not 0 <= cls < num_classes:
            raise QatkdError(
                f"{where}: class id {cls} is out of range: the folder has {num_classes} classes "
                f"(ids 0 to {num_classes - 1})"
            )
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            raise QatkdError(f"{where}: cx, cy, w, h must lie in [0, 1], got {line.strip()!r}")
        objects.append(YoloLabel(cls, cx, cy, w, h))
    if len(objects) > MAX_OBJECTS:
        raise QatkdError(f"{path}: {len(objects)} objects; at most {MAX_OBJECTS} are supported")
    return objects


def read_class_names(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        raise QatkdError(f"YOLO folder {root} has no classes.txt (one class name per line)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise QatkdError(f"{path} is empty: list one class name per line")
    return names


class YoloFolder(Dataset):
    """A YOLO-format split: `images/*.png|jpg|...` and `labels/<same stem>.txt` (no label file:
    no objects). Images are read in `mode` ("L" or "RGB"; default: grey if the first image is)
    and resized to `size` x `size`."""

    def __init__(
        self,
        root: Path,
        class_names: Sequence[str],
        size: int,
        mode: str | None = None,
        augment: v2.Transform | None = None,
    ) -> None:
        images = root / "images"
        if not images.is_dir():
            raise QatkdError(f"YOLO folder {root} has no images/ folder")
        self.paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise QatkdError(f"{images} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.labels = []
        for path in self.paths:
            label_file = root / "labels" / f"{path.stem}.txt"
            found = label_file.is_file()
            self.labels.append(read_yolo_labels(label_file, len(class_names)) if found else [])
        if mode is None:  # the first image decides: grey stays grey, anything else is RGB
            with Image.open(self.paths[0]) as first:
                mode = "L" if first.mode in ("L", "1", "I;16") else "RGB"
        self.size, self.mode, self.augment = size, mode, augment

    def __len__(self) -> int:
        return len(self.paths)

    def keep(self, count: int) -> None:
        """Use only the first `count` images (data.train_limit / data.test_limit)."""
        self.paths, self.labels = self.paths[:count], self.labels[:count]

    def content_digest(self) -> str:
        """sha256 of the image files' bytes, their objects, the size and mode they are read at
        and the augmentation: what `__getitem__` reads, without drawing an augmentation (a
        digest of augmented samples would differ with the random state)."""
        digest = hashlib.sha256(repr((self.size, self.mode, self.augment)).encode())
        for path, objects in zip(self.paths, self.labels, strict=True):
            try:
                digest.update(repr(objects).encode() + path.read_bytes())
            except OSError as e:
                raise QatkdError(f"cannot read image {path}: {e}") from None
        return digest.hexdigest()

    def __getitem__(self, i: int) -> Sample:
        try:
            with Image.open(self.paths[i]) as img:
                image = img.convert(self.mode).resize((self.size, self.size), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as e:
            raise QatkdError(f"cannot read image {self.paths[i]}: {e}") from None
        array = np.asarray(image, dtype=np.float32) / 255
        tensor = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        objects = self.labels[i]
        centre_size = torch.tensor([[o.cx, o.cy, o.w, o.h] for o in objects]).reshape(-1, 4)
        boxes = box_convert(centre_size * self.size, "cxcywh", "xyxy")
        labels = torch.tensor([o.cls for o in self.labels[i]], dtype=torch.long)
        if self.augment is not None:
            tensor, boxes, labels = apply_augment(self.augment, tensor.contiguous(), boxes, labels)
        return (tensor.contiguous(), *padded(boxes, labels))


def write_yolo_folder(dataset: Dataset, root: Path, class_names: Sequence[str]) -> None:
    """Save a detection dataset as a YOLO folder (PNG images): for users and tests."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(class_names) + "\n", encoding="utf-8")
    for i in range(len(dataset)):
        image, boxes, labels = dataset[i]
        boxes, labels = unpadded(boxes, labels)
        h, w = image.shape[-2:]
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8)
        array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(root / "images" / f"{i:06d}.png")
        lines = [
            f"{int(c)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} "
            f"{(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}"
            for b, c in zip(boxes.tolist(), labels.tolist(), strict=True)
        ]
        (root / "labels" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


TRAIN_CANVASES, TEST_CANVASES = 6000, 1000


def _mean_std(dataset: Dataset, count: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the first `count` images (without augmentation)."""
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def load_detection_data(config: Any) -> ImageData:
    """The detection data `config` (the `data:` section) names: `fashion-canvas` (generated,
    `data.train_limit` / `data.test_limit` canvases, default 6000 / 1000) or `yolo` (folders
    `data.root/train` and `data.root/test` or `val`, images resized to `data.image_size`)."""
    augment = box_augmentation() if config.augment else None
    if config.name == "fashion-canvas":
        root = Path(config.root) if config.root else FASHION_MNIST_ROOT
        splits = fashion_mnist_arrays(root)
        counts = {
            "train": config.train_limit or TRAIN_CANVASES,
            "test": config.test_limit or TEST_CANVASES,
        }
        made = {
            split: CanvasDetection(splits[split][0][:, 0], splits[split][1], counts[split], seed)
            for split, seed in SPLIT_SEEDS.items()
        }
        train, test, names, channels = made["train"], made["test"], FASHION_MNIST_CLASSES, 1
        size = CANVAS
    elif config.name == "yolo":
        if config.root is None:
            raise QatkdError("data.name=yolo needs data.root=PATH (with train/ and test/ or val/)")
        root = Path(config.root)
        if not root.is_dir():
            raise QatkdError(f"data.root not found: {root}")
        names, size = read_class_names(root), config.image_size
        test_dir = root / "test" if (root / "test").is_dir() else root / "val"
        train = YoloFolder(root / "train", names, size)
        test = YoloFolder(test_dir, names, size, mode=train.mode)
        channels = train[0][0].shape[0]
        if config.train_limit is not None and config.train_limit < len(train):
            train.keep(config.train_limit)
        if config.test_limit is not None and config.test_limit < len(test):
            test.keep(config.test_limit)
    else:
        raise QatkdError(
            f"task detection reads data.name=fashion-canvas or yolo, not {config.name}"
        )
    mean, std = _mean_std(train)
    train.augment = augment
    return ImageData(config.name, train, test, list(names), channels, size, mean, std)
