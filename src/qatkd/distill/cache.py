"""On-disk cache of teacher logits on a fixed (non-augmented) dataset, to run each teacher once.

A row belongs to a *sample*: row i holds the logits of sample i of the underlying dataset (before
any subset), so every seed, split and `data.train_limit` reads the right image's logits, and one
file serves them all. A cache keyed by position in a subset once served one seed's logits to
another seed's images without an error (design §1.4).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from qatkd.errors import QatkdError


class TeacherLogitCache:
    """One teacher's logits on one dataset of `size` samples, stored under `root` by a hash of
    `key_parts`, row i for sample i; rows are computed the first time a run asks for them.

    `key_parts` must name everything the logits depend on: the teacher checkpoint's
    `file_sha256`, the dataset's content and the transform. Only cache data without random
    augmentation: the cached logits are for one fixed view of each sample.
    """

    def __init__(
        self,
        root: str | Path,
        key_parts: Mapping[str, object],
        size: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.key = json.dumps(
            {**key_parts, "size": size, "dtype": str(dtype)}, sort_keys=True, default=str
        )
        self.path = Path(root) / f"{hashlib.sha256(self.key.encode()).hexdigest()}.pt"
        self.size, self.dtype = size, dtype

    def _read(self) -> tuple[Tensor, Tensor] | None:
        """(logits [size, C], filled [size]) from the file, or None when there is none."""
        if not self.path.is_file():
            return None
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            logits, filled = stored["logits"], stored["filled"]
            ok = stored["key"] == self.key and len(logits) == len(filled) == self.size
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile):
            ok = False  # not a torch file, or a truncated one
        except (KeyError, TypeError):
            ok = False  # a torch file of another layout
        if not ok:
            raise QatkdError(
                f"teacher-logit cache {self.path} is unreadable or not this cache's file: "
                "delete it and run again"
            )
        return logits, filled

    def _write(self, logits: Tensor, filled: Tensor) -> None:
        """Temp file and rename: readers and concurrent writers never see a partial file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"key": self.key, "logits": logits, "filled": filled}, tmp)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def rows(self, indices: Tensor, compute_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Every row of the cache [size, C] with the samples `indices` filled in: the missing
        ones are computed by `compute_fn(missing indices)` and saved first (as `dtype`, on the
        CPU). Rows no run asked for yet are zero."""
        indices = torch.as_tensor(indices, dtype=torch.long).unique()
        if len(indices) and not 0 <= int(indices.min()) <= int(indices.max()) < self.size:
            raise ValueError(f"sample indices outside [0, {self.size})")
        stored = self._read()
        missing = indices if stored is None else indices[~stored[1][indices]]
        if stored is not None and not len(missing):
            return stored[0]
        computed = compute_fn(missing).detach().to("cpu", self.dtype)
        if len(computed) != len(missing):
            raise ValueError(f"{len(computed)} rows computed for {len(missing)} samples")
        if stored is None:
            logits = torch.zeros(self.size, *computed.shape[1:], dtype=self.dtype)
            filled = torch.zeros(self.size, dtype=torch.bool)
        else:
            logits, filled = stored
        logits[missing], filled[missing] = computed, True
        self._write(logits, filled)
        return logits
