"""`qatkd demo`: the whole method on Fashion-MNIST in a few minutes on two CPU cores.

FP32 teacher -> FP32 student -> W4A4 student distilled with GoR -> int8 ONNX export, parity and
speed -> summary table. Each stage is a normal run folder under the demo folder; finished stages
are reused and interrupted ones resumed, so running the demo again costs nothing already done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatkd import pipeline, reuse

FULL = ["data.train_limit=15000", "train.epochs=3", "train.batch_size=64"]
QUICK = ["data.train_limit=64", "data.test_limit=32", "train.epochs=1", "train.batch_size=16"]


@dataclass
class Stage:
    name: str
    command: str
    overrides: list[str] = field(default_factory=list)


def stages(out: Path) -> list[Stage]:
    teacher, student = out / "teacher_fp32" / "last.pt", out / "student_fp32" / "last.pt"
    return [
        Stage("teacher_fp32", "train", ["model.name=resnet20"]),
        Stage("student_fp32", "train", ["model.name=resnet8"]),
        Stage(
            "student_w4a4_gor",
            "distill",
            [
                "model.name=resnet8",
                f"model.init={student}",
                "quant.bits=W4A4",
                f"teachers=[{teacher}]",
                "balancer.name=gor",
                "train.lr=0.02",
                "train.warmup_epochs=0",
                "diag.every=10",
            ],
        ),
    ]


def run_stage(stage: Stage, out: Path, common: list[str]) -> dict[str, Any]:
    run_dir = out / stage.name
    if (run_dir / "metrics.json").is_file():
        print(f"[demo] {stage.name}: done before, reusing {run_dir}")
    elif (run_dir / "last.pt").is_file():
        print(f"[demo] {stage.name}: resuming {run_dir}")
    else:
        print(f"[demo] {stage.name}: qatkd {stage.command} {' '.join(stage.overrides)}")
    return reuse.run_or_reuse(run_dir, stage.command, [*common, *stage.overrides])


def deploy(run_dir: Path, quick: bool) -> dict[str, Any]:
    """Export the student to int8 ONNX and time it against FP32 (reused when done before)."""
    if (run_dir / "bench.json").is_file():
        return json.loads((run_dir / "bench.json").read_text())
    print(f"[demo] export and bench: qatkd export {run_dir} && qatkd bench {run_dir}")
    return pipeline.bench(run_dir, repeats=3 if quick else 20, batch_sizes=(1, 64))


def fastest(bench: dict[str, Any], precision: str, batch: int) -> dict[str, Any]:
    """The record of the fastest exported-model backend at this precision and batch size."""
    return min(
        (
            r
            for r in bench["records"]
            if (r["precision"], r["batch"]) == (precision, batch) and r["backend"] != "pytorch"
        ),
        key=lambda r: r["latency_ms"],
    )


def speed_note(bench: dict[str, Any]) -> str:
    """The deployed student's speed: its fastest int8 backend against the fastest FP32 one."""
    parts = []
    for batch in sorted({r["batch"] for r in bench["records"]}):
        int8, fp32 = fastest(bench, "int8", batch), fastest(bench, "fp32", batch)
        parts.append(
            f"batch {batch}: {fp32['latency_ms'] / int8['latency_ms']:.2f}x "
            f"({int8['backend']} int8 vs {fp32['backend']} FP32)"
        )
    return "speed vs the fastest FP32 backend, " + ", ".join(parts)


def run_demo(out: Path, quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every stage and print and save (`summary.md`) the comparison table."""
    out.mkdir(parents=True, exist_ok=True)
    common = [*(QUICK if quick else FULL), *(overrides or [])]
    results = {s.name: run_stage(s, out, common) for s in stages(out)}
    gor = results["student_w4a4_gor"]
    bench = results["deploy"] = deploy(out / "student_w4a4_gor", quick)
    parity = bench["parity"]["onnxruntime"]
    rows = [
        ("FP32 teacher (ResNet-20)", results["teacher_fp32"]["test_acc"], ""),
        ("FP32 student (ResNet-8)", results["student_fp32"]["test_acc"], ""),
        (
            "W4A4 student, QAT-KD-GoR (fake-quantized PyTorch)",
            gor["test_acc"],
            f"learned w_TS={gor['final_w_ts']:.3g}, w_KD={gor['final_w_kd']:.3g}",
        ),
        (
            "W4A4 student, int8 ONNX on onnxruntime",
            parity["accuracy_export"],
            f"top-1 agreement {parity['agreement']:.2f}% with the bias-aligned PyTorch model "
            f"(its accuracy {parity['accuracy_pytorch']:.2f}%), "
            f"{parity['agreement_trained']:.2f}% with the trained one; "
            f"{speed_note(bench)}; "
            f"{bench['size_ratio']['model.qpack']:.1f}x smaller packed",
        ),
    ]
    lines = ["| model | test top-1 (%) | notes |", "|---|---:|---|"]
    lines += [f"| {name} | {acc:.2f} | {note} |" for name, acc, note in rows]
    summary = "\n".join(lines)
    (out / "summary.md").write_text(f"# qatkd demo\n\n{summary}\n")
    print(f"\n{summary}\n\nrun folders and curves.png plots under {out}")
    return results
