"""CSV logs that survive a resume: rows past the checkpoint are dropped before appending again."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class CsvLog:
    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields

    def start(self, keep_while: tuple[str, int] | None) -> None:
        """Start a fresh log, or (on resume) keep only rows whose `key` <= `limit`."""
        rows: list[dict[str, str]] = []
        if keep_while is not None and self.path.is_file():
            key, limit = keep_while
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get(key) and int(r[key]) <= limit]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}
            )


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a log as floats (empty cells dropped), for plotting."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]
