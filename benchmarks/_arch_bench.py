"""One architecture of the per-architecture speed page, measured: its fine-tuned float model
quantized by qatkd (`prepare(W8A8, minmax)`, calibrated on training images, exported int8) and
by the peers (`_peers`: onnxruntime's `quantize_static`, `nncf.quantize`, on the same float
graph and the same calibration images); in each runtime, the fastest of qatkd's graphs with some
blocks left float (`_float_blocks`) where one beats the all-int8 graph; top-1 agreement on test
images in onnxruntime and OpenVINO (qatkd's int8 graphs against their fake-quantized PyTorch
models, the peers' against the float one) with its yardsticks (`_parity`); the float ops of
each onnxruntime int8 graph; b1 and b64 latency of every target, round-robin in this process
(`qatkd.export.bench`).

The result is cached in the work folder (`_cache`), keyed by the architecture, the schedule,
the library versions and the code that computes it (qatkd's sources and these modules), and
records the machine it ran on and its key: a rerun measures only what is missing, in the work
folder or on the committed page (a run of the whole page takes longer than a session, and the
machine can change between sessions: each architecture's ratios come from one run on one
machine, and the page names it).
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from _arch_models import FineTuning, Images, fine_tuned
from _cache import ROOT, entry, load, plain, save, source_digest
from _float_blocks import MIXED, choose_float_blocks
from _parity import logit_deviation, with_noise
from _peers import NNCF_PEER, ORT_PEER, peer_targets
from _speed import one_line, w8a8
from torch import nn

from qatkd.export import INPUT_NAME, to_onnx
from qatkd.export.bench import Target, measure
from qatkd.export.openvino_reference import openvino_reference
from qatkd.export.run import FP32_ONNX, INT8_ONNX, backend_targets
from qatkd.export.runtime import ort_session
from qatkd.machine import machine
from qatkd.quant import window_attention  # noqa: F401  (keyed: prepare imports it for a Swin)

PEERS = (ORT_PEER, NNCF_PEER)
LATENCY_BATCHES = (1, 64)
PARITY_BATCH = 50
INT8_RUNTIMES = ("onnxruntime", "openvino")
MEASURED = {(backend, p) for backend in INT8_RUNTIMES for p in ("fp32", "int8")}
"""qatkd's targets that are timed (not PyTorch eager, not OpenVINO bf16)."""
VERSIONED = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "nncf")
SOURCES = (
    "_arch_bench.py",
    "_arch_models.py",
    "_cache.py",
    "_float_blocks.py",
    "_parity.py",
    "_peers.py",
    "_speed.py",
)
"""The benchmark modules a result depends on (besides qatkd's sources)."""


@dataclass(frozen=True)
class Schedule:
    """Everything a measurement depends on besides the architecture and the code."""

    fine_tuning: FineTuning
    calibration_images: int
    test_images: int
    repeats: tuple[int, int]
    """Latency rounds at batch 1 and at batch 64."""
    threads: int


def cached(
    name: str, schedule: Schedule, work: Path, page: dict[str, Any]
) -> dict[str, Any] | None:
    """`name`'s result from the cache in `work`, or else from `page` (the committed page's
    results by architecture), where an earlier run measured it under this key."""
    key = result_key(name, schedule)
    found = load(entry(work / name, "result", key), key)
    if found is None and (page.get(name) or {}).get("key") == plain(key):
        found = page[name]
    return found


def measure_and_cache(
    name: str, schedule: Schedule, train: Images, test: Images, work: Path, commit: str
) -> dict[str, Any]:
    """`measure_architecture`, with the `commit` and the machine it ran on and its key, cached in
    `work`."""
    key = result_key(name, schedule)
    result = measure_architecture(name, schedule, train, test, work)
    unkeyed = sorted(str(f.relative_to(ROOT)) for f in _qatkd_files() - _keyed_files())
    if unkeyed:
        raise RuntimeError(
            f"measuring {name} imported qatkd modules that its key does not hold: "
            f"{', '.join(unkeyed)}; import them in _arch_bench.py"
        )
    result |= {"commit": commit, "machine": machine(), "key": plain(key)}
    save(entry(work / name, "result", key), key, result)
    return result


def result_key(name: str, schedule: Schedule) -> dict[str, Any]:
    """What a result depends on (not the machine: a result records its own)."""
    return {
        "architecture": name,
        "schedule": asdict(schedule),
        "versions": {p: _version(p) for p in VERSIONED},
        "source": _code_digest(),
    }


def _qatkd_files() -> set[Path]:
    """The source files of the qatkd modules this process has imported."""
    return {
        Path(module.__file__)
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "qatkd" and getattr(module, "__file__", None)
    }


@functools.cache
def _keyed_files() -> frozenset[Path]:
    """The qatkd modules a result depends on: those imported when the first key is made (the
    benchmark's imports). `measure_and_cache` checks that a measurement imported no other."""
    return frozenset(_qatkd_files())


@functools.cache
def _code_digest() -> str:
    """The sources of the qatkd modules the benchmark imports and of the benchmark modules,
    hashed once a run (they do not change during one). Not all of qatkd's: a change to a module
    the measurement never runs (the CLI, the training loop) keeps the results, so that a page
    this long can be finished over several sessions."""
    return source_digest([*_keyed_files(), *(Path(__file__).parent / f for f in SOURCES)])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def measure_architecture(
    name: str, schedule: Schedule, train: Images, test: Images, work: Path
) -> dict[str, Any]:
    """Everything the page shows of `name`: `export` ("ok" or the one-line reason it failed,
    with nothing measured then), `peers` (likewise), `accuracy` (%) of the float and the
    fake-quantized PyTorch models on the test images, `float_blocks` (the selection round of
    `_float_blocks`, per runtime), `parity` per int8 target, `float_ops`, latency `records`, and
    the seconds fine-tuning and the rest took."""
    start = time.time()
    model, fine_tune_s = fine_tuned(name, train, schedule.fine_tuning, work)
    size = schedule.fine_tuning.size
    shape = [3, size, size]
    calibration = train.one_per_batch(schedule.calibration_images)
    result: dict[str, Any] = {"export": "ok", "peers": "ok", "fine_tune_s": fine_tune_s}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            onnx.save(to_onnx(model, shape, "fp32"), str(folder / FP32_ONNX))
            quantized = w8a8(model, calibration, shape)
            onnx.save(to_onnx(quantized, shape, "int8"), str(folder / INT8_ONNX))
            targets = [
                t
                for t in backend_targets(
                    name, model, folder / FP32_ONNX, folder / INT8_ONNX, schedule.threads
                )
                if (t.backend, t.precision) in MEASURED
            ]
        except Exception as e:  # the page reports why; the other architectures go on
            result["export"] = one_line(e)
            result["accuracy"] = {"float": _accuracy(_torch_run(model), test, schedule)}
            return result | {"seconds": time.time() - start}
        result["float_blocks"], mixed, references = choose_float_blocks(
            name,
            model,
            calibration,
            shape,
            folder / INT8_ONNX,
            folder,
            schedule.threads,
            INT8_RUNTIMES,
        )
        targets += mixed
        peers, failures = peer_targets(
            name, folder / FP32_ONNX, folder, calibration, schedule.threads
        )
        targets += peers
        if failures:
            result["peers"] = "; ".join(f"{peer}: {why}" for peer, why in failures.items())
        own = {"openvino int8": _as_openvino(folder / INT8_ONNX, schedule.threads)}
        result |= agreement(model, quantized, references, targets, test, schedule, own)
        result["float_ops"] = {"qatkd int8": float_ops(folder / INT8_ONNX)}
        if ORT_PEER not in failures:
            result["float_ops"][ORT_PEER] = float_ops(folder / "quantize_static.onnx")
        result["records"] = [
            r
            for batch, repeats in zip(LATENCY_BATCHES, schedule.repeats, strict=True)
            for r in measure(targets, shape, (batch,), repeats)
        ]
    return result | {"seconds": time.time() - start}


def agreement(
    model: nn.Module,
    quantized: nn.Module,
    mixed: dict[str, nn.Module],
    targets: list[Target],
    test: Images,
    schedule: Schedule,
    own: dict[str, Run],
) -> dict[str, Any]:
    """`accuracy` (%) of the float and fake-quantized PyTorch models on the test images;
    `parity` of every int8 target: its top-1 agreement (%) with its reference (qatkd's graph:
    the fake-quantized model; an `int8 mixed` graph: its own, `mixed` by runtime; a peer's: the
    float model), its logits' deviation from the reference's (`_parity`) and its accuracy, and
    for a target in `own` (by "backend precision") the same against that run,
    `own_agreement` and `own_deviation`: OpenVINO against the graph as it computes it; and
    `noise_agreement`, the fake-quantized model's top-1 agreement (%) with itself on the test
    images plus noise (`_parity`), the yardstick of the agreements."""
    logits = {
        "float": _logits(_torch_run(model), test, schedule),
        "qatkd fake-quant": _logits(_torch_run(quantized), test, schedule),
    }
    logits |= {
        f"{runtime} {MIXED}": _logits(_torch_run(m), test, schedule) for runtime, m in mixed.items()
    }
    labels = test.labels[: schedule.test_images].numpy()
    parity = {}
    for t in targets:
        if t.precision == "fp32":
            continue
        got = _logits(t.run, test, schedule)
        if t.precision == MIXED:
            reference = logits[f"{t.backend} {MIXED}"]
        else:
            reference = logits["float" if t.precision in PEERS else "qatkd fake-quant"]
        label = f"{t.backend} {t.precision}"
        parity[label] = {
            "agreement": _agreement(got, reference),
            "deviation": logit_deviation(got, reference),
            "accuracy": 100 * float((got.argmax(1) == labels).mean()),
        }
        if label in own:
            computed = _logits(own[label], test, schedule)
            parity[label]["own_agreement"] = _agreement(got, computed)
            parity[label]["own_deviation"] = logit_deviation(got, computed)
    accuracy = {k: 100 * float((v.argmax(1) == labels).mean()) for k, v in logits.items()}
    generator = torch.Generator().manual_seed(0)
    noisy = _logits(_torch_run(quantized), test, schedule, lambda x: with_noise(x, generator))
    noise_agreement = 100 * float((noisy.argmax(1) == logits["qatkd fake-quant"].argmax(1)).mean())
    return {"accuracy": accuracy, "parity": parity, "noise_agreement": noise_agreement}


def _agreement(got: np.ndarray, reference: np.ndarray) -> float:
    """Top-1 agreement, %."""
    return 100 * float((got.argmax(1) == reference.argmax(1)).mean())


def _as_openvino(int8_onnx: Path, threads: int) -> Run:
    """onnxruntime on `openvino_reference` of the graph: what OpenVINO computes from it, without
    the residual roundings it drops."""
    session = ort_session(openvino_reference(int8_onnx).SerializeToString(), threads)
    return lambda x: session.run(None, {INPUT_NAME: x})[0]


def float_ops(path: Path) -> dict[str, int]:
    """The ops that run in float in the graph onnxruntime optimizes from the int8 ONNX file at
    `path` (those that read a DequantizeLinear), by type."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, threads=1, optimized_path=optimized)
        graph = onnx.load(str(optimized)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    ops = (n.op_type for n in graph.node if dequantized & set(n.input))
    return dict(collections.Counter(ops).most_common())


Run = Callable[[np.ndarray], Any]


def _torch_run(model: nn.Module) -> Run:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def _logits(
    run: Run,
    test: Images,
    schedule: Schedule,
    change: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> np.ndarray:
    """`run`'s logits of the first test images, each batch passed through `change` first."""
    return np.concatenate(
        [
            np.asarray(run(change(test(index)).numpy()))
            for index in test.batches(schedule.test_images, PARITY_BATCH)
        ]
    )


def _accuracy(run: Run, test: Images, schedule: Schedule) -> float:
    labels = test.labels[: schedule.test_images].numpy()
    return 100 * float((_logits(run, test, schedule).argmax(1) == labels).mean())
