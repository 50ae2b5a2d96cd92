"""On-disk cache of teacher logits on a fixed (non-augmented) dataset, to run each teacher once."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from qatkd.errors import QatkdError


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes: a teacher checkpoint's identity for the cache key."""
    path = Path(path)
    if not path.is_file():
        raise QatkdError(f"file not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TeacherLogitCache:
    """One teacher's logits [N, C] on one dataset, stored under `root` by a hash of `key_parts`.

    `key_parts` must name everything the logits depend on: the teacher checkpoint's
    `file_sha256`, the dataset, a description of the transform and the sample count. Only cache
    data without random augmentation: the cached logits are for one fixed view of each sample.
    """

    def __init__(
        self, root: str | Path, key_parts: Mapping[str, object], dtype: torch.dtype = torch.float32
    ) -> None:
        key = json.dumps({**key_parts, "dtype": str(dtype)}, sort_keys=True, default=str)
        self.path = Path(root) / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"
        self.dtype = dtype

    def get(self, compute_fn: Callable[[], Tensor]) -> Tensor:
        """The cached logits, or `compute_fn()`'s, saved first (as `dtype`, on the CPU)."""
        if self.path.is_file():
            return torch.load(self.path, map_location="cpu", weights_only=True)
        logits = compute_fn().detach().to("cpu", self.dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temp file and rename: readers and concurrent writers never see a partial file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(logits, tmp)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return logits
