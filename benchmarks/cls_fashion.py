"""Does GoR earn its place? PTQ, QAT, QAT+KD with fixed α, GoR (its forms and the scale-aware
variants) and EKD-GoR on Fashion-MNIST, in a regime where distillation has something to give.

    python benchmarks/cls_fashion.py [--quick] [--work runs/bench_cls_fashion] [--seeds N]

- Data: the full 60k training set, 10 % held out for validation (`data.val_split`, stratified,
  the same images for every run: `data.val_seed`), the 10k test set only reported. Every number
  is the test top-1 of the checkpoint a user keeps, `best.pt`, the epoch with the best validation
  accuracy.
- Teachers: a deeper ResNet (ResNet-32) and a VGG-8, two architectures, on the students'
  schedule; KD with one teacher uses the one best on validation, EKD-GoR both.
- Student: the widest of ResNet-8 and its half- and quarter-width versions that the weakest
  teacher beats by 3 points on validation (`pick_student`), so distillation has room to help.
- Quantized students start from the FP32 student and see the same non-augmented data (the
  teacher-logit cache needs it), the same epochs and schedule, and the same seeds: the
  comparisons are paired, seed by seed.
- Fixed α is a 5-point grid picked on validation, one training run per point ("runs needed");
  the α picked on the test set is shown too, labelled oracle. GoR needs one run.

Writes benchmarks/results/cls_fashion{,_quick}.{md,json} and PNG plots beside them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _figures import plt, save_figure
from _protocol import (
    DEFAULT_GOR,
    GOR,
    TABLE_METHODS,
    VAL_PICK,
    balance_fields,
    balance_table,
    fixed_alpha_picks,
    gor_by_validation,
    heldout_target_rows,
    label,
    method_overrides,
    paired,
    paired_table,
    runs_needed,
    targets_table,
    trained,
)
from _provenance import markdown_header, start
from _seeds import cell, summarize
from torch.utils.data import DataLoader

from qatkd.config import load_config
from qatkd.tasks import task_family
from qatkd.train.logs import read_csv

RESULTS = Path(__file__).parent / "results"
TEACHERS = ("resnet32", "vgg8")
STUDENTS = ("resnet8", "resnet8_w0_5", "resnet8_w0_25")
"""Student candidates, widest first: the benchmark distils the widest one that the weakest
teacher beats by `REGIME_GAP` points on validation, a regime where distillation has room."""
REGIME_GAP = 3.0
BITS = ("W4A4", "W2A2")


@dataclass(frozen=True)
class Budget:
    """The schedule of a mode; the same for every method of a column."""

    data: list[str]
    batch_size: int
    teacher_epochs: int
    student_epochs: int
    qat_epochs: int
    seeds: int


FULL = Budget([], 128, 6, 6, 1, 3)
"""What two CPU cores finish in about two hours: 66 QAT runs of one 54k-image epoch each (about
80 s a run), the FP32 nets six epochs each. A twice-as-wide ResNet-20 teacher (4 ms an image, 3x
ResNet-32's cost per epoch) and longer schedules did not fit."""
QUICK = Budget(["data.train_limit=6000", "data.test_limit=2000"], 128, 3, 3, 2, 1)


def record(method: str, bits: str, seed: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """A run's validation and test top-1 at its best.pt (PTQ: no training, no validation)."""
    return {
        "method": method,
        "bits": bits,
        "seed": seed,
        "val": metrics.get("best_val_acc"),
        "test": round(metrics.get("best_test_acc", metrics["test_acc"]), 2),
        **balance_fields(metrics),
    }


def fp32_models(work: Path, budget: Budget) -> dict[str, dict[str, Any]]:
    results = {}
    for name in (*TEACHERS, *STUDENTS):
        epochs = budget.student_epochs if name in STUDENTS else budget.teacher_epochs
        overrides = [
            *budget.data,
            f"train.batch_size={budget.batch_size}",
            f"model.name={name}",
            f"train.epochs={epochs}",
        ]
        results[name] = trained(work / f"fp32_{name}", "train", overrides)
    return results


def fp32_scores(fp32: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each FP32 model's validation and test top-1 at its best.pt, as the pages' JSON keeps them."""
    return {name: {s: m[f"best_{s}_acc"] for s in ("val", "test")} for name, m in fp32.items()}


def pick_student(fp32: dict[str, dict[str, Any]]) -> str:
    """The widest candidate whose validation top-1 is `REGIME_GAP` below the weakest teacher's
    (the narrowest when none is)."""
    bar = min(fp32[t]["best_val_acc"] for t in TEACHERS) - REGIME_GAP
    return next((s for s in STUDENTS if fp32[s]["best_val_acc"] <= bar), STUDENTS[-1])


def quantized_runs(
    work: Path, budget: Budget, teacher: str, student_name: str
) -> list[dict[str, Any]]:
    student = work / f"fp32_{student_name}" / "best.pt"
    one = f"teachers=[{work / f'fp32_{teacher}' / 'best.pt'}]"
    ensemble = "teachers=[" + ",".join(str(work / f"fp32_{t}" / "best.pt") for t in TEACHERS) + "]"
    methods = method_overrides(one, ensemble)
    records = []
    for bits in BITS:
        for seed in range(budget.seeds):
            common = [
                *budget.data,
                "data.augment=false",
                f"train.batch_size={budget.batch_size}",
                f"quant.bits={bits}",
                f"seed={seed}",
                f"model.name={student_name}",
                f"model.init={student}",
            ]
            # min-max calibration: the better PTQ baseline (LSQ's init is made for training)
            metrics = trained(work / f"ptq_{bits}_s{seed}", "ptq", [*common, "quant.method=minmax"])
            records.append(record("ptq", bits, seed, metrics))
            for method, extra in methods.items():
                overrides = [
                    *common,
                    *extra,
                    f"train.epochs={budget.qat_epochs}",
                    "train.lr=0.01",
                    "train.warmup_epochs=0",
                    "train.log_every=20",
                ]
                if method != "qat":
                    overrides.append("kd.cache=true")
                command = "train" if method == "qat" else "distill"
                metrics = trained(work / f"{method}_{bits}_s{seed}", command, overrides)
                records.append(record(method, bits, seed, metrics))
    return records


def kd_target_check(run_dir: Path) -> dict[str, Any]:
    """The cached KD targets against the live teachers on every training image of the run
    `run_dir` (EKD: both teachers). Every seed trains on the same images (the validation split
    is `data.val_seed`'s), so the check holds for all of them."""
    config = load_config(run_dir / "config.yaml")
    family = task_family(config.task)
    data = family.load(config)
    task = family.make_task(config, data)
    lookup, train_set = family.teacher_outputs(config, data, task, torch.device("cpu"))
    agree, gap, samples = [0] * len(config.teachers), [0.0] * len(config.teachers), 0
    for batch in DataLoader(train_set, batch_size=512):
        live = lookup.live(task.inputs(batch))
        for i, (cached, fresh) in enumerate(zip(lookup(batch), live, strict=True)):
            agree[i] += int((cached.argmax(1) == fresh.argmax(1)).sum())
            gap[i] = max(gap[i], float((cached - fresh).abs().max()))
        samples += len(batch[0])
    return {
        "run": run_dir.name,
        "samples": samples,
        "teachers": {
            path: {"top1_agreement": 100 * agree[i] / samples, "max_abs_diff": gap[i]}
            for i, path in enumerate(config.teachers)
        },
    }


def kd_check_text(check: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {Path(path).parent.name} | {c['top1_agreement']:.2f} | {c['max_abs_diff']:.2g} |"
        for path, c in check["teachers"].items()
    )
    return (
        "KD targets: every cached run checks its first batch against the live teachers before it "
        f"trains; below, the cache rows of all {check['samples']:,} training images of "
        f"`{check['run']}` against the live teachers (every seed trains on these images).\n\n"
        f"| teacher | top-1 agreement (%) | max abs. logit difference |\n|---|---:|---:|\n{rows}"
    )


def results_table(
    records: list[dict[str, Any]], fp32: dict[str, dict[str, Any]], student_name: str
) -> str:
    tests, vals = (
        summarize(records, "test"),
        summarize([r for r in records if r["val"] is not None], "val"),
    )
    head = " | ".join(f"{b} test | {b} val" for b in BITS)
    lines = [f"| method | runs needed | {head} |", "|---|---:|" + "---:|---:|" * len(BITS)]
    student = fp32[student_name]
    lines.append(
        f"| FP32 student ({student_name}) | 1 | "
        + " | ".join(
            f"{student['best_test_acc']:.2f} | {student['best_val_acc']:.2f}" for _ in BITS
        )
        + " |"
    )
    for method in TABLE_METHODS:
        cells = " | ".join(
            f"{cell(tests[(method, b)])} | "
            + (f"{vals[(method, b)][0]:.2f}" if (method, b) in vals else "-")
            for b in BITS
        )
        lines.append(f"| {label(method)} | {runs_needed(method)} | {cells} |")
    lines += ["", "| FP32 model | validation | test |", "|---|---:|---:|"]
    lines += [
        f"| {name} | {m['best_val_acc']:.2f} | {m['best_test_acc']:.2f} |"
        for name, m in fp32.items()
    ]
    return "\n".join(lines)


def target_rows(
    records: list[dict[str, Any]], fp32: dict[str, dict[str, Any]], student_name: str
) -> list[tuple[str, float, str]]:
    """(what, measured, target): the classification targets of the GoR issues."""
    tests = summarize(records, "test")
    student = fp32[student_name]["best_test_acc"]
    weakest_teacher = min(fp32[t]["best_test_acc"] for t in TEACHERS)
    rows = [("weakest teacher − FP32 student", weakest_teacher - student, ">= 3")]
    for bits in BITS:
        gain = paired(records, DEFAULT_GOR, VAL_PICK, bits)[0]
        rows.append((f"{bits}: GoR (default) − fixed α (validation pick)", gain, ">= 0.3"))
    rows += [
        ("W4A4: EKD-GoR − FP32 student", tests[("ekd_gor", "W4A4")][0] - student, ">= 0.3"),
        ("W2A2: GoR (default) − FP32 student", tests[(DEFAULT_GOR, "W2A2")][0] - student, ">= -1"),
        ("W2A2: QAT − FP32 student (KD has room)", tests[("qat", "W2A2")][0] - student, "<= -1"),
        *heldout_target_rows(records, BITS, "top-1"),
    ]
    return rows


def plot_accuracy(
    records: list[dict[str, Any]], fp32: float, student_name: str, path: Path
) -> None:
    """Per bit-width, each method's test top-1 (mean ± std over the seeds) beside plain QAT's and
    the FP32 student's, on an axis spanning the trained methods (PTQ, far below at 2 bits, is
    named in the panel's title rather than drawn off the scale)."""
    tests = summarize(records, "test")
    methods = ["qat", VAL_PICK, *GOR, "ekd_gor"]
    fig, axes = plt.subplots(1, len(BITS), figsize=(6 * len(BITS), 0.35 * len(methods) + 1.5))
    for ax, bits in zip(axes, BITS, strict=True):
        means = [tests[(m, bits)][0] for m in methods]
        errors = [tests[(m, bits)][1] for m in methods]
        colors = [{"qat": "black", DEFAULT_GOR: "tab:red"}.get(m, "tab:blue") for m in methods]
        ax.errorbar(means, methods, xerr=errors, fmt="none", ecolor="gray", capsize=3)
        ax.scatter(means, methods, c=colors, zorder=3)
        ax.axvline(tests[("qat", bits)][0], color="black", linestyle=":", label="plain QAT")
        ax.axvline(fp32, color="black", linestyle="--", label="FP32 student")
        low = min(m - e for m, e in zip(means, errors, strict=True))
        high = max(max(m + e for m, e in zip(means, errors, strict=True)), fp32)
        ax.set_xlim(low - 0.3, high + 0.3)
        ax.invert_yaxis()
        ptq = tests[("ptq", bits)][0]
        ax.set(xlabel="test top-1 (%)", title=f"{bits} (PTQ: {ptq:.1f} %)")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"Fashion-MNIST, {student_name} student: mean ± std over the seeds; "
        f"red: the default GoR ({DEFAULT_GOR})"
    )
    save_figure(fig, path)


def plot_training(work: Path, path: Path) -> None:
    """Has QAT converged? The task loss per logged step and the validation accuracy per epoch;
    and GoR's effective weights; seed 0."""
    fig, (loss_ax, val_ax, weights_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    for bits in BITS:
        for method in ("qat", "kd_fixed_0.5", DEFAULT_GOR, "gor_liebel_running"):
            steps = read_csv(work / f"{method}_{bits}_s0" / "steps.csv")
            points = [(r["step"], r["l_ts"]) for r in steps if "l_ts" in r]
            if points:
                loss_ax.plot(*zip(*points, strict=True), label=f"{method} {bits}")
            epochs = read_csv(work / f"{method}_{bits}_s0" / "log.csv")
            points = [(r["epoch"], r["val_acc"]) for r in epochs if "val_acc" in r]
            if points:
                val_ax.plot(*zip(*points, strict=True), marker="o", label=f"{method} {bits}")
        for method in (DEFAULT_GOR, "gor_liebel_running"):
            steps = read_csv(work / f"{method}_{bits}_s0" / "steps.csv")
            for key in ("w_ts", "w_kd"):
                points = [(r["step"], r[key]) for r in steps if key in r]
                if points:
                    weights_ax.plot(*zip(*points, strict=True), label=f"{method} {key} {bits}")
    loss_ax.set(xlabel="step", ylabel="task loss L_TS (training batches)", title="QAT convergence")
    val_ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="validation per epoch")
    weights_ax.set(xlabel="step", title="GoR effective weights", yscale="log")
    for ax in (loss_ax, val_ax, weights_ax):
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    run = start(__doc__, "cls_fashion", "6k images, short schedules, 1 seed (< 10 min)")
    budget = run.schedule(QUICK, FULL)
    fp32 = fp32_models(run.work, budget)
    teacher = max(TEACHERS, key=lambda t: fp32[t]["best_val_acc"])
    student = pick_student(fp32)
    records = quantized_runs(run.work, budget, teacher, student)
    records += fixed_alpha_picks(records)
    targets, checked = targets_table(target_rows(records, fp32, student))
    kd_check = kd_target_check(run.work / f"ekd_gor_{BITS[0]}_s0")
    winner = gor_by_validation(records)
    provenance = {
        **run.provenance(),
        "budget": budget.__dict__,
        "kd_teacher": teacher,
        "student": student,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run.stem}.json").write_text(
        json.dumps(
            {
                **provenance,
                "fp32": fp32_scores(fp32),
                "records": records,
                "kd_target_check": kd_check,
                "gor_by_validation": winner,
                "targets": checked,
            },
            indent=2,
        )
        + "\n"
    )
    plot_accuracy(
        records, fp32[student]["best_test_acc"], student, RESULTS / f"{run.stem}_accuracy.png"
    )
    plot_training(run.work, RESULTS / f"{run.stem}_training.png")
    (RESULTS / f"{run.stem}.md").write_text(
        markdown_header("Fashion-MNIST: does GoR earn its place?", provenance, str(budget))
        + "Top-1 (%) of each run's best.pt (chosen on validation); test: mean ± std over "
        f"{budget.seeds} paired seed(s); val: mean. KD teacher (best on validation): {teacher}. "
        f"Student: {student}, the widest of {', '.join(STUDENTS)} whose FP32 validation top-1 "
        f"is {REGIME_GAP:g} points below the weakest teacher's.\n\n"
        f"{results_table(records, fp32, student)}\n\n"
        f"## Sanity checks\n\n{kd_check_text(kd_check)}\n\n"
        "## Paired differences (same seeds)\n\n"
        f"{paired_table(records, BITS, 'top-1')}\n\n"
        "## What each GoR form learned, and its step time (means over the seeds)\n\n"
        f"{balance_table(records, BITS)}\n\n"
        f"GoR variant with the best validation accuracy: **{winner}** "
        f"(the configuration default is {DEFAULT_GOR}).\n\n"
        f"## Targets (computed from the rows above)\n\n{targets}\n\n"
        f"![accuracy]({run.stem}_accuracy.png)\n\n![training]({run.stem}_training.png)\n"
    )
    print((RESULTS / f"{run.stem}.md").read_text())


if __name__ == "__main__":
    main()
