"""Which GoR form should be the default? The evidence of the classification and detection
benchmarks, on validation only.

    python benchmarks/gor_default.py

Reads benchmarks/results/cls_fashion.json and det_fashion.json (the full runs; no training). In
each (task, bit-width) cell the GoR forms are ranked by their mean validation score over the
paired seeds; the default is the form with the best mean rank over the cells, ties broken by the
better worst rank. The test scores are shown beside, for the record, and take no part in the
choice. Writes benchmarks/results/gor_default.{md,json}.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from _protocol import DEFAULT_GOR, GOR, VAL_PICK
from _provenance import command, git_commit

RESULTS = Path(__file__).parent / "results"
SOURCES = {"classification": "cls_fashion", "detection": "det_fashion"}


def cells() -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(task, bits) -> the records of that cell, from every source's results."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for task, stem in SOURCES.items():
        path = RESULTS / f"{stem}.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run benchmarks/{stem}.py first")
        for r in json.loads(path.read_text())["records"]:
            found.setdefault((task, r["bits"]), []).append(r)
    return found


def mean_of(records: list[dict[str, Any]], method: str, key: str) -> float:
    return statistics.mean(r[key] for r in records if r["method"] == method)


def rank(found: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per GoR form: its validation score and rank in each cell, mean and worst rank."""
    table: dict[str, dict[str, Any]] = {form: {"cells": {}} for form in GOR}
    for (task, bits), records in found.items():
        scores = {form: mean_of(records, form, "val") for form in GOR}
        ordered = sorted(GOR, key=lambda f: -scores[f])
        for form in GOR:
            table[form]["cells"][f"{task} {bits}"] = {
                "val": round(scores[form], 3),
                "val_minus_val_picked_alpha": round(
                    scores[form] - mean_of(records, VAL_PICK, "val"), 3
                ),
                "rank": ordered.index(form) + 1,
                "test": round(mean_of(records, form, "test"), 3),
            }
    for entry in table.values():
        ranks = [c["rank"] for c in entry["cells"].values()]
        entry["mean_rank"], entry["worst_rank"] = statistics.mean(ranks), max(ranks)
    return table


def main() -> None:
    table = rank(cells())
    chosen = min(GOR, key=lambda f: (table[f]["mean_rank"], table[f]["worst_rank"]))
    names = list(next(iter(table.values()))["cells"])
    lines = [
        "| GoR form | "
        + " | ".join(f"{n}: val (rank)" for n in names)
        + " | mean rank | worst rank | "
        + " | ".join(f"{n}: test" for n in names)
        + " |",
        "|---|" + "---:|" * (2 * len(names) + 2),
    ]
    for form, entry in table.items():
        shown = f"**{form}**" if form == chosen else form
        vals = " | ".join(
            f"{entry['cells'][n]['val']:.2f} ({entry['cells'][n]['rank']})" for n in names
        )
        tests = " | ".join(f"{entry['cells'][n]['test']:.2f}" for n in names)
        lines.append(
            f"| {shown} | {vals} | {entry['mean_rank']:.2f} | {entry['worst_rank']} | {tests} |"
        )
    provenance = {"commit": git_commit(), "command": command()}
    (RESULTS / "gor_default.json").write_text(
        json.dumps(
            {**provenance, "chosen": chosen, "configured_default": DEFAULT_GOR, "forms": table},
            indent=2,
        )
        + "\n"
    )
    agrees = "is the same" if chosen == DEFAULT_GOR else f"is not (it is {DEFAULT_GOR})"
    (RESULTS / "gor_default.md").write_text(
        "# The default GoR form, chosen on validation\n\n"
        f"- commit: {provenance['commit']}\n- command: `{provenance['command']}`\n"
        f"- sources: {', '.join(f'{s}.json' for s in SOURCES.values())} (full runs)\n\n"
        "Validation score (top-1 % or mAP@0.5 %) of each GoR form, mean over the paired seeds, "
        "and its rank among the forms in each cell; the default is the best mean rank (ties: "
        "the better worst rank). Test scores are for the record only.\n\n"
        + "\n".join(lines)
        + f"\n\nChosen: **{chosen}**; the configuration default {agrees}.\n"
    )
    print((RESULTS / "gor_default.md").read_text())


if __name__ == "__main__":
    main()
