"""Which blocks qatkd's int8 graph keeps in float, chosen by measured latency (issue 33: where
int8 is slower than FP32 in a runtime, keep the blocks that int8 makes slower in float).

The candidates are the block kinds that leave float islands between Q/DQ pairs in the runtimes
(squeeze-excite gates; Hardswish and SiLU), each kind alone and all together, as `quant.skip`
patterns: the same fine-tuned model is quantized with those modules left float, exported, and
every candidate is timed at batch 1 in each runtime beside the all-int8 graph in a short
selection round. The fastest candidate of each runtime becomes that runtime's `int8 mixed`
graph, measured and checked like the others; the all-int8 graph stays on the page whatever wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from _speed import one_line, w8a8
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from qatkd.export import to_onnx
from qatkd.export.bench import Target, measure
from qatkd.export.runtime import load_runner

BLOCK_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "squeeze-excite": (SqueezeExcitation,),
    "Hardswish / SiLU": (nn.Hardswish, nn.SiLU),
}
MIXED = "int8 mixed"
"""The precision label of the chosen candidate's records (all-int8 stays `int8`)."""
ALL_INT8 = "none"
SELECTION_REPEATS = 10


def candidates(model: nn.Module) -> dict[str, list[str]]:
    """Each combination of the block kinds `model` has (one kind, or several joined by ' + ') ->
    the `quant.skip` patterns that leave those modules, and everything inside them, float."""
    present = {
        kind: [name for name, m in model.named_modules() if isinstance(m, types)]
        for kind, types in BLOCK_KINDS.items()
    }
    present = {kind: names for kind, names in present.items() if names}
    chosen: dict[str, list[str]] = {}
    for size in range(1, len(present) + 1):
        for kinds in itertools.combinations(present, size):
            names = [n for kind in kinds for n in present[kind]]
            chosen[" + ".join(kinds)] = [p for n in names for p in (n, f"{n}.*")]
    return chosen


def choose_float_blocks(
    name: str,
    model: nn.Module,
    calibration: Sequence[np.ndarray],
    shape: list[int],
    int8_onnx: Path,
    folder: Path,
    threads: int,
    runtimes: Sequence[str],
) -> tuple[dict[str, Any], list[Target], dict[str, nn.Module]]:
    """The selection round: per runtime, the b1 latency (ms) of the all-int8 graph (`none`) and of
    each candidate, the fastest (`choice`) and the candidates that did not export (`not_exported`,
    with the reason); the `int8 mixed` targets of the runtimes whose
    choice is a candidate, and each chosen candidate's fake-quantized model (their reference for
    agreement), by runtime."""
    variants = {ALL_INT8: int8_onnx}
    models: dict[str, nn.Module] = {}
    not_exported = {}
    for i, (label, skip) in enumerate(candidates(model).items()):
        try:
            quantized = w8a8(model, calibration, shape, skip)
            path = folder / f"int8_float_blocks_{i}.onnx"
            onnx.save(to_onnx(quantized, shape, "int8"), str(path))
        except Exception as e:  # left out of the round, with its reason on the page
            not_exported[label] = one_line(e)
            continue
        models[label], variants[label] = quantized, path
    selection: dict[str, Any] = {}
    targets, references = [], {}
    for runtime in runtimes:
        runners = {label: load_runner(path, runtime, threads) for label, path in variants.items()}
        timed = [Target(label, runtime, "int8", run) for label, run in runners.items()]
        records = measure(timed, shape, (1,), SELECTION_REPEATS)
        b1 = {r["model"]: r["latency_ms"] for r in records}
        choice = min(b1, key=b1.__getitem__)
        selection[runtime] = {"b1_ms": b1, "choice": choice, "not_exported": not_exported}
        if choice != ALL_INT8:
            path = variants[choice]
            targets.append(Target(name, runtime, MIXED, runners[choice], path.stat().st_size))
            references[runtime] = models[choice]
    return selection, targets, references
