"""The result of a benchmark stage that is no qatkd run (a peer's quantization and its scores, a
file scored in llama.cpp), kept as JSON beside the key it was made from: reused while the key is
the same, made again when anything in it changed. The key names everything the result depends
on (model and file contents, package versions, the evaluation windows), as `run_or_reuse`
compares a run's whole configuration."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def keyed(path: Path, key: dict[str, Any], make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The result stored at `path` for `key`, or `make()`'s, stored there with the key."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result
