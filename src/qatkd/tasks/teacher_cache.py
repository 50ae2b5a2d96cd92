"""The teacher-output cache of the image families: each teacher's outputs for every training
sample, computed once (`predict_all`, `predict_rows`) and looked up by sample index
(`WithIndex`, `CachedTeacherOutputs`), with the first batch checked against the live teachers.

A sample is keyed by its index in the dataset below any subsets (`underlying`) and the data by
its content (`content_digest`, both in `qatkd.tasks.data_identity`). Apart from
`qatkd.tasks.image` so that the shared image family stays about what a family does, and the
cache about what it stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from qatkd.device import module_device
from qatkd.distill import TeacherEnsemble
from qatkd.errors import QatkdError
from qatkd.progress import progress
from qatkd.tasks.data_identity import underlying
from qatkd.train.task import Task

PREDICT_BATCH_SIZE = 512
CACHE_TOLERANCE = 1e-3
"""Cached and live teacher logits may differ by this share of the largest logit: batches of
another size, or another machine, round differently; a wrong sample differs by far more."""


class WithIndex(Dataset):
    """Adds to each sample its index in the underlying dataset (`underlying`), so per-sample
    results (cached teacher logits) are looked up by sample, whatever subset a run reads."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.indices = underlying(dataset)[1]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return (*self.dataset[i], self.indices[i])


@torch.inference_mode()
def predict_all(model: nn.Module, dataset: Dataset) -> torch.Tensor:
    """The model's outputs for every sample of `dataset`, in order, on the CPU (for the
    teacher-logit cache), computed on the model's device."""
    model.eval()
    device = module_device(model)
    loader = DataLoader(dataset, batch_size=PREDICT_BATCH_SIZE)
    batches = progress(loader, desc="teacher logits")
    return torch.cat([model(x.to(device)).cpu() for x, *_ in batches])


class CachedTeacherOutputs:
    """The teachers' logits for a batch looked up by sample index (the last field that
    `WithIndex` adds); the first batch is also run through the live teachers, in float32, and a
    cache that disagrees with them stops the run."""

    def __init__(
        self, tables: list[torch.Tensor], live: TeacherEnsemble, task: Task, files: list[Path]
    ) -> None:
        self.tables, self.live, self.task, self.files = tables, live, task, files
        self.checked = False

    def __call__(self, batch: Any) -> list[torch.Tensor]:
        rows = [table[batch[-1]] for table in self.tables]
        if not self.checked:
            device = batch[-1].device.type
            with torch.autocast(device, enabled=False):
                live = self.live(self.task.inputs(batch))
            for label, file, cached, fresh in zip(
                self.live.labels, self.files, rows, live, strict=True
            ):
                gap = float((cached.float() - fresh.float()).abs().max())
                if gap > CACHE_TOLERANCE * max(1.0, float(fresh.abs().max())):
                    raise QatkdError(
                        f"the teacher-logit cache {file} disagrees with {label} on the first "
                        f"batch (max |difference| {gap:.3g}): delete it and run again"
                    )
            self.checked = True
        return rows


def predict_rows(model: nn.Module, dataset: Dataset, rows: torch.Tensor) -> torch.Tensor:
    """`predict_all` on the samples `rows` of `dataset`."""
    return predict_all(model, Subset(dataset, rows.tolist()))
