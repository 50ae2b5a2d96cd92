"""The paper's comparison on Fashion-MNIST: PTQ, QAT, QAT+KD (fixed α), QAT+KD+GoR, QAT-EKD and
QAT-EKD-GoR at W8A8, W4A4 and W2A2, with identical data, teachers, epochs and schedule per column.

    python benchmarks/cls_fashion.py [--quick] [--work runs/bench_cls_fashion]

Teachers (ResNet-20, the deeper ResNet-32 and VGG-8: two architectures, two depths) and the FP32
ResNet-8 student are trained once and reused from the work folder; every quantized student starts
from that FP32 checkpoint. ResNet-8 keeps the ~70 quantized runs of the full mode inside its budget
on 2 CPU cores (one run of ResNet-20 costs about 3x). Writes
benchmarks/results/cls_fashion{,_quick}.{md,json} and PNG plots beside them.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _figures import plt, save_figure
from _provenance import markdown_header, start
from _seeds import cell, summarize

from qatkd.pipeline import run_or_reuse
from qatkd.train.logs import read_csv

RESULTS = Path(__file__).parent / "results"
TEACHERS = {"resnet20": "resnet20", "resnet32": "resnet32", "vgg8": "vgg8"}
STUDENT = "resnet8"
BITS = ("W8A8", "W4A4", "W2A2")
METHODS = {
    "qat": ["balancer.name=ts_only"],
    "kd_fixed_0.1": ["balancer.name=fixed", "balancer.alpha=0.1"],
    "kd_fixed_0.5": ["balancer.name=fixed", "balancer.alpha=0.5"],
    "kd_fixed_0.9": ["balancer.name=fixed", "balancer.alpha=0.9"],
    "kd_gor_liebel": ["balancer.name=gor", "balancer.form=liebel"],
    "kd_gor_kendall": ["balancer.name=gor", "balancer.form=kendall"],
    "ekd_fixed_0.5": ["balancer.name=fixed", "balancer.alpha=0.5"],
    "ekd_gor": ["balancer.name=gor"],
    "ekd_gor_per_teacher": ["balancer.name=gor", "balancer.per_teacher=true"],
}
DIAG_METHODS = ("kd_fixed_0.5", "kd_gor_liebel")


@dataclass(frozen=True)
class Budget:
    """The schedule of a mode; the same for every method of a column."""

    data: list[str]
    batch_size: int
    fp32_epochs: int
    qat_epochs: int
    seeds: dict[str, int]


FULL = Budget(["data.train_limit=12000"], 64, 5, 2, {"W8A8": 1, "W4A4": 3, "W2A2": 3})
QUICK = Budget(["data.train_limit=3000", "data.test_limit=1000"], 64, 2, 1, dict.fromkeys(BITS, 1))


def fp32_models(work: Path, budget: Budget) -> dict[str, dict[str, Any]]:
    results = {}
    for name, model in {**TEACHERS, "student": STUDENT}.items():
        overrides = [
            *budget.data,
            f"train.batch_size={budget.batch_size}",
            f"model.name={model}",
            f"train.epochs={budget.fp32_epochs}",
        ]
        results[name] = run_or_reuse(work / f"fp32_{name}", "train", overrides)
    return results


def quantized_rows(work: Path, budget: Budget) -> list[dict[str, Any]]:
    student = work / "fp32_student" / "best.pt"
    one = f"teachers=[{work / 'fp32_resnet20' / 'best.pt'}]"
    ensemble = "teachers=[" + ",".join(str(work / f"fp32_{t}" / "best.pt") for t in TEACHERS) + "]"
    records = []
    for bits in BITS:
        for seed in range(budget.seeds[bits]):
            common = [
                *budget.data,
                f"train.batch_size={budget.batch_size}",
                f"quant.bits={bits}",
                f"seed={seed}",
                f"model.name={STUDENT}",
                f"model.init={student}",
            ]
            # min-max calibration: the better PTQ baseline (LSQ's init is made for training)
            metrics = run_or_reuse(
                work / f"ptq_{bits}_s{seed}", "ptq", [*common, "quant.method=minmax"]
            )
            records.append(record("ptq", bits, seed, metrics))
            for method, balancer in METHODS.items():
                teachers = (
                    [] if method == "qat" else [ensemble if method.startswith("ekd") else one]
                )
                diag = ["diag.every=20"] if bits == "W2A2" and method in DIAG_METHODS else []
                overrides = [
                    *common,
                    *balancer,
                    *teachers,
                    *diag,
                    f"train.epochs={budget.qat_epochs}",
                    "train.lr=0.01",
                    "train.warmup_epochs=0",
                    "train.log_every=10",
                ]
                command_name = "train" if method == "qat" else "distill"
                metrics = run_or_reuse(work / f"{method}_{bits}_s{seed}", command_name, overrides)
                records.append(record(method, bits, seed, metrics))
    return records


def record(method: str, bits: str, seed: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"method": method, "bits": bits, "seed": seed, "top1": round(metrics["test_acc"], 2)}


def table(records: list[dict[str, Any]], teachers: dict[str, dict[str, Any]]) -> str:
    stats = summarize(records, "top1")
    lines = ["| method | " + " | ".join(BITS) + " |", "|---|" + "---:|" * len(BITS)]
    fp32 = stats[("fp32", "FP32")][0]
    lines.append(f"| fp32 student (ResNet-8) | {fp32:.2f} | {fp32:.2f} | {fp32:.2f} |")
    for method in ["ptq", *METHODS]:
        lines.append(f"| {method} | " + " | ".join(cell(stats[(method, b)]) for b in BITS) + " |")
    for label, agg in (("kd_fixed best of α", max), ("kd_fixed mean of α", statistics.mean)):
        values = [agg(stats[(f"kd_fixed_{a}", b)][0] for a in ("0.1", "0.5", "0.9")) for b in BITS]
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", "| FP32 teacher | top-1 |", "|---|---:|"]
    lines += [f"| {name} | {m['test_acc']:.2f} |" for name, m in teachers.items()]
    return "\n".join(lines)


def plot_accuracy(records: list[dict[str, Any]], path: Path) -> None:
    stats = summarize(records, "top1")
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in ["ptq", *METHODS]:
        means = [stats[(method, b)][0] for b in BITS]
        ax.plot(BITS, means, marker="o", label=method)
    ax.axhline(stats[("fp32", "FP32")][0], color="black", linestyle="--", label="fp32 student")
    ax.set(xlabel="bit-width", ylabel="test top-1 (%)", title="Fashion-MNIST, ResNet-8 student")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_gor_and_conflict(work: Path, path: Path) -> None:
    """GoR's effective weights over training (W4A4 and W2A2), and the gradient conflict at W2A2
    for fixed α = 0.5 against GoR."""
    fig, (weights_ax, ratio_ax, cosine_ax) = plt.subplots(1, 3, figsize=(14, 4))
    for bits in ("W4A4", "W2A2"):
        rows = read_csv(work / f"kd_gor_liebel_{bits}_s0" / "steps.csv")
        for key in ("w_ts", "w_kd"):
            points = [(r["step"], r[key]) for r in rows if key in r]
            weights_ax.plot(*zip(*points, strict=True), marker=".", label=f"{key} {bits}")
    weights_ax.set(xlabel="step", title="GoR (liebel) effective weights")
    for method in DIAG_METHODS:
        rows = [r for r in read_csv(work / f"{method}_W2A2_s0" / "steps.csv") if "grad_ratio" in r]
        steps = [r["step"] for r in rows]
        ratio_ax.plot(steps, [r["grad_ratio"] for r in rows], marker=".", label=method)
        cosine_ax.plot(steps, [r["grad_cosine"] for r in rows], marker=".", label=method)
    ratio_ax.set(xlabel="step", title="W2A2: ‖∇L_TS‖ / ‖∇L_KD‖", yscale="log")
    cosine_ax.set(xlabel="step", title="W2A2: cos(∇L_TS, ∇L_KD)", ylim=(-1, 1))
    for ax in (weights_ax, ratio_ax, cosine_ax):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    run = start(__doc__, "cls_fashion", "small data, 1 seed (< 10 min)")
    budget = QUICK if run.quick else FULL
    fp32 = fp32_models(run.work, budget)
    records = [record("fp32", "FP32", 0, fp32.pop("student")), *quantized_rows(run.work, budget)]
    provenance = {**run.provenance(), "budget": budget.__dict__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run.stem}.json").write_text(
        json.dumps({**provenance, "records": records}, indent=2) + "\n"
    )
    plot_accuracy(records, RESULTS / f"{run.stem}_accuracy.png")
    plot_gor_and_conflict(run.work, RESULTS / f"{run.stem}_gor.png")
    (RESULTS / f"{run.stem}.md").write_text(
        markdown_header("Fashion-MNIST: PTQ, QAT, KD, GoR, EKD", provenance, str(budget))
        + "Test top-1 (%), mean ± std over seeds where more than one.\n\n"
        f"{table(records, fp32)}\n\n![accuracy]({run.stem}_accuracy.png)\n\n"
        f"![GoR]({run.stem}_gor.png)\n"
    )
    print((RESULTS / f"{run.stem}.md").read_text())


if __name__ == "__main__":
    main()
