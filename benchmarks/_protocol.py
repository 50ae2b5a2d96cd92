"""The comparison protocol of the GoR benchmarks: every method trained on the same seeds, fixed α
on a grid picked on validation (the test-set pick shown too, as an oracle), GoR's forms in one run
each, and differences taken seed by seed. A record is a dict with method, bits, seed, and the
`val` and `test` scores of the run's best.pt (PTQ: `val` is None)."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from _seeds import Stat, cell

from qatkd.reuse import run_or_reuse
from qatkd.train.stops import RunStopped

ALPHAS = ("0.1", "0.3", "0.5", "0.7", "0.9")
HELDOUT = "gor_heldout"
HELDOUT_FORMS = (HELDOUT, f"{HELDOUT}_normalized")
"""The held-out form and its normalised variant, whose targets (issue 29) every GoR page checks."""
GOR = {
    "gor_liebel": ["balancer.form=liebel"],
    "gor_kendall": ["balancer.form=kendall"],
    "gor_liebel_initial": ["balancer.form=liebel", "balancer.scale=initial"],
    "gor_liebel_running": ["balancer.form=liebel", "balancer.scale=running"],
    "gor_liebel_normalized": ["balancer.form=liebel", "balancer.normalize=true"],
    "gor_kendall_normalized": ["balancer.form=kendall", "balancer.normalize=true"],
    HELDOUT: ["balancer.form=heldout"],
    HELDOUT_FORMS[1]: ["balancer.form=heldout", "balancer.normalize=true"],
}
"""GoR's forms, its scale-aware variants, the held-out form that weighs each loss by its use, and
each form with its weights normalised to sum to 1 (the balancer sets the ratio, train.lr the
step, as for plain QAT and fixed α); `DEFAULT_GOR` is the configuration default."""
DEFAULT_GOR = "gor_kendall"
EKD_GOR = "gor_liebel"
"""EKD-GoR's form, named so that a change of the default does not silently reuse its runs."""
VAL_PICK, ORACLE = "kd_fixed_val_pick", "kd_fixed_oracle"
TABLE_METHODS = (
    "ptq",
    "qat",
    *(f"kd_fixed_{a}" for a in ALPHAS),
    VAL_PICK,
    ORACLE,
    *GOR,
    "ekd_gor",
)
"""The rows of a results table, in order."""


def trained(run_dir: Path, command: str, overrides: list[str]) -> dict[str, Any]:
    """`run_or_reuse`, refusing a run whose validation images one of its teachers or its
    `model.init` trained on: what it picks on validation would be picked on training images. A
    stop signal ends the benchmark in one line; run again, it resumes the stopped run."""
    try:
        metrics = run_or_reuse(run_dir, command, overrides)
    except RunStopped as stopped:  # a signal: the run saved its place, the benchmark resumes it
        print(f"{stopped}; run the same benchmark command again to continue", file=sys.stderr)
        raise SystemExit(stopped.exit_status) from None
    for model, verdict in metrics.get("validation_independence", {}).items():
        if verdict != "independent":
            raise SystemExit(f"{run_dir}: {model}: {verdict}; validation must be independent")
    return metrics


def method_overrides(one_teacher: str, ensemble: str) -> dict[str, list[str]]:
    """Each trained method's overrides, given the `teachers=[...]` of the KD teacher and of the
    ensemble: plain QAT, the fixed-α grid, GoR's forms, and EKD-GoR."""
    return {
        "qat": ["balancer.name=ts_only"],
        **{
            f"kd_fixed_{a}": [one_teacher, "balancer.name=fixed", f"balancer.alpha={a}"]
            for a in ALPHAS
        },
        **{name: [one_teacher, "balancer.name=gor", *form] for name, form in GOR.items()},
        "ekd_gor": [ensemble, "balancer.name=gor", *GOR[EKD_GOR]],
    }


def label(method: str) -> str:
    return {
        VAL_PICK: "kd fixed α, picked on validation",
        ORACLE: "kd fixed α, picked on test (**oracle**)",
    }.get(method, method)


def runs_needed(method: str) -> int:
    """Training runs a user needs for the row: one per grid point for a picked fixed α."""
    return len(ALPHAS) if method in (VAL_PICK, ORACLE) else 1


def fixed_alpha_picks(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (bits, seed), the fixed-α run picked on validation and the one picked on test (the
    oracle), as records of their own."""
    grids: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if r["method"].startswith("kd_fixed_"):
            grids.setdefault((r["bits"], r["seed"]), []).append(r)
    picks = []
    for grid in grids.values():
        by_val = max(grid, key=lambda r: r["val"])
        by_test = max(grid, key=lambda r: r["test"])
        picks += [
            {**by_val, "method": VAL_PICK, "alpha": by_val["method"].removeprefix("kd_fixed_")},
            {**by_test, "method": ORACLE, "alpha": by_test["method"].removeprefix("kd_fixed_")},
        ]
    return picks


def paired(records: list[dict[str, Any]], method: str, baseline: str, bits: str) -> Stat:
    """Mean, std and count of test(method) − test(baseline) over the seeds both ran."""
    test = {(r["method"], r["seed"]): r["test"] for r in records if r["bits"] == bits}
    diffs = [
        test[(method, seed)] - test[(baseline, seed)]
        for (m, seed) in test
        if m == method and (baseline, seed) in test
    ]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return statistics.mean(diffs), std, len(diffs)


def gor_by_validation(records: list[dict[str, Any]]) -> str:
    """The GoR form with the best mean validation score over every bit-width and seed."""
    return max(GOR, key=lambda m: statistics.mean(r["val"] for r in records if r["method"] == m))


def paired_table(records: list[dict[str, Any]], bits: tuple[str, ...], metric: str) -> str:
    """GoR's forms and EKD-GoR against the validation-picked fixed α and against plain QAT."""
    lines = [
        f"| test {metric} difference, same seeds | " + " | ".join(bits) + " |",
        "|---|" + "---:|" * len(bits),
    ]
    for method in (*GOR, "ekd_gor"):
        for baseline, name in ((VAL_PICK, "fixed α (validation pick)"), ("qat", "QAT")):
            diffs = [paired(records, method, baseline, b) for b in bits]
            lines.append(f"| {method} − {name} | " + " | ".join(cell(d) for d in diffs) + " |")
    return "\n".join(lines)


def balance_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a run's balancer ended with (`final_w_ts`, `final_w_kd`, and the heldout form's
    `final_align_*`) and its seconds per training step (the epoch-end evaluations taken out
    where the run recorded them), for `balance_table`."""
    steps = metrics.get("steps")
    training = metrics.get("train_seconds", 0.0) - metrics.get("eval_seconds", 0.0)
    return {
        "final": {k: v for k, v in metrics.items() if k.startswith("final_")},
        "seconds_per_step": training / steps if steps else None,
    }


def balance_table(records: list[dict[str, Any]], bits: tuple[str, ...]) -> str:
    """Per GoR method and bit-width, the means over the seeds of the weights it ended with, the
    alignments it measured (form heldout), and its step time relative to the default GoR's (from
    the runs' own training time: a controlled timing it is not): what explains a form's score,
    and what it costs."""
    lines = [
        "| method | bits | w_ts | w_kd | w_kd / w_ts | align_ts | align_kd | step time / "
        f"{DEFAULT_GOR}'s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in bits:
        runs = {
            method: [r for r in records if r["method"] == method and r["bits"] == b]
            for method in (*GOR, "ekd_gor")
        }
        reference = mean_present(r["seconds_per_step"] for r in runs[DEFAULT_GOR])
        for method, rows in runs.items():
            w_ts, w_kd, a_ts, a_kd = (
                mean_present(r["final"].get(f"final_{key}") for r in rows)
                for key in ("w_ts", "w_kd", "align_ts", "align_kd")
            )
            step = mean_present(r["seconds_per_step"] for r in rows)
            cells = [
                w_ts,
                w_kd,
                w_kd / w_ts if w_ts and w_kd is not None else None,
                a_ts,
                a_kd,
            ]
            ratio = f"{step / reference:.2f}" if step and reference else "-"
            shown = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
            lines.append(f"| {method} | {b} | {shown} | {ratio} |")
    return "\n".join(lines)


def heldout_target_rows(
    records: list[dict[str, Any]], bits: tuple[str, ...], metric: str
) -> list[tuple[str, float, str]]:
    """(what, measured, target): each held-out form never worse than plain QAT or the
    validation-picked fixed α by more than 0.1 in a cell, at most 1.3x the default GoR's step."""
    rows = []
    for b in bits:
        steps = {
            method: mean_present(
                r["seconds_per_step"] for r in records if r["method"] == method and r["bits"] == b
            )
            for method in (*HELDOUT_FORMS, DEFAULT_GOR)
        }
        for form in HELDOUT_FORMS:
            for baseline, name in (("qat", "QAT"), (VAL_PICK, "fixed α (validation pick)")):
                gain = paired(records, form, baseline, b)[0]
                rows.append((f"{b}: {form} − {name}, {metric}", gain, ">= -0.1"))
            if steps[form] and steps[DEFAULT_GOR]:
                what = f"{b}: {form} step / {DEFAULT_GOR} step (the runs' own time)"
                rows.append((what, steps[form] / steps[DEFAULT_GOR], "<= 1.3"))
    return rows


def mean_present(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are there, or None when none is."""
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def targets_table(rows: list[tuple[str, float, str]]) -> tuple[str, list[dict[str, Any]]]:
    """`(what, measured, target)` rows, the target as '>= x' or '<= x', as a markdown table and
    as JSON records with `met` computed."""
    checked = []
    for what, value, goal in rows:
        sign, bound = goal.split()
        met = value >= float(bound) if sign == ">=" else value <= float(bound)
        checked.append({"what": what, "measured": value, "target": goal, "met": met})
    lines = ["| what | measured | target | met |", "|---|---:|---|---|"]
    for t in checked:
        met = "yes" if t["met"] else "**no**"
        lines.append(f"| {t['what']} | {t['measured']:+.2f} | {t['target']} | {met} |")
    return "\n".join(lines), checked
