"""Export speed and size: FP32, bf16 and int8 per backend, qatkd against the runtimes' own
quantizers, in one process, as ratios.

Models: torchvision resnet18 and mobilenet_v2 at 3x224x224, W8A8 after a min-max calibration on
random pixels (untrained weights: latency does not depend on them), with their residual adds and
pooling quantized as qatkd trains them; the peers (`_peers`: onnxruntime `quantize_static`,
`nncf.quantize`) quantize the same float model on the same calibration images. And the
Fashion-MNIST students from their checkpoints. Writes benchmarks/results/export_speed.{md,json}.

    make peers
    python benchmarks/export_speed.py [--quick] [--student runs/demo/student_w4a4_gor/last.pt]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from _peers import NNCF_PEER, ORT_PEER, peer_targets
from _provenance import command as run_command
from _provenance import git_commit
from _speed import MET, latency, meets, w8a8
from torch import nn
from torch.utils.data import DataLoader

from qatkd.artifacts import checkpoint_source, load_model
from qatkd.checkpoint import load_checkpoint
from qatkd.errors import QatkdError
from qatkd.export import as_exported, fused_ops, to_onnx
from qatkd.export.bench import add_speedups, measure, speed_table
from qatkd.export.codes import activation_codes, code_parity
from qatkd.export.run import (
    FP32_ONNX,
    FP32_REFERENCE,
    INT8_ONNX,
    backend_targets,
    int8_parity,
    parity_table,
)
from qatkd.export.runtime import Runner, load_runner
from qatkd.machine import machine
from qatkd.pipeline import export
from qatkd.tasks.classification.family import CLASSIFICATION
from qatkd.tasks.classification.models import build_model
from qatkd.tasks.classification.parity import compare

RESULTS = Path(__file__).parent / "results"
OPENVINO_CODES_KEPT = "openvino, every code kept"
"""The parity row of OpenVINO without its residual-sum rounding shortcut (`openvino_codes_kept`)."""
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TORCHVISION_MODELS = ("resnet18", "mobilenet_v2")
GOALS = {
    "resnet18": {
        "qatkd / quantize_static latency (onnxruntime)": "<= 1.05",
        "qatkd / nncf latency (OpenVINO)": "<= 1.05",
        "best FP32 / best qatkd int8": ">= 3",
        "OpenVINO bf16 / best qatkd int8": ">= 1.5",
    }
}
"""The issue's targets for the torchvision models (mobilenet_v2's ratios are reported only)."""
SHAPE = [3, 224, 224]


def calibration_images(count: int) -> list[np.ndarray]:
    """The images every quantizer calibrates on: random pixels, one per batch."""
    rng = np.random.default_rng(0)
    return [rng.random((1, *SHAPE), np.float32) for _ in range(count)]


def torchvision_w8a8(name: str, images: list[np.ndarray]) -> tuple[nn.Module, nn.Module]:
    """(float model, W8A8 model calibrated on `images`, biases aligned to the int32 grid as
    `qatkd export` does)."""
    torch.manual_seed(0)
    model = build_model(f"tv:{name}", 3, 1000, IMAGENET_MEAN, IMAGENET_STD).eval()
    return model, w8a8(model, images, SHAPE)


def bench_torchvision(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    images = calibration_images(16 if args.quick else 64)
    float_net, quantized = torchvision_w8a8(name, images)
    onnx.save(to_onnx(quantized, SHAPE, "int8"), str(tmp / INT8_ONNX))
    onnx.save(to_onnx(float_net, SHAPE, "fp32"), str(tmp / FP32_ONNX))
    targets = backend_targets(name, float_net, tmp / FP32_ONNX, tmp / INT8_ONNX, args.threads)
    peers, failures = peer_targets(name, tmp / FP32_ONNX, tmp, images, args.threads)
    if failures:
        raise QatkdError(f"{name}: a peer failed: {failures}")
    targets += peers
    x = torch.rand(16 if args.quick else 64, *SHAPE)
    labels = torch.zeros(len(x), dtype=torch.long)
    batches = [(x[i : i + 8], labels[i : i + 8]) for i in range(0, len(x), 8)]
    parity = {
        t.backend: compare(quantized, t.run, batches) for t in targets if t.precision == "int8"
    }
    proto = onnx.load(str(tmp / INT8_ONNX))
    parity["onnxruntime"] |= code_parity(quantized, proto, [x[i : i + 8] for i in range(0, 16, 8)])
    records = measure(targets, SHAPE, (1, 64), 5 if args.quick else 20)
    ops = {
        "qatkd int8": fused_ops(tmp / INT8_ONNX),
        ORT_PEER: fused_ops(tmp / "quantize_static.onnx"),
    }
    return {"records": records, "parity": parity, "ops": ops}


def openvino_codes_kept(int8_onnx: Path, out: Path, threads: int) -> Runner:
    """OpenVINO on the int8 graph with every quantized tensor's codes also a graph output.

    OpenVINO's CPU plugin fuses a residual Add into the conv that computes one of its inputs
    and then skips the rounding of that conv's QuantizeLinear ("drop rounding one special
    residual pattern", its conv post-ops); a tensor that is a graph output cannot be fused
    away, so this run shows what OpenVINO's parity is without that shortcut."""
    proto = onnx.load(str(int8_onnx))
    for codes, _ in activation_codes(proto).values():
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(codes))
    onnx.save(proto, str(out))
    return load_runner(out, "openvino", threads)


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
    if any(t.backend == "openvino" for t in targets):
        unfused = openvino_codes_kept(tmp / INT8_ONNX, tmp / "codes_kept.onnx", args.threads)
        parity[OPENVINO_CODES_KEPT] = compare(model, unfused, loader, desc="parity codes kept")
    records = measure(targets, shape, (1, 64), 20 if args.quick else 100)
    return name, {
        "records": records,
        "parity": parity,
        "ops": {"qatkd int8": exported["onnxruntime_ops"]},
        "bytes": exported["bytes"],
    }


def target_rows(
    records: list[dict[str, Any]], sections: dict[str, dict[str, Any]]
) -> list[tuple[str, float, str, bool | None]]:
    """(what, measured, target, met) for every target of the issue, from this run's records."""
    rows = []
    for name in TORCHVISION_MODELS:
        ours_ort = latency(records, name, 1, backend="onnxruntime", precision="int8")
        ours_ov = latency(records, name, 1, backend="openvino", precision="int8")
        best_int8 = min(ours_ort, ours_ov)
        best_fp32 = latency(records, name, 1, precision="fp32")
        bf16 = latency(records, name, 1, precision="bf16")
        peer_ort = latency(records, name, 1, precision=ORT_PEER)
        peer_ov = latency(records, name, 1, precision=NNCF_PEER)
        goals = GOALS.get(name, {})
        rows += [
            (f"{name} b1: {what}", value, goals.get(what, "-"))
            for what, value in (
                ("qatkd / quantize_static latency (onnxruntime)", ours_ort / peer_ort),
                ("qatkd / nncf latency (OpenVINO)", ours_ov / peer_ov),
                ("best FP32 / best qatkd int8", best_fp32 / best_int8),
                ("OpenVINO bf16 / best qatkd int8", bf16 / best_int8),
            )
        ]
    for name, section in sections.items():
        if name in TORCHVISION_MODELS:
            continue
        for batch, goal in ((64, ">= 1.5"), (1, ">= 1")):
            speed = latency(records, name, batch, precision="fp32") / latency(
                records, name, batch, precision="int8"
            )
            rows.append((f"{name} b{batch}: best FP32 / best int8", speed, goal))
        for backend, parity in section["parity"].items():
            goal = "-" if backend == OPENVINO_CODES_KEPT else ">= 99.9"
            rows.append((f"{name}: top-1 agreement on {backend} (%)", parity["agreement"], goal))
    return [(what, value, goal, meets(value, goal)) for what, value, goal in rows]


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
        for name in TORCHVISION_MODELS:
            (Path(tmp) / name).mkdir()
            sections[name] = bench_torchvision(name, args, Path(tmp) / name)
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
                "targets": [
                    {"what": what, "measured": value, "target": goal, "met": met}
                    for what, value, goal, met in target_rows(records, sections)
                ],
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
        "## Targets (computed from the rows above)",
        "",
        "| what | measured | target | met |",
        "|---|---:|---|---|",
        *(
            f"| {what} | {value:.3f} | {goal} | {MET[met]} |"
            for what, value, goal, met in target_rows(records, sections)
        ),
        "",
        "The torchvision models are untrained: their logits nearly tie, so top-1 agreement says",
        "little there; the code parity (every activation code of 16 images) does.",
        "",
    ]
    for key, section in sections.items():
        lines += [
            f"## {key}: parity of int8 backends with the fake-quantized PyTorch model",
            "",
            parity_table(section["parity"]),
            "",
            *(f"onnxruntime runs ({what}): `{ops}`" for what, ops in section["ops"].items()),
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
