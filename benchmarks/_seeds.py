"""Results over seeds: one (mean, std, count) per (method, bits), and how a table cell shows it.
Shared by the benchmarks that repeat runs over seeds."""

from __future__ import annotations

import statistics
from typing import Any

Stat = tuple[float, float, int]


def summarize(records: list[dict[str, Any]], key: str) -> dict[tuple[str, str], Stat]:
    """(method, bits) -> (mean, std, number of seeds) of `key`."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], r["bits"]), []).append(r[key])
    return {
        k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for k, v in groups.items()
    }


def cell(stat: Stat) -> str:
    """Mean ± std, or the mean alone for a single seed (a std of 0 would claim too much)."""
    mean, std, count = stat
    return f"{mean:.2f} ± {std:.2f}" if count > 1 else f"{mean:.2f}"
