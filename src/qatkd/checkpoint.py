"""Checkpoint files: written atomically, read with `weights_only=True`, errors in one line.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing pickled), so
loading never executes code from the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qatkd.errors import QatkdError, first_line

FORMAT = "qatkd-checkpoint-v1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch reports a full disk as a RuntimeError raised while handling the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(e, Exception) and isinstance(cause, OSError):
            kept = f"; the previous {path.name} is kept" if path.is_file() else ""
            raise QatkdError(
                f"cannot write checkpoint {path}: {cause.strerror or cause}{kept}"
            ) from e
        raise


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes: the identity of a checkpoint or model file, by
    content (reuse keys, the checkpoint an artifact was made from)."""
    path = Path(path)
    if not path.is_file():
        raise QatkdError(f"file not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_nonfinite(state: Mapping[str, Any]) -> str | None:
    """The first key of a state dict whose floating-point tensor holds a NaN or an inf, or None:
    such weights come from a run that diverged, and nothing computed from them means anything."""
    for key, value in state.items():
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ):
            return key
    return None


def refuse_nonfinite(state: Mapping[str, Any], name: str) -> None:
    """A one-line `QatkdError` if the state dict of the model called `name` (e.g. "teacher
    t.pt") holds a non-finite value."""
    broken = first_nonfinite(state)
    if broken is not None:
        raise QatkdError(
            f"{name} holds non-finite weights ({broken}): the run that wrote it diverged; "
            "train it again with a lower train.lr"
        )


def content_sha256(path: str | Path) -> str:
    """The content hash of a file (`file_sha256`) or of a folder (every file's relative name and
    bytes, in order): the identity of a model a run starts from or learns from."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder standing for its `last.pt`."""
    path = Path(path)
    return path / "last.pt" if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a qatkd checkpoint on the CPU, refusing anything that is not one."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise QatkdError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise QatkdError(
            f"refusing checkpoint {path}: it holds pickled objects, not only tensors "
            f"({first_line(e)[:120]})"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise QatkdError(f"cannot read checkpoint {path}: the file is truncated or corrupt") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise QatkdError(f"{path} is not a qatkd checkpoint (expected format '{FORMAT}')")
    return state
