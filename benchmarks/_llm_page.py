"""The SmolLM2 page from its records: the table, the size/perplexity front and its plot, and
issue 30's targets computed from the rows.

A record is a dict: `grid` (the page's group: a grid's title, `FP` or `llama.cpp`), `model`,
`kind` (`fp`, `start`, `trained`, `peer`, `llama.cpp`), `ppl` and `agreement` (PyTorch's, or
llama.cpp's for a llama.cpp file), `ppl_llamacpp` (a GGUF student in llama.cpp), `bytes` (the
file a user deploys; None where unknown), `headline` (a headline student), and for trained rows
`tokens`, `tokens_per_s` and `wall_min`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _figures import plt, save_figure

Record = dict[str, Any]
MB = 1e6


def score(r: Record) -> float:
    """The perplexity a row is compared by: in llama.cpp where it was scored there."""
    return r.get("ppl_llamacpp") or r["ppl"]


def front(records: list[Record]) -> list[Record]:
    """The rows no other row beats at no larger size (lower perplexity, size not above), by
    size: the size/perplexity front."""
    sized = [r for r in records if r["bytes"]]
    on = [
        r for r in sized if not any(o["bytes"] <= r["bytes"] and score(o) < score(r) for o in sized)
    ]
    return sorted(on, key=lambda r: r["bytes"])


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(records: list[Record]) -> str:
    fp = next(r["ppl"] for r in records if r["kind"] == "fp")
    on_front = {id(r) for r in front(records)}
    lines = [
        "| grid | model | perplexity | × FP | in llama.cpp | agreement % | MB | training "
        "tokens | tokens/s | wall min | front |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        tokens = "-" if r.get("tokens") is None else f"{r['tokens']:,}"
        cells = [
            r["grid"],
            f"**{r['model']}**" if r.get("headline") else r["model"],
            _number(r["ppl"]),
            _number(score(r) / fp),
            _number(r.get("ppl_llamacpp")),
            _number(r["agreement"]),
            _number(r["bytes"] and r["bytes"] / MB, 1),
            tokens,
            _number(r.get("tokens_per_s"), 0),
            _number(r.get("wall_min"), 1),
            "yes" if id(r) in on_front else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


STYLES = {
    "fp": ("FP teacher", "black", "*", 60),
    "start": ("qatkd start (PTQ)", "tab:gray", "o", 20),
    "trained": ("qatkd student, method comparison", "lightsteelblue", "o", 20),
    "headline": ("qatkd headline student", "tab:blue", "o", 60),
    "peer": ("GPTQ / HQQ", "tab:orange", "s", 30),
    "llama.cpp": ("llama.cpp", "tab:green", "^", 30),
}


def _style(r: Record) -> str:
    return "headline" if r.get("headline") else r["kind"]


def plot(records: list[Record], path: Path, text: str) -> None:
    """Every sized row as perplexity against file size, the front as a line; the headline
    students, the peers and the front are named (the page's table names the rest)."""
    fig, ax = plt.subplots(figsize=(9, 6))
    line = front(records)
    named = {id(r) for r in line}
    for style, (name, color, marker, size) in STYLES.items():
        rows = [r for r in records if _style(r) == style and r["bytes"]]
        x, y = [r["bytes"] / MB for r in rows], [score(r) for r in rows]
        ax.scatter(x, y, c=color, marker=marker, label=name, s=size, zorder=3)
        for r in rows:
            if style in ("start", "trained") and id(r) not in named:
                continue
            label = r["model"] if style in ("fp", "llama.cpp") else f"{r['grid']} {r['model']}"
            ax.annotate(
                label,
                (r["bytes"] / MB, score(r)),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
    ax.step(
        [r["bytes"] / MB for r in line],
        [score(r) for r in line],
        where="post",
        color="tab:red",
        alpha=0.5,
        label="front (nothing as small or smaller is better)",
    )
    ax.set(xscale="log", yscale="log", xlabel="file size (MB)", ylabel=f"perplexity ({text} text)")
    ax.set_title("SmolLM2-135M: perplexity against size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


Target = tuple[str, float | None, str, float]
"""(what, measured or None when it could not be, '<=' or '>=', bound)."""


def targets(records: list[Record], fp: float) -> list[Target]:
    """Issue 30's targets for each headline student (each is a student a user could pick, so
    none is chosen on the test text): W4 g128 at most 1.10x FP; a GGUF student at most 1.05x FP
    in llama.cpp and below llama.cpp's own Q4_K_M at no larger size; W3 g128 at most 1.6x FP and
    below every 3-bit peer (GPTQ and HQQ on its grid, llama.cpp's Q3_K_M: the peers at its size;
    what is smaller and better shows in the front); at least 1M training tokens; on the
    front."""
    rows: list[Target] = []
    k_m = next((r for r in records if r["model"] == "Q4_K_M"), None)
    peers = [r for r in records if r["kind"] in ("peer", "llama.cpp")]
    on_front = {id(r) for r in front(records)}
    for r in (r for r in records if r.get("headline")):
        name = f"{r['grid']} {r['model']}"
        ratio = score(r) / fp
        if r["grid"].startswith("W4"):
            rows.append((f"{name}: perplexity / FP", ratio, "<=", 1.10))
        elif r["grid"].startswith("GGUF"):
            where = "llama.cpp" if r.get("ppl_llamacpp") else "PyTorch (llama.cpp missing)"
            rows.append((f"{name}: perplexity in {where} / FP", ratio, "<=", 1.05))
            rows.append(
                (
                    f"{name}: perplexity − llama.cpp Q4_K_M's",
                    None if k_m is None else score(r) - score(k_m),
                    "<=",
                    0.0,
                )
            )
            size = None if k_m is None else r["bytes"] / k_m["bytes"]
            rows.append((f"{name}: file size / llama.cpp Q4_K_M's", size, "<=", 1.0))
        elif r["grid"].startswith("W3"):
            rows.append((f"{name}: perplexity / FP", ratio, "<=", 1.6))
            at_size = [score(p) for p in peers if p["grid"] == r["grid"] or p["model"] == "Q3_K_M"]
            best = min(at_size) if at_size else None
            what = f"{name}: perplexity / best 3-bit peer's (GPTQ, HQQ, llama.cpp Q3_K_M)"
            rows.append((what, None if best is None else score(r) / best, "<=", 1.0))
        rows.append((f"{name}: training tokens (millions)", r["tokens"] / 1e6, ">=", 1.0))
        rows.append((f"{name}: on the front (1 = yes)", float(id(r) in on_front), ">=", 1.0))
    return rows


def targets_table(rows: list[Target]) -> tuple[str, list[dict[str, Any]]]:
    """The targets as a markdown table and as JSON records with `met` (None: not measured)."""
    checked = []
    lines = ["| what | measured | target | met |", "|---|---:|---|---|"]
    for what, value, op, bound in rows:
        met = (
            None
            if value is None or math.isnan(value)
            else (value <= bound if op == "<=" else value >= bound)
        )
        checked.append({"what": what, "measured": value, "target": f"{op} {bound:g}", "met": met})
        shown = "-" if value is None else f"{value:.3g}"
        verdict = {True: "yes", False: "**no**", None: "not measured"}[met]
        lines.append(f"| {what} | {shown} | {op} {bound:g} | {verdict} |")
    return "\n".join(lines), checked
