"""Detection on generated Fashion-MNIST canvases: PTQ, QAT, QAT+KD (fixed α), QAT+KD+GoR and
QAT-EKD-GoR at W8A8 and W4A4, with identical data, teachers, epochs and schedule per column.

    python benchmarks/det_fashion.py [--quick] [--work runs/bench_det_fashion]

Teachers `det_m` (wide) and `det_res` (residual, another architecture) and the FP32 `det_s`
student are trained once; every quantized student starts from the FP32 student. Writes
benchmarks/results/det_fashion{,_quick}.{md,json}, a plot of mAP against bit-width and a picture
of predicted boxes (W4A4 GoR student against the teacher) beside them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _figures import plt, save_figure
from _provenance import markdown_header, start
from _seeds import cell, summarize
from matplotlib.patches import Rectangle

from qatkd.artifacts import checkpoint_source, load_model
from qatkd.pipeline import run_or_reuse
from qatkd.tasks.detection.boxes import detections
from qatkd.tasks.detection.data import unpadded

RESULTS = Path(__file__).parent / "results"
TEACHERS = ("det_m", "det_res")
STUDENT = "det_s"
BITS = ("W8A8", "W4A4")
ALPHAS = ("0.1", "0.5", "0.9")
METHODS = {
    "qat": ["balancer.name=ts_only"],
    **{f"kd_fixed_{a}": ["balancer.name=fixed", f"balancer.alpha={a}"] for a in ALPHAS},
    "kd_gor": ["balancer.name=gor"],
    "ekd_gor": ["balancer.name=gor"],
}


@dataclass(frozen=True)
class Budget:
    data: list[str]
    fp32_epochs: int
    qat_epochs: int
    seeds: dict[str, int]


FULL = Budget(["data.train_limit=3000", "data.test_limit=500"], 8, 2, {"W8A8": 1, "W4A4": 2})
QUICK = Budget(["data.train_limit=600", "data.test_limit=200"], 3, 1, {"W8A8": 1, "W4A4": 1})


def record(method: str, bits: str, seed: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method,
        "bits": bits,
        "seed": seed,
        "map50": round(metrics["test_map50"], 2),
        "map": round(metrics["test_map"], 2),
    }


def run_all(work: Path, budget: Budget) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    common = ["task=detection", *budget.data]
    fp32 = {
        name: run_or_reuse(
            work / f"fp32_{name}",
            "train",
            [*common, f"model.name={name}", f"train.epochs={budget.fp32_epochs}"],
        )
        for name in (*TEACHERS, STUDENT)
    }
    records = [record("fp32", "FP32", 0, fp32[STUDENT])]
    student = work / f"fp32_{STUDENT}" / "best.pt"
    one = f"teachers=[{work / f'fp32_{TEACHERS[0]}' / 'best.pt'}]"
    both = "teachers=[" + ",".join(str(work / f"fp32_{t}" / "best.pt") for t in TEACHERS) + "]"
    for bits in BITS:
        for seed in range(budget.seeds[bits]):
            quantized = [*common, f"quant.bits={bits}", f"seed={seed}", f"model.name={STUDENT}"]
            quantized.append(f"model.init={student}")
            ptq = [*quantized, "quant.method=minmax"]
            metrics = run_or_reuse(work / f"ptq_{bits}_s{seed}", "ptq", ptq)
            records.append(record("ptq", bits, seed, metrics))
            for method, balancer in METHODS.items():
                teachers = [] if method == "qat" else [both if method.startswith("ekd") else one]
                overrides = [*quantized, *balancer, *teachers, f"train.epochs={budget.qat_epochs}"]
                overrides += ["train.lr=0.002", "train.warmup_epochs=0"]
                command_name = "train" if method == "qat" else "distill"
                out = work / f"{method}_{bits}_s{seed}"
                metrics = run_or_reuse(out, command_name, overrides)
                records.append(record(method, bits, seed, metrics))
    return records, fp32


def table(records: list[dict[str, Any]], fp32: dict[str, Any]) -> str:
    map50, full = summarize(records, "map50"), summarize(records, "map")
    lines = [
        "| method | " + " | ".join(f"{b} mAP@0.5 | {b} mAP" for b in BITS) + " |",
        "|---|" + "---:|" * (2 * len(BITS)),
    ]
    student = map50[("fp32", "FP32")][0], full[("fp32", "FP32")][0]
    lines.append(
        f"| fp32 student ({STUDENT}) | "
        + " | ".join(f"{student[0]:.2f} | {student[1]:.2f}" for _ in BITS)
        + " |"
    )
    for method in ["ptq", *METHODS]:
        cells = []
        for b in BITS:
            cells += [cell(map50[(method, b)]), cell(full[(method, b)])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    best = [max(map50[(f"kd_fixed_{a}", b)][0] for a in ALPHAS) for b in BITS]
    best_cells = " | ".join(f"{v:.2f} | -" for v in best)
    lines.append(f"| kd_fixed best of α (mAP@0.5) | {best_cells} |")
    lines += ["", "| FP32 teacher | mAP@0.5 | mAP |", "|---|---:|---:|"]
    lines += [
        f"| {t} | {fp32[t]['test_map50']:.2f} | {fp32[t]['test_map']:.2f} |" for t in TEACHERS
    ]
    return "\n".join(lines)


def plot_map(records: list[dict[str, Any]], path: Path) -> None:
    stats = summarize(records, "map50")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ["ptq", *METHODS]:
        ax.plot(BITS, [stats[(method, b)][0] for b in BITS], marker="o", label=method)
    ax.axhline(stats[("fp32", "FP32")][0], color="black", linestyle="--", label="fp32 student")
    ax.set(xlabel="bit-width", ylabel="mAP@0.5 (%)", title=f"Fashion-MNIST canvases, {STUDENT}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


@torch.no_grad()
def picture(work: Path, path: Path, count: int = 4) -> None:
    """Predicted boxes (score >= 0.3) on the first test canvases: teacher above, student below;
    ground truth dashed."""
    runs = {
        "teacher (FP32 det_m)": work / "fp32_det_m",
        "student (W4A4, GoR)": work / "kd_gor_W4A4_s0",
    }
    fig, axes = plt.subplots(len(runs), count, figsize=(3 * count, 3 * len(runs)))
    for row, (title, run_dir) in enumerate(runs.items()):
        model, state = load_model(run_dir / "best.pt")
        data = checkpoint_source(state)
        names = state["meta"]["class_names"]
        for col in range(count):
            image, boxes, labels = data.test[col]
            found = detections(model(image[None]))[0]
            ax = axes[row, col]
            ax.imshow(image[0], cmap="gray")
            for box in unpadded(boxes, labels)[0]:
                x1, y1, x2, y2 = box.tolist()
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", ls="--"))
            for box, score, label in zip(
                found["boxes"], found["scores"], found["labels"], strict=True
            ):
                if score < 0.3:
                    continue
                x1, y1, x2, y2 = box.tolist()
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red"))
                ax.text(x1, y1, f"{names[label]} {score:.2f}", color="yellow", fontsize=6)
            ax.set_axis_off()
            if col == 0:
                ax.set_title(title, fontsize=9, loc="left")
    save_figure(fig, path)


def main() -> None:
    run = start(__doc__, "det_fashion", "600 canvases, 1 seed (< 10 min)")
    budget = QUICK if run.quick else FULL
    records, fp32 = run_all(run.work, budget)
    provenance = run.provenance()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run.stem}.json").write_text(
        json.dumps({**provenance, "budget": budget.__dict__, "records": records}, indent=2) + "\n"
    )
    plot_map(records, RESULTS / f"{run.stem}.png")
    picture(run.work, RESULTS / f"{run.stem}_boxes.png")
    title = "Detection on Fashion-MNIST canvases: PTQ, QAT, KD, GoR, EKD"
    (RESULTS / f"{run.stem}.md").write_text(
        markdown_header(title, provenance, str(budget))
        + "mAP in %, mean ± std over seeds where more than one.\n\n"
        f"{table(records, fp32)}\n\n![mAP]({run.stem}.png)\n\n![boxes]({run.stem}_boxes.png)\n"
    )
    print((RESULTS / f"{run.stem}.md").read_text())


if __name__ == "__main__":
    main()
