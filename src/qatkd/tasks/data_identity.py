"""How a run identifies its data: by content (`content_digest`, of the dataset below any subsets,
`underlying`), and how a training checkpoint records the validation split it held out
(`held_out_record`), so that a later run can tell whether a teacher or its `model.init` trained on
that run's validation samples (`overlap`).

The validation split belongs to the data (`data.val_seed`): the record holds the data's content
digest, the number of training samples, the split's share and seed, and a digest of the held-out
indices. The teacher-logit cache keys its rows and `qatkd.run_dirs` a run's data the same way.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from qatkd.config import DataConfig
from qatkd.train.validation import split_indices

Labels = Callable[[Dataset], Tensor] | None
"""A family's class label of every sample of a dataset (to stratify the split), or None."""


def underlying(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset below any `Subset`s of `dataset`, and the index there of each of its
    samples."""
    positions = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        positions = [int(dataset.indices[i]) for i in positions]
        dataset = dataset.dataset
    return dataset, positions


def indices_digest(indices: Sequence[int]) -> str:
    """sha256 of a list of sample indices: how a checkpoint records its validation split."""
    return hashlib.sha256(json.dumps([int(i) for i in indices]).encode()).hexdigest()


def content_digest(dataset: Dataset) -> str:
    """sha256 of what a model reads from `dataset`: the dataset's own `content_digest()` where
    it holds its samples in memory, the bytes of every file for a torchvision image folder, and
    otherwise every sample's tensors, read in order. Computed once per dataset object (a run
    digests its training data for its held-out record and again for its run folder), so a
    dataset must not change after its first digest: loaders finish before anything digests."""
    if dataset not in _DIGESTS:
        _DIGESTS[dataset] = _content_digest(dataset)
    return _DIGESTS[dataset]


_DIGESTS: weakref.WeakKeyDictionary[Dataset, str] = weakref.WeakKeyDictionary()


def _content_digest(dataset: Dataset) -> str:
    if hasattr(dataset, "content_digest"):
        return dataset.content_digest()
    digest = hashlib.sha256(repr(getattr(dataset, "transform", None)).encode())
    if hasattr(dataset, "samples"):  # torchvision's ImageFolder: (path, class) per sample
        for path, target in dataset.samples:
            digest.update(f"{target}:".encode() + Path(path).read_bytes())
        return digest.hexdigest()
    # A dataset that augments draws its augmentations from torch's generator: under a fixed
    # seed the same data gives the same digest, and the run's own random sequence is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i in range(len(dataset)):
            for part in dataset[i]:
                digest.update(torch.as_tensor(part).contiguous().numpy().tobytes())
    return digest.hexdigest()


def held_out_record(
    plain_train: Dataset, held: list[int], data: DataConfig
) -> dict[str, Any] | None:
    """The record of a run's validation split `held` (indices into `plain_train`, the training
    images without augmentation), or None where a loader's limit took other than a prefix of the
    underlying data (the split could not be drawn again from the record)."""
    base, positions = underlying(plain_train)
    if positions != list(range(len(positions))):
        return None
    return {
        "data": content_digest(base),
        "samples": len(positions),
        "val_split": data.val_split,
        "val_seed": data.val_seed,
        "indices": indices_digest(held),
    }


def overlap(
    record: dict[str, Any] | None,
    ours: dict[str, Any] | None,
    val: Dataset,
    labels: Labels,
) -> str:
    """How many of this run's validation samples (`val`, whose split is `ours`) a model whose
    checkpoint recorded `record` trained on: "independent", "N of M validation samples in its
    training data", or "unknown (why)". Its held-out indices are drawn again from its recipe
    and checked by their digest."""
    if record is None or ours is None:
        return "unknown (its checkpoint does not record its validation split)"
    if record["data"] != ours["data"]:
        return "unknown (it trained on other data)"
    base, held = underlying(val)
    count = record["samples"]
    theirs: list[int] = []
    if record["val_split"]:
        prefix = Subset(base, range(count))
        stratify = None if labels is None else labels(prefix)
        theirs = split_indices(count, record["val_split"], record["val_seed"], stratify)[1]
    if indices_digest(theirs) != record["indices"]:
        return "unknown (its recorded split cannot be drawn again)"
    trained = set(range(count)) - set(theirs)
    overlapping = sum(i in trained for i in held)
    if not overlapping:
        return "independent"
    return f"{overlapping} of {len(held)} validation samples in its training data"
