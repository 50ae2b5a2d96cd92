"""A mobile student, distilled end to end: torchvision's MobileNetV2 as the student of the
Fashion-MNIST teachers (ResNet-32 and VGG-8, other families), W8A8 and W4A4 with the first and
last layers at 8 bits, exported to int8 ONNX and measured, beside the ResNet student of
`cls_fashion.py` trained through the same stages.

    python benchmarks/mobile_student.py [--quick] [--work DIR] [--cls-work DIR] [--seeds N]

- Teachers and the ResNet student: `cls_fashion.py`'s own FP32 runs (`fp32_models`, its
  schedule, in its work folder, default runs/bench_cls_fashion[_quick]: `--cls-work`), so the two
  benchmarks share them; the ResNet student is the one `cls_fashion.pick_student` picks.
- Mobile student: `model.name=tv:mobilenet_v2` (torchvision's network, untrained, first conv
  taking one channel, 10 classes) at the data's own 28 x 28, trained in FP32 on the ResNet
  students' schedule. MobileNetV3-small is not the student: torchvision builds its BatchNorms
  with momentum 0.01, so after a short schedule their running statistics are still far from the
  data's (a 3-epoch probe on 6k images: 69 % training, 10 % validation top-1).
- Quantized students, both architectures, each bit-width and seed, from their FP32 checkpoint
  (`model.init`) on `cls_fashion.py`'s QAT schedule: PTQ (min-max calibration, no training),
  plain QAT (`balancer.name=ts_only`) and QAT-EKD-GoR, distilled from both teachers with the
  default balancer (GoR, form `DEFAULT_GOR`; teacher logits cached, `kd.cache=true`).
- Each quantized student's `best.pt` (the epoch best on validation) is exported (`qatkd
  export`) and, for seed 0, measured (`qatkd bench`): test top-1 in PyTorch and of the int8 ONNX
  in onnxruntime, top-1 agreement (onnxruntime and OpenVINO), and int8 latency against FP32 of
  the same network at batch 1 and 64, round-robin in one process.

Cost on 2 cores: `--quick` about 9 min with cls_fashion's quick teachers trained; the full mode
with `--seeds 1` 73 min, about 35 min of it cls_fashion's full FP32 runs where `--cls-work` does
not hold them yet (AMD EPYC), and about 17 min more a seed.

Writes benchmarks/results/mobile_student{,_quick}.{md,json}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from _parity import NOISE, with_noise
from _protocol import DEFAULT_GOR, GOR, mean_present, method_overrides, paired, trained
from _provenance import default_work, markdown_header, start
from _seeds import cell, summarize
from cls_fashion import (
    FULL,
    QUICK,
    STUDENTS,
    TEACHERS,
    fp32_models,
    fp32_scores,
    kd_check_text,
    kd_target_check,
)
from cls_fashion import pick_student as pick_resnet_student
from cls_fashion import record as cls_record
from torch.utils.data import DataLoader

from qatkd.artifacts import checkpoint_source, load_model
from qatkd.checkpoint import file_sha256
from qatkd.export.runtime import load_runner, openvino_available
from qatkd.machine import machine
from qatkd.pipeline import bench, export
from qatkd.tasks.classification.parity import compare

NAME = "mobile_student"
RESULTS = Path(__file__).parent / "results"
MOBILE = "mobilenet_v2"
"""The mobile student: `model.name=tv:mobilenet_v2`."""
BITS = ("W8A8", "W4A4")
FIRST_LAST_BITS = 8
EKD = f"ekd_{DEFAULT_GOR}"
"""QAT-EKD-GoR with the default balancer; named by its form, so that a change of the default
makes new runs instead of reusing these under another name."""
METHODS = ("ptq", "qat", EKD)
REPEATS = {True: 20, False: 100}
"""Latency rounds at each batch size, quick and full."""
THREADS = 2
BATCHES = (1, 64)
SPEEDS = [f"{backend} b{batch}" for backend in ("onnxruntime", "openvino") for batch in BATCHES]
"""The FP32 / int8 latency ratios shown: each runtime at each batch size."""


def options(parser: Any) -> None:
    parser.add_argument(
        "--cls-work",
        type=Path,
        help="cls_fashion.py's work folder, whose teachers and FP32 ResNet students this "
        "benchmark reuses or trains (default runs/bench_cls_fashion[_quick])",
    )


def record(student: str, method: str, bits: str, seed: int, metrics: dict[str, Any]) -> dict:
    """`cls_fashion.record` with the student's name."""
    return {"student": student, **cls_record(method, bits, seed, metrics)}


def quantized_runs(
    work: Path, budget: Any, student: str, model_name: str, init: Path, ensemble: str
) -> list[dict[str, Any]]:
    """PTQ, plain QAT and QAT-EKD-GoR (default balancer) of one student at each bit-width and
    seed, on `cls_fashion.py`'s QAT schedule; run folders `<student>_<method>_<bits>_s<seed>`."""
    methods = {
        "qat": method_overrides("", ensemble)["qat"],
        EKD: [ensemble, "balancer.name=gor", *GOR[DEFAULT_GOR], "kd.cache=true"],
    }
    records = []
    for bits in BITS:
        for seed in range(budget.seeds):
            common = [
                *budget.data,
                "data.augment=false",
                f"train.batch_size={budget.batch_size}",
                f"quant.bits={bits}",
                f"quant.first_last_bits={FIRST_LAST_BITS}",
                f"seed={seed}",
                f"model.name={model_name}",
                f"model.init={init}",
            ]
            metrics = trained(
                work / f"{student}_ptq_{bits}_s{seed}", "ptq", [*common, "quant.method=minmax"]
            )
            records.append(record(student, "ptq", bits, seed, metrics))
            for method, extra in methods.items():
                overrides = [
                    *common,
                    *extra,
                    f"train.epochs={budget.qat_epochs}",
                    "train.lr=0.01",
                    "train.warmup_epochs=0",
                    "train.log_every=20",
                ]
                command = "train" if method == "qat" else "distill"
                metrics = trained(work / f"{student}_{method}_{bits}_s{seed}", command, overrides)
                records.append(record(student, method, bits, seed, metrics))
    return records


def deployed(checkpoint: Path, measure: bool, repeats: int) -> dict[str, Any]:
    """The export of `checkpoint` (parity in onnxruntime), and with `measure` its `qatkd bench`
    (parity in every int8 backend, latency against FP32): reused when the run folder already
    holds them for this very checkpoint, measured on this machine."""
    out = checkpoint.parent
    sha = file_sha256(checkpoint)
    if measure:
        saved = out / "bench.json"
        if saved.is_file():
            result = json.loads(saved.read_text())
            if result.get("checkpoint_sha256") == sha and result.get("machine") == machine():
                return result
        return bench(checkpoint, threads=THREADS, batch_sizes=BATCHES, repeats=repeats)
    saved = out / "parity.json"
    if saved.is_file() and json.loads(saved.read_text()).get("checkpoint_sha256") == sha:
        return json.loads(saved.read_text())
    return export(checkpoint)


def openvino_vs_trained(checkpoint: Path) -> float | None:
    """Top-1 agreement (%) of the int8 ONNX beside `checkpoint` in OpenVINO with the trained
    model (before bias alignment), on the checkpoint's test split; None without OpenVINO.
    `qatkd bench` compares each runtime with the aligned model, and onnxruntime (only) with
    the trained one too."""
    if not openvino_available():
        return None
    model, state = load_model(checkpoint)
    runner = load_runner(checkpoint.parent / "model.int8.onnx", "openvino", THREADS)
    loader = DataLoader(checkpoint_source(state).test, batch_size=256)
    return compare(model, runner, loader, desc="parity openvino, trained")["agreement"]


@torch.no_grad()
def noise_agreement(checkpoint: Path) -> float:
    """Top-1 agreement (%) of the trained fake-quantized model with itself on test images plus
    Gaussian noise of std `NOISE` (seeded): how far a rounding-sized change moves its
    predictions, the yardstick for the runtimes' agreement."""
    model, state = load_model(checkpoint)
    generator = torch.Generator().manual_seed(0)
    same = total = 0
    for x, _ in DataLoader(checkpoint_source(state).test, batch_size=256):
        same += int((model(x).argmax(1) == model(with_noise(x, generator)).argmax(1)).sum())
        total += len(x)
    return 100 * same / total


def ratio(result: dict[str, Any], backend: str, batch: int) -> float | None:
    """FP32 latency / int8 latency of one backend at `batch`, from one bench run."""
    latency = {
        r["precision"]: r["latency_ms"]
        for r in result.get("records", [])
        if (r["backend"], r["batch"]) == (backend, batch)
    }
    if "fp32" not in latency or "int8" not in latency:
        return None
    return latency["fp32"] / latency["int8"]


def deployment_row(key: tuple[str, str, str], result: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of one bench: accuracies, agreement, speed ratios, int8 size, and the
    Conv / Gemm nodes onnxruntime still runs in float."""
    student, method, bits = key
    ort = result["parity"]["onnxruntime"]
    ops = result["onnxruntime_ops"]
    return {
        "student": student,
        "method": method,
        "bits": bits,
        "test_pytorch": ort.get("accuracy_trained", ort["accuracy_pytorch"]),
        "test_onnx": ort["accuracy_export"],
        "agreement": {b: p["agreement"] for b, p in result["parity"].items()},
        "agreement_trained": {"onnxruntime": ort.get("agreement_trained")},
        "speedup": {
            f"{backend} b{batch}": ratio(result, backend, batch)
            for backend in ("onnxruntime", "openvino")
            for batch in BATCHES
        },
        "code_mismatch": ort["code_mismatch_rate"],
        "int8_bytes": result["bytes"]["model.int8.onnx"],
        "fp32_bytes": result["bytes"]["model.fp32.onnx"],
        "integer_kernels": sum(n for op, n in ops.items() if op.startswith(("QLinear", "QGemm"))),
        "float_conv_gemm": sum(ops.get(op, 0) for op in ("Conv", "Gemm", "MatMul")),
    }


def accuracy_table(
    records: list[dict[str, Any]], fp32: dict[str, dict[str, Any]], students: list[str]
) -> str:
    head = " | ".join(f"{b} test | {b} val" for b in BITS)
    lines = [
        f"| student | method | {head} |",
        "|---|---|" + "---:|---:|" * len(BITS),
    ]
    for student in students:
        m = fp32[student]
        same = " | ".join(f"{m['best_test_acc']:.2f} | {m['best_val_acc']:.2f}" for _ in BITS)
        lines.append(f"| {student} | FP32 | {same} |")
        mine = [r for r in records if r["student"] == student]
        tests = summarize(mine, "test")
        vals = summarize([r for r in mine if r["val"] is not None], "val")
        for method in METHODS:
            cells = " | ".join(
                f"{cell(tests[(method, b)])} | "
                + (f"{vals[(method, b)][0]:.2f}" if (method, b) in vals else "-")
                for b in BITS
            )
            lines.append(f"| {student} | {method} | {cells} |")
    lines += ["", "| FP32 teacher | validation | test |", "|---|---:|---:|"]
    lines += [
        f"| {t} | {fp32[t]['best_val_acc']:.2f} | {fp32[t]['best_test_acc']:.2f} |"
        for t in TEACHERS
    ]
    return "\n".join(lines)


def paired_lines(records: list[dict[str, Any]], students: list[str]) -> str:
    lines = [
        "| test top-1 difference, same seeds | " + " | ".join(BITS) + " |",
        "|---|" + "---:|" * len(BITS),
    ]
    for student in students:
        mine = [r for r in records if r["student"] == student]
        for method, baseline in ((EKD, "qat"), ("qat", "ptq")):
            diffs = [cell(paired(mine, method, baseline, b)) for b in BITS]
            lines.append(f"| {student}: {method} − {baseline} | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def balance_lines(records: list[dict[str, Any]], students: list[str]) -> str:
    """What the default GoR ended with (means over the seeds), and the seconds per training step
    of QAT and QAT-EKD-GoR (the runs' own time, not a controlled timing)."""
    lines = [
        "| student | bits | GoR w_ts | GoR w_kd | s/step QAT | s/step QAT-EKD-GoR |",
        "|---|---|---:|---:|---:|---:|",
    ]

    def mean(values: list[Any]) -> str:
        value = mean_present(values)
        return "-" if value is None else f"{value:.3f}"

    for student in students:
        for bits in BITS:
            runs = {
                m: [
                    r
                    for r in records
                    if (r["student"], r["method"], r["bits"]) == (student, m, bits)
                ]
                for m in ("qat", EKD)
            }
            cells = [
                mean([r["final"].get("final_w_ts") for r in runs[EKD]]),
                mean([r["final"].get("final_w_kd") for r in runs[EKD]]),
                mean([r["seconds_per_step"] for r in runs["qat"]]),
                mean([r["seconds_per_step"] for r in runs[EKD]]),
            ]
            lines.append(f"| {student} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def deployment_tables(rows: list[dict[str, Any]]) -> str:
    """Parity (accuracies, agreement, activation codes), then speed and size, one row per
    measured student."""
    parity = [
        "| student | method | bits | test PyTorch | test int8 ONNX (onnxruntime) | agreement "
        "onnxruntime | agreement OpenVINO | agreement with the trained model: onnxruntime | "
        "OpenVINO | PyTorch with itself, input noise | activation codes differing (%) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    speed = [
        "| student | method | bits | "
        + " | ".join(f"FP32 / int8 {s}" for s in SPEEDS)
        + " | int8 ONNX KiB (FP32) | integer kernels | float Conv/Gemm |",
        "|---|---|---|" + "---:|" * (3 + len(SPEEDS)),
    ]
    for r in rows:
        ov = r["agreement"].get("openvino")
        which = f"| {r['student']} | {r['method']} | {r['bits']} | "
        cells = [
            f"{r['test_pytorch']:.2f}",
            f"{r['test_onnx']:.2f}",
            f"{r['agreement']['onnxruntime']:.2f}",
            "-" if ov is None else f"{ov:.2f}",
            *(
                "-" if r["agreement_trained"].get(b) is None else f"{r['agreement_trained'][b]:.2f}"
                for b in ("onnxruntime", "openvino")
            ),
            f"{r['noise_agreement']:.2f}",
            f"{r['code_mismatch']:.3f}",
        ]
        parity.append(which + " | ".join(cells) + " |")
        cells = [
            *(f"{r['speedup'][s]:.2f}x" if r["speedup"][s] else "-" for s in SPEEDS),
            f"{r['int8_bytes'] / 1024:.0f} ({r['fp32_bytes'] / 1024:.0f})",
            str(r["integer_kernels"]),
            str(r["float_conv_gemm"]),
        ]
        speed.append(which + " | ".join(cells) + " |")
    return "\n".join(parity) + "\n\n" + "\n".join(speed)


def cls_page_note(quick: bool, resnet: str) -> str:
    """The ResNet student's rows on the committed `cls_fashion` page of this mode, labelled with
    that page's commit (its runs: other bit-widths, a GoR form per row, its own seeds)."""
    path = RESULTS / f"cls_fashion{'_quick' if quick else ''}.json"
    if not path.is_file():
        return ""
    page = json.loads(path.read_text())
    if page.get("student") != resnet:
        return (
            f"The committed `{path.name}` (commit {page.get('commit')}) distilled "
            f"{page.get('student')}, not {resnet}: not comparable here.\n\n"
        )
    tests = summarize(page["records"], "test")
    shown = [
        f"{m} {b} {cell(tests[(m, b)])}"
        for m in ("qat", DEFAULT_GOR, "ekd_gor")
        for b in BITS
        if (m, b) in tests
    ]
    return (
        f"For reference, the committed `{path.name}` (commit {page.get('commit')}, "
        f"{len({r['seed'] for r in page['records']})} seed(s)) reports the test top-1 of {resnet}: "
        + "; ".join(shown)
        + " (its `gor_kendall` distils from one teacher, its `ekd_gor` uses form liebel).\n\n"
    )


def main() -> None:
    run = start(__doc__, NAME, "6k images, short schedules, 1 seed (about 9 min)", options)
    budget = run.schedule(QUICK, FULL)
    cls_work = run.options["cls_work"] or default_work("cls_fashion", run.quick)
    shared = [*TEACHERS, *STUDENTS]
    cls_reused = sum((cls_work / f"fp32_{n}" / "metrics.json").is_file() for n in shared)
    fp32 = fp32_models(cls_work, budget)
    resnet = pick_resnet_student(fp32)
    fp32[MOBILE] = trained(
        run.work / f"fp32_{MOBILE}",
        "train",
        [
            *budget.data,
            f"train.batch_size={budget.batch_size}",
            f"model.name=tv:{MOBILE}",
            f"train.epochs={budget.student_epochs}",
        ],
    )
    ensemble = (
        "teachers=[" + ",".join(str(cls_work / f"fp32_{t}" / "best.pt") for t in TEACHERS) + "]"
    )
    students = {
        MOBILE: (f"tv:{MOBILE}", run.work / f"fp32_{MOBILE}" / "best.pt"),
        resnet: (resnet, cls_work / f"fp32_{resnet}" / "best.pt"),
    }
    records = []
    for student, (model_name, init) in students.items():
        records += quantized_runs(run.work, budget, student, model_name, init, ensemble)
    rows, parity = [], []
    for r in records:
        if r["method"] == "ptq":
            continue
        folder = run.work / f"{r['student']}_{r['method']}_{r['bits']}_s{r['seed']}"
        result = deployed(folder / "best.pt", r["seed"] == 0, REPEATS[run.quick])
        for backend, p in result["parity"].items():
            parity.append({"run": folder.name, "backend": backend, **p})
        if r["seed"] == 0:
            row = deployment_row((r["student"], r["method"], r["bits"]), result)
            row["agreement_trained"]["openvino"] = openvino_vs_trained(folder / "best.pt")
            row["noise_agreement"] = noise_agreement(folder / "best.pt")
            rows.append(row)
    kd_check = kd_target_check(run.work / f"{MOBILE}_{EKD}_{BITS[-1]}_s0")
    write_results(run, budget, fp32, resnet, records, rows, parity, kd_check, cls_work, cls_reused)


def write_results(
    run: Any,
    budget: Any,
    fp32: dict[str, dict[str, Any]],
    resnet: str,
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    parity: list[dict[str, Any]],
    kd_check: dict[str, Any],
    cls_work: Path,
    cls_reused: int,
) -> None:
    students = [MOBILE, resnet]
    provenance = {
        **run.provenance(),
        "budget": budget.__dict__,
        "cls_work": str(cls_work),
        "cls_fp32_runs_reused": cls_reused,
        "students": students,
        "balancer": f"gor, {GOR[DEFAULT_GOR]}",
        "first_last_bits": FIRST_LAST_BITS,
        "bench": {"threads": THREADS, "batches": BATCHES, "repeats": REPEATS[run.quick]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run.stem}.json").write_text(
        json.dumps(
            {
                **provenance,
                "fp32": fp32_scores(fp32),
                "records": records,
                "deployment": rows,
                "parity": parity,
                "kd_target_check": kd_check,
            },
            indent=2,
        )
        + "\n"
    )
    worst = min(parity, key=lambda p: p["agreement"])
    (RESULTS / f"{run.stem}.md").write_text(
        markdown_header(
            "Fashion-MNIST: a mobile student, distilled end to end", provenance, str(budget)
        )
        + f"Student: torchvision's MobileNetV2 (`model.name=tv:{MOBILE}`, untrained, 28 x 28 "
        f"inputs in one channel), beside the ResNet student `{resnet}` that `cls_fashion.py` "
        "picks, both through the same stages: FP32, then from that checkpoint PTQ (min-max), "
        f"plain QAT and QAT-EKD-GoR from both teachers ({', '.join(TEACHERS)}) with the default "
        f"balancer (GoR form `{GOR[DEFAULT_GOR][0].split('=')[1]}`), weights and activations at "
        f"the bit-width, first and last layers at {FIRST_LAST_BITS} bits. MobileNetV3-small is "
        "not the student: torchvision's BatchNorm momentum 0.01 leaves its running statistics "
        "unconverged on a short schedule (a 3-epoch probe on 6k images: 10 % validation top-1).\n\n"
        f"Teachers and FP32 ResNet students are `cls_fashion.py`'s own runs in `{cls_work}` "
        f"({cls_reused} of {len(TEACHERS) + len(STUDENTS)} were there already, the rest "
        "trained by this run).\n\n"
        "## Accuracy\n\n"
        f"Top-1 (%) of each run's best.pt (chosen on validation); test: mean ± std over "
        f"{budget.seeds} paired seed(s); val: mean.\n\n"
        f"{accuracy_table(records, fp32, students)}\n\n"
        f"{paired_lines(records, students)}\n\n"
        f"{balance_lines(records, students)}\n\n"
        f"{cls_page_note(run.quick, resnet)}"
        "## Deployment (seed 0)\n\n"
        "`qatkd export` and `qatkd bench` of each quantized student's best.pt. Parity: test "
        "top-1 of the trained fake-quantized PyTorch model and of the int8 ONNX in "
        "onnxruntime; top-1 agreement (%) of each int8 runtime with the exported PyTorch model "
        "(its biases aligned to the kernels' int32 grid, what the graph computes), and with the "
        "trained model (before that alignment: what a user compares with); of the trained "
        f"model with itself on the test images plus Gaussian noise of std {NOISE:g} (a quarter "
        "of a grey level): how much a rounding-sized change moves its predictions; the share of "
        "activation codes that differ from the PyTorch model's (onnxruntime, 512 "
        "images). Speed: FP32 latency / int8 latency of the same network in the same runtime "
        f"(median of {REPEATS[run.quick]} rounds, {THREADS} threads, round-robin in one "
        "process; above 1: int8 is faster), the int8 ONNX file, the integer kernels "
        "onnxruntime runs (QLinearConv, QLinearAdd, QGemm, ...) and the convolutions and "
        "matmuls it still runs in float.\n\n"
        f"{deployment_tables(rows)}\n\n"
        "## Sanity checks\n\n"
        f"Parity: {len(parity)} int8 runs of {len({p['run'] for p in parity})} exported "
        f"checkpoints (every seed); the lowest top-1 agreement is {worst['agreement']:.2f} % "
        f"({worst['run']}, {worst['backend']}).\n\n"
        f"{kd_check_text(kd_check)}\n"
    )
    print((RESULTS / f"{run.stem}.md").read_text())


if __name__ == "__main__":
    main()
