"""Export speed and size: FP32 vs int8 (and bf16) per backend, in one process, as ratios.

Models: torchvision resnet18 at 3x224x224, W8A8 after a short min-max calibration on random
pixels (untrained weights: latency does not depend on them), with both inputs of every residual
add quantized as our own ResNets do (so the runtime can keep the blocks in int8); and the
Fashion-MNIST student from a checkpoint. Writes benchmarks/results/export_speed.{md,json}.

    python benchmarks/export_speed.py [--quick] [--student runs/demo/student_w4a4_gor/last.pt]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch
from _provenance import command as run_command
from _provenance import git_commit
from torch import nn
from torch.utils.data import DataLoader

from qatkd.artifacts import checkpoint_source, load_model
from qatkd.checkpoint import load_checkpoint
from qatkd.export import as_exported, fused_ops, to_onnx
from qatkd.export.bench import add_speedups, measure, speed_table
from qatkd.export.run import (
    FP32_ONNX,
    FP32_REFERENCE,
    INT8_ONNX,
    backend_targets,
    int8_parity,
    parity_table,
)
from qatkd.machine import machine
from qatkd.pipeline import export
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.tasks.classification.family import CLASSIFICATION
from qatkd.tasks.classification.models import build_model
from qatkd.tasks.classification.parity import compare

RESULTS = Path(__file__).parent / "results"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def resnet18_w8a8(samples: int) -> tuple[nn.Module, nn.Module]:
    """(float model, W8A8 model calibrated on `samples` random images, biases aligned to the
    int32 grid as `qatkd export` does)."""
    torch.manual_seed(0)
    model = build_model("tv:resnet18", 3, 1000, IMAGENET_MEAN, IMAGENET_STD).eval()
    quantized = prepare(copy.deepcopy(model), QuantConfig(bits="W8A8", method="minmax"))
    batches = [torch.rand(8, 3, 224, 224) for _ in range(max(1, samples // 8))]
    calibrate(quantized, batches, samples, progress=True)
    return model, as_exported(quantized, [3, 224, 224]).eval()


def bench_resnet18(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    float_net, quantized = resnet18_w8a8(16 if args.quick else 64)
    shape = [3, 224, 224]
    for name, precision in ((INT8_ONNX, "int8"), (FP32_ONNX, "fp32")):
        onnx.save(to_onnx(quantized, shape, precision), str(tmp / name))
    targets = backend_targets("resnet18", float_net, tmp / FP32_ONNX, tmp / INT8_ONNX, args.threads)
    x = torch.rand(16 if args.quick else 64, 3, 224, 224)
    labels = torch.zeros(len(x), dtype=torch.long)
    batches = [(x[i : i + 8], labels[i : i + 8]) for i in range(0, len(x), 8)]
    parity = {
        t.backend: compare(quantized, t.run, batches) for t in targets if t.precision == "int8"
    }
    records = measure(targets, shape, (1, 64), 5 if args.quick else 20)
    return {"records": records, "parity": parity, "ops": fused_ops(tmp / INT8_ONNX)}


def bench_student(args: argparse.Namespace, path: str, tmp: Path) -> tuple[str, dict[str, Any]]:
    limit = 2000 if args.quick else None
    exported = export(path, tmp, data_limit=limit)
    state = load_checkpoint(path)
    meta = state["meta"]
    name = f"{meta['model_name']}-{meta['quant']['bits'].lower()}"
    targets = backend_targets(
        name, CLASSIFICATION.float_model(state), tmp / FP32_ONNX, tmp / INT8_ONNX, args.threads
    )
    shape = [meta["in_channels"], meta["image_size"], meta["image_size"]]
    model = as_exported(load_model(path)[0], shape)
    limits = [] if limit is None else [f"data.test_limit={limit}"]
    loader = DataLoader(checkpoint_source(state, limits).test, batch_size=256)
    parity = int8_parity(model, targets, loader, exported["parity"], compare)
    records = measure(targets, shape, (1, 64), 20 if args.quick else 100)
    return name, {
        "records": records,
        "parity": parity,
        "ops": exported["onnxruntime_ops"],
        "bytes": exported["bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument(
        "--student",
        nargs="+",
        default=["runs/demo/student_w4a4_gor/last.pt"],
        help="Fashion-MNIST student checkpoints (QAT or PTQ)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = git_commit()  # before this run writes its own result files
    start = time.time()
    sections: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "resnet18").mkdir()
        sections["resnet18"] = bench_resnet18(args, Path(tmp) / "resnet18")
        for i, path in enumerate(args.student):
            if not Path(path).exists():
                print(f"student checkpoint {path} not found: skipped", file=sys.stderr)
                continue
            (Path(tmp) / str(i)).mkdir()
            name, section = bench_student(args, path, Path(tmp) / str(i))
            sections[name] = section
    records = [r for s in sections.values() for r in s["records"]]
    add_speedups(records, FP32_REFERENCE)
    write_results(args, sections, records, time.time() - start, commit)


def write_results(
    args: argparse.Namespace,
    sections: dict[str, dict[str, Any]],
    records: list[dict[str, Any]],
    wall: float,
    commit: str,
) -> None:
    command = run_command()
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = ("model", "backend", "precision", "batch", "latency_ms", "p90_ms", "bytes", "speedup")
    (RESULTS / "export_speed.json").write_text(
        json.dumps(
            {
                "commit": commit,
                "command": command,
                "machine": machine(),
                "threads": args.threads,
                "wall_s": round(wall, 1),
                "records": [{k: r[k] for k in keys} for r in records],
                "parity": {k: s["parity"] for k, s in sections.items()},
                "onnxruntime_ops": {k: s["ops"] for k, s in sections.items()},
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        "# Export speed and size",
        "",
        f"- commit: {commit}",
        f"- command: `{command}`",
        f"- machine: {machine()}; {args.threads} threads for every backend",
        f"- wall time: {wall:.0f} s",
        "",
        "Latency: median and p90 of repeated runs after warm-up, all backends measured",
        "round-robin in one process. Speedup: onnxruntime FP32 latency / latency, same model",
        "and batch (PyTorch eager FP32 is a row of its own).",
        "",
        speed_table(records, "onnxruntime FP32"),
        "",
    ]
    for key, section in sections.items():
        lines += [
            f"## {key}: parity of int8 backends with the fake-quantized PyTorch model",
            "",
            parity_table(section["parity"]),
            "",
            f"onnxruntime runs: `{section['ops']}`",
            "",
        ]
        if "bytes" in section:
            sizes = section["bytes"]
            lines += ["| file | bytes | checkpoint / file |", "|---|---:|---:|"]
            lines += [f"| {k} | {v:,} | {sizes['checkpoint'] / v:.2f}x |" for k, v in sizes.items()]
            lines.append("")
    (RESULTS / "export_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
