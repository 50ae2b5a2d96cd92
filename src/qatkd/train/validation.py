"""The validation split: a seeded share of the training set held out, so that checkpoints, fixed
loss weights and learning rates are chosen on data the test set never sees.

`split_indices` is the same for every task family; a family with labels (classification) makes
it stratified, so each class keeps its share in both parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qatkd.errors import QatkdError


def split_indices(
    count: int,
    share: float,
    seed: int,
    labels: Sequence[int] | torch.Tensor | None = None,
    key: str = "data.val_split",
) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of `count` samples: `share` of them held out,
    drawn with `seed`; with `labels`, `share` of every class (rounded, at least one sample of
    a class with two or more). Both lists are sorted. `key`: the setting errors name."""
    if not 0 <= share < 1:
        raise QatkdError(f"{key}={share}: use a share in [0, 1), e.g. 0.1; 0 turns it off")
    if share == 0:
        return list(range(count)), []
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        groups = [torch.arange(count)]
    else:
        labels = torch.as_tensor(labels)
        if len(labels) != count:
            raise QatkdError(f"{len(labels)} labels for {count} training samples")
        groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    held: list[int] = []
    for group in groups:
        size = round(share * len(group))
        if size == 0 and len(group) > 1:
            size = 1
        size = min(size, len(group) - 1)
        held += group[torch.randperm(len(group), generator=generator)[:size]].tolist()
    if not held:
        raise QatkdError(f"{key}={share} holds out no sample of {count}: raise it")
    kept = sorted(set(range(count)) - set(held))
    return kept, sorted(held)
