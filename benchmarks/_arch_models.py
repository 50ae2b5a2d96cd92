"""The models of the per-architecture speed page: torchvision classifiers (10 classes, untrained:
no weights can be downloaded here) briefly fine-tuned in float on Fashion-MNIST resized to the
input size in 3 channels, so that their logits tell the images apart and top-1 agreement
measures the export rather than ties between nearly equal logits.

The fine-tuned weights are cached in the work folder (`_cache`), keyed by the architecture, the
schedule, the library versions and the code that builds and trains them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from _cache import ROOT, entry, load, save, source_digest
from torch import Tensor, nn

from qatkd.nn import Classifier
from qatkd.tasks.classification.models import build_model
from qatkd.tasks.fashion_mnist import FASHION_MNIST_ROOT, fashion_mnist_arrays

ARCHITECTURES = (
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "mnasnet1_0",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "densenet121",
    "googlenet",
    "regnet_y_400mf",
    "resnet18",
    "resnet50",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
)
MEAN, STD = [0.286] * 3, [0.353] * 3
"""Fashion-MNIST's pixel statistics, in each of the 3 channels."""
LEARNING_RATE = {"vit_b_16": 3e-4, "swin_t": 3e-4, "convnext_tiny": 3e-4}
"""AdamW's learning rate where 1e-3 is too high for a transformer-like network from scratch."""
DEFAULT_LEARNING_RATE = 1e-3
NORM_BATCH = 32
"""The batch in which BatchNorm statistics are measured (memory, at 224 x 224)."""
POOL = 8192
"""The training images fine-tuning, BatchNorm statistics and calibration draw from."""


@dataclass(frozen=True)
class FineTuning:
    """How the float models are made: input size, AdamW steps and batch, and the training
    images their BatchNorm statistics are measured on afterwards."""

    size: int
    steps: int
    batch: int
    norm_images: int


class Images:
    """A Fashion-MNIST split as the models read it: resized to size x size, 3 channels, float
    [0, 1], made batch by batch (a whole split at 224 x 224 would not fit in memory)."""

    def __init__(self, pixels: Tensor, labels: Tensor, size: int) -> None:
        self.pixels, self.labels, self.size = pixels, labels, size

    def __call__(self, index: Tensor | slice) -> Tensor:
        x = self.pixels[index].float() / 255
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear").repeat(1, 3, 1, 1)

    def batches(self, count: int, batch: int) -> list[slice]:
        """The first `count` images, in batches."""
        return [slice(i, min(i + batch, count)) for i in range(0, count, batch)]

    def one_per_batch(self, count: int) -> list[np.ndarray]:
        """The first `count` images, each a batch of one: how the peers read calibration images."""
        return [self(slice(i, i + 1)).numpy() for i in range(count)]


def fashion_images(size: int) -> tuple[Images, Images]:
    """The training and the test split at `size`."""
    splits = fashion_mnist_arrays(FASHION_MNIST_ROOT)
    return Images(*splits["train"], size), Images(*splits["test"], size)


def untrained(name: str, size: int) -> Classifier:
    """The torchvision classifier `name` for 3 x size x size inputs and 10 classes, as
    `tv:<name>` builds it (ViT's position embeddings are made for its input size)."""
    if name.startswith("vit_"):
        net = torchvision.models.get_model(name, weights=None, num_classes=10, image_size=size)
        return Classifier(net, MEAN, STD)
    return build_model(f"tv:{name}", 3, 10, MEAN, STD)


def fine_tune(model: nn.Module, train: Images, schedule: FineTuning, lr: float) -> None:
    """AdamW steps on random batches of the first `POOL` training images, then the BatchNorm
    statistics of `schedule.norm_images` of them (after so few steps, the running averages are
    far from them), measured in eval mode otherwise: torch's `update_bn` runs the whole model in
    training mode, where stochastic depth and dropout would skew the later layers' statistics."""
    optimizer = torch.optim.AdamW(model.parameters(), lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(schedule.steps):
        index = torch.randint(0, POOL, (schedule.batch,), generator=generator)
        output = model(train(index))
        # GoogLeNet in training returns its auxiliary heads' logits too: the main ones train
        logits = output.logits if hasattr(output, "logits") else output
        loss = F.cross_entropy(logits, train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    with torch.no_grad():
        for index in train.batches(schedule.norm_images, NORM_BATCH):
            model(train(index))
    model.eval()


def fine_tuned(
    name: str, train: Images, schedule: FineTuning, work: Path
) -> tuple[Classifier, float]:
    """The fine-tuned float model `name` and the seconds its fine-tuning took, from the cache in
    `work` where an earlier run made it under the same key."""
    key = model_key(name, schedule)
    path = entry(work / name, "float", key)
    torch.manual_seed(0)  # the initial weights, whichever architecture came before
    model = untrained(name, schedule.size)
    cached = load(path, key)
    if cached is None:
        start = time.time()
        fine_tune(model, train, schedule, LEARNING_RATE.get(name, DEFAULT_LEARNING_RATE))
        cached = {"state_dict": model.state_dict(), "seconds": time.time() - start}
        save(path, key, cached)
    model.load_state_dict(cached["state_dict"])
    return model.eval(), cached["seconds"]


def model_key(name: str, schedule: FineTuning) -> dict[str, Any]:
    """What a fine-tuned model depends on."""
    code = [
        Path(__file__),
        ROOT / "src/qatkd/nn.py",
        ROOT / "src/qatkd/tasks/classification/models.py",
        ROOT / "src/qatkd/tasks/fashion_mnist.py",
    ]
    return {
        "architecture": name,
        "schedule": asdict(schedule),
        "lr": LEARNING_RATE.get(name, DEFAULT_LEARNING_RATE),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "source": source_digest(code),
    }
