"""`export_onnx` and `bench_exported`: the deployable files of a quantized image model, and their
speed, for whichever task family calls them (it passes its parity check).

Files written into the output folder: `model.int8.onnx` (QDQ, int8 kernels), `model.fp32.onnx`
(the same network in float), `model.qpack` (packed low-bit weights), `parity.json` (int8 ONNX vs
the fake-quantized PyTorch model on the test set), and from `bench_exported` `bench.md` /
`bench.json` (latency, sizes, speedups against FP32 in the same run). parity.json and bench.json
record the content hash of the checkpoint they were made from (`checkpoint_sha256`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from qatkd.checkpoint import file_sha256
from qatkd.export.bench import Target, add_speedups, measure, speed_table
from qatkd.export.codes import code_parity
from qatkd.export.fold import fold_batchnorm
from qatkd.export.onnx_export import as_exported, save_onnx, to_onnx
from qatkd.export.qpack import save_qpack
from qatkd.export.runtime import INTEGER_OPS, fused_ops, load_runner, openvino_available
from qatkd.machine import machine

INT8_ONNX, FP32_ONNX, QPACK = "model.int8.onnx", "model.fp32.onnx", "model.qpack"
PARITY, BENCH_MD, BENCH_JSON = "parity.json", "bench.md", "bench.json"
CODE_PARITY_SAMPLES = 512
"""Test samples whose every activation code is compared (`export.codes`): all of them would hold
gigabytes of codes, and 512 give millions."""
FP32_REFERENCE = ("onnxruntime", "fp32")
"""Speedups are against the same network in FP32 on onnxruntime: PyTorch eager is a slower and
noisier reference (its row is in the table too)."""


Compare = Callable[..., dict[str, Any]]
"""A task family's parity check: `compare(model, runner, batches, desc=..., trained=None)`."""


def first_inputs(loader: DataLoader, samples: int) -> Iterator[torch.Tensor]:
    """The input batches holding the first `samples` samples of `loader`."""
    seen = 0
    for batch in loader:
        if seen >= samples:
            return
        yield batch[0][: samples - seen]
        seen += len(batch[0])


def export_onnx(
    trained: nn.Module,
    meta: dict[str, Any],
    input_shape: list[int],
    out: Path,
    loader: DataLoader,
    compare: Compare,
    checkpoint: Path,
) -> dict[str, Any]:
    """Align the biases of the quantized `trained` model to the int32 grid (`bias_grid`), fold
    BN, write the int8 and FP32 ONNX and the qpack into `out`, and check the int8 ONNX against
    the aligned model and the trained one on `loader` (`compare`, the task family's check) and
    code by code (`codes`); returns file sizes, the operators onnxruntime runs and the parity
    figures (also saved as parity.json)."""
    model = as_exported(trained, input_shape)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "class_names": meta["class_names"],
        "model_name": meta["model_name"],
        "quant": meta["quant"],
        "input": "float pixels in [0, 1], NCHW",
    }
    int8_proto = to_onnx(model, input_shape, "int8", metadata)
    sizes = {
        INT8_ONNX: save_onnx(int8_proto, str(out / INT8_ONNX)),
        FP32_ONNX: save_onnx(to_onnx(model, input_shape, "fp32", metadata), str(out / FP32_ONNX)),
        QPACK: save_qpack(fold_batchnorm(model), meta, out / QPACK),
        "checkpoint": checkpoint.stat().st_size,
    }
    runner = load_runner(out / INT8_ONNX)
    parity = compare(model, runner, loader, trained=trained)
    parity |= code_parity(model, int8_proto, first_inputs(loader, CODE_PARITY_SAMPLES))
    ops = fused_ops(out / INT8_ONNX)
    result = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "bytes": sizes,
        "onnxruntime_ops": ops,
        "integer_kernels": {op: n for op, n in ops.items() if op in INTEGER_OPS},
        "parity": {"onnxruntime": parity},
    }
    (out / PARITY).write_text(json.dumps(result, indent=2) + "\n")
    return result


def backend_targets(
    name: str, torch_model: nn.Module, fp32_onnx: Path, int8_onnx: Path, threads: int = 2
) -> list[Target]:
    """FP32 PyTorch, onnxruntime fp32 / int8 and, if installed, OpenVINO f32 / bf16 / int8."""

    def torch_run(x: Any) -> Any:
        with torch.inference_mode():
            return torch_model(torch.from_numpy(x))

    sizes = {p: p.stat().st_size for p in (fp32_onnx, int8_onnx)}
    targets = [
        Target(name, "pytorch", "fp32", torch_run),
        Target(
            name, "onnxruntime", "fp32", load_runner(fp32_onnx, threads=threads), sizes[fp32_onnx]
        ),
        Target(
            name, "onnxruntime", "int8", load_runner(int8_onnx, threads=threads), sizes[int8_onnx]
        ),
    ]
    if openvino_available():
        for precision, path, hint in (
            ("fp32", fp32_onnx, "f32"),
            ("bf16", fp32_onnx, "bf16"),
            ("int8", int8_onnx, "f32"),
        ):
            runner = load_runner(path, "openvino", threads, hint)
            targets.append(Target(name, "openvino", precision, runner, sizes[path]))
    return targets


def int8_parity(
    model: nn.Module,
    targets: list[Target],
    loader: DataLoader,
    known: dict[str, Any],
    compare: Compare,
) -> dict[str, Any]:
    """`known` parity figures plus those of every other int8 target, on `loader`, compared the
    task family's way (`compare`)."""
    parity = dict(known)
    for t in targets:
        if t.precision == "int8" and t.backend not in parity:
            parity[t.backend] = compare(model, t.run, loader, desc=f"parity {t.backend}")
    return parity


def bench_exported(
    trained: nn.Module,
    float_model: nn.Module,
    meta: dict[str, Any],
    input_shape: list[int],
    out: Path,
    loader: DataLoader,
    compare: Compare,
    threads: int = 2,
    batch_sizes: tuple[int, ...] = (1, 64),
    repeats: int = 20,
) -> dict[str, Any]:
    """Latency (median, p90) of every backend at each batch size, file sizes and parity (for
    every int8 backend) of the files `export_onnx` wrote into `out`; `float_model` is the FP32
    PyTorch reference. Writes bench.md and bench.json there."""
    exported = json.loads((out / PARITY).read_text())
    model = as_exported(trained, input_shape)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        name = meta["model_name"]
        targets = backend_targets(name, float_model, out / FP32_ONNX, out / INT8_ONNX, threads)
        parity = int8_parity(model, targets, loader, exported["parity"], compare)
        records = measure(targets, input_shape, batch_sizes, repeats)
    finally:
        torch.set_num_threads(previous_threads)
    add_speedups(records, FP32_REFERENCE)
    sizes = exported["bytes"]
    result = {
        "checkpoint": exported["checkpoint"],
        "checkpoint_sha256": exported["checkpoint_sha256"],
        "threads": threads,
        "machine": machine(),
        "records": records,
        "bytes": sizes,
        "parity": parity,
        "size_ratio": {k: round(sizes["checkpoint"] / v, 2) for k, v in sizes.items()},
        "onnxruntime_ops": exported["onnxruntime_ops"],
    }
    (out / BENCH_JSON).write_text(json.dumps(result, indent=2) + "\n")
    (out / BENCH_MD).write_text(bench_markdown(result))
    return result


def parity_table(parity: dict[str, dict[str, Any]]) -> str:
    """One row per backend, one column per parity figure (the task family decides which)."""
    keys = list(dict.fromkeys(k for p in parity.values() for k in p))
    lines = ["| backend | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for backend, p in parity.items():
        cells = [
            "-" if k not in p else f"{p[k]:.2f}" if isinstance(p[k], float) else str(p[k])
            for k in keys
        ]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_markdown(result: dict[str, Any]) -> str:
    sizes = "\n".join(
        f"| {name} | {size:,} | {result['size_ratio'][name]:.2f}x |"
        for name, size in result["bytes"].items()
    )
    return (
        f"# qatkd bench: {result['checkpoint']}\n\nmachine: {result['machine']}; "
        f"{result['threads']} threads for every backend, measured round-robin in one process\n\n"
        f"## Latency\n\n{speed_table(result['records'], 'onnxruntime FP32')}\n\n"
        f"## Size (ratio: checkpoint bytes / file bytes)\n\n| file | bytes | smaller by |\n"
        f"|---|---:|---:|\n{sizes}\n\n## Parity with the fake-quantized PyTorch model\n\n"
        f"{parity_table(result['parity'])}\n\nonnxruntime runs: {result['onnxruntime_ops']}\n"
    )
