"""Content-keyed cache files in a benchmark's work folder, so that an interrupted run continues
where it stopped: a file holds its key beside its value, and a value is used only when the key
stored with it equals the one asked for (the file name, a digest of the key, only finds it).

A key is a JSON-able dict of everything the value depends on: settings, library versions, and
`source_digest` of the code that computes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def source_digest(paths: Iterable[Path]) -> str:
    """sha256 over the contents of `paths` (files, or folders for every .py file below them),
    each named relative to the repository root."""
    files = sorted(f for p in paths for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p]))
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.resolve().relative_to(ROOT)).encode() + b"\0")
        digest.update(f.read_bytes() + b"\0")
    return digest.hexdigest()


def entry(folder: Path, name: str, key: dict[str, Any]) -> Path:
    """The file of `name`'s value under `key` in `folder`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return folder / f"{name}-{digest[:16]}.pt"


def load(path: Path, key: dict[str, Any]) -> Any | None:
    """The value stored at `path` under `key`, or None (no file, one made under another key, or
    one this code cannot read)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        return None
    return stored["value"] if stored["key"] == plain(key) else None


def save(path: Path, key: dict[str, Any], value: Any) -> None:
    """Store `value` under `key` at `path`, whole or not at all (a killed run leaves no half
    file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"key": plain(key), "value": value}, partial)
    os.replace(partial, path)


def plain(key: dict[str, Any]) -> Any:
    """`key` in JSON's types (lists, not tuples; str, not its subclasses such as a version)."""
    return json.loads(json.dumps(key))
