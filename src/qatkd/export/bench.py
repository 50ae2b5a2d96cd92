"""Latency measurement, fair on a shared machine: every target runs once per round, round-robin,
so load from other processes hits all of them alike; speed is reported as ratios within a run."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qatkd.progress import progress


@dataclass
class Target:
    """One way to run a model: `run` takes a float NCHW batch; `bytes` is its file's size."""

    model: str
    backend: str
    precision: str
    run: Callable[[np.ndarray], Any]
    bytes: int | None = None


def measure(
    targets: Sequence[Target],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 3,
) -> list[dict[str, Any]]:
    """Median and p90 latency (ms) of every target at every batch size, as records
    `{"model", "backend", "precision", "batch", "latency_ms", "p90_ms", "bytes"}`."""
    records = []
    rng = np.random.default_rng(0)
    # The runtimes flush denormals to zero; PyTorch does not by default and then runs a net with
    # tiny activations (untrained, or late layers) several times slower: not a fair reference.
    torch.set_flush_denormal(True)
    try:
        for batch in batch_sizes:
            records += _measure_batch(
                targets, rng.random((batch, *input_shape), np.float32), repeats, warmup
            )
    finally:
        torch.set_flush_denormal(False)
    return records


def _measure_batch(
    targets: Sequence[Target], x: np.ndarray, repeats: int, warmup: int
) -> list[dict[str, Any]]:
    for target in targets:
        for _ in range(warmup):
            target.run(x)
    times: list[list[float]] = [[] for _ in targets]
    for _ in progress(range(repeats), desc=f"latency batch {len(x)}"):
        for i, target in enumerate(targets):
            start = time.perf_counter()
            target.run(x)
            times[i].append((time.perf_counter() - start) * 1000)
    return [
        {
            "model": target.model,
            "backend": target.backend,
            "precision": target.precision,
            "batch": len(x),
            "latency_ms": round(float(np.median(ms)), 4),
            "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "bytes": target.bytes,
        }
        for target, ms in zip(targets, times, strict=True)
    ]


def add_speedups(records: list[dict[str, Any]], reference: tuple[str, str]) -> None:
    """Set `speedup` (reference latency / latency, same model and batch) on every record;
    `reference` is the (backend, precision) of the FP32 baseline."""
    base = {
        (r["model"], r["batch"]): r["latency_ms"]
        for r in records
        if (r["backend"], r["precision"]) == reference
    }
    for r in records:
        ref = base.get((r["model"], r["batch"]))
        r["speedup"] = round(ref / r["latency_ms"], 3) if ref else None


def speed_table(records: Sequence[dict[str, Any]], reference_name: str) -> str:
    """A Markdown table of `records` (after `add_speedups`)."""
    lines = [
        f"| model | backend | precision | batch | median ms | p90 ms | speedup vs {reference_name}"
        " | file bytes |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        size = f"{r['bytes']:,}" if r.get("bytes") else "-"
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | "
            f"{r['latency_ms']:.3f} | {r['p90_ms']:.3f} | {speedup} | {size} |"
        )
    return "\n".join(lines)
