"""Where a benchmark's numbers come from: commit, command, machine, wall time. Shared by every
script, with the `--quick` / `--work` options the training benchmarks have in common."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from qatkd.machine import machine

S = TypeVar("S")
"""A benchmark's schedule type."""

__all__ = [
    "Invocation",
    "command",
    "default_work",
    "git_commit",
    "machine",
    "markdown_header",
    "start",
]


def git_commit() -> str:
    """The commit the benchmark ran on, flagged when the tree had uncommitted changes (other
    than result pages, which benchmarks write and which no benchmark runs)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", ":(top)", ":(top,exclude)benchmarks/results")
        return git("rev-parse", "--short", "HEAD") + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    """The command line, its script named from the repository root (where benchmarks run) however
    it was invoked."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parent.parent
    shown = str(script.relative_to(root)) if script.is_relative_to(root) else sys.argv[0]
    return "python " + " ".join(shlex.quote(a) for a in [shown, *sys.argv[1:]])


@dataclass(frozen=True)
class Invocation:
    """One run of a benchmark script: quick or full, the stem of its result files
    (`<name>` or `<name>_quick`), the folder its training runs go to, when it started, and how
    many finished runs that folder held then (reused, so not in the wall time)."""

    quick: bool
    stem: str
    work: Path
    commit: str
    started: float
    reused: int
    seeds: int | None = None
    """`--seeds`: fewer paired seeds than the schedule's, to save time (None: the schedule's)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The script's own options (`start`'s `options`), by their argparse names."""

    def schedule(self, quick: S, full: S) -> S:
        """The mode's schedule (a dataclass with `seeds`), with `--seeds` applied."""
        chosen = quick if self.quick else full
        return chosen if self.seeds is None else replace(chosen, seeds=self.seeds)

    def provenance(self) -> dict[str, Any]:
        """Commit, command, machine, wall time so far, the finished runs reused, and the training
        time summed over every run of the work folder (what a run from scratch trains), as the
        results JSON records them."""
        wall = round(time.time() - self.started, 1)
        runs = [json.loads(m.read_text()) for m in finished(self.work)]
        train = sum(r.get("train_seconds", 0.0) for r in runs)
        devices = sorted({r["device"] for r in runs if r.get("device", "cpu") != "cpu"})
        return {
            "commit": self.commit,
            "command": command(),
            "machine": machine(),
            "wall_s": wall,
            "runs_reused": self.reused,
            "train_s": round(train, 1),
            "gpus": devices,
        }


def finished(work: Path) -> list[Path]:
    """The metrics.json of every finished run in `work`."""
    return sorted(work.glob("*/metrics.json"))


def result_stem(name: str, quick: bool) -> str:
    """The stem of a benchmark's result files: `<name>` or `<name>_quick`."""
    return f"{name}_quick" if quick else name


def default_work(name: str, quick: bool) -> Path:
    """Where a benchmark's run folders go without `--work` (another benchmark reusing its runs
    finds them there)."""
    return Path("runs") / f"bench_{result_stem(name, quick)}"


def start(
    doc: str,
    name: str,
    quick_help: str,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Invocation:
    """Parse `--quick`, `--work` (default runs/bench_<stem>) and `--seeds`, and the script's own
    options where `options` adds them to the parser, and note the commit now: the tree may change
    while the run goes on."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--work", type=Path, help=f"run folders (default runs/bench_{name}[_quick])"
    )
    parser.add_argument(
        "--seeds", type=int, help="paired seeds to run (default: the schedule's); the page says"
    )
    common = set(vars(parser.parse_args([])))  # the options every script has
    if options is not None:
        options(parser)
    args = parser.parse_args()
    stem = result_stem(name, args.quick)
    work = args.work or default_work(name, args.quick)
    reused = len(finished(work))
    own = {k: v for k, v in vars(args).items() if k not in common}
    return Invocation(args.quick, stem, work, git_commit(), time.time(), reused, args.seeds, own)


def markdown_header(title: str, provenance: dict[str, Any], schedule: str) -> str:
    """The top of a results page: title, then where its numbers come from."""
    return (
        f"# {title}\n\n- commit: {provenance['commit']}\n"
        f"- command: `{provenance['command']}`\n- machine: {provenance['machine']}"
        f"{_gpu_note(provenance)}\n"
        f"- wall time: {provenance['wall_s'] / 60:.1f} min{_reuse_note(provenance)}\n"
        f"- schedule: {schedule}\n\n"
    )


def _gpu_note(provenance: dict[str, Any]) -> str:
    """The GPUs that trained some of the runs (their metrics.json name the device), if any."""
    gpus = provenance.get("gpus")
    return f"; runs trained on the GPU: {', '.join(gpus)}" if gpus else ""


def _reuse_note(provenance: dict[str, Any]) -> str:
    """How much of the work the wall time does not include (scripts without run folders: none)."""
    if not provenance.get("runs_reused"):
        return ""
    return (
        f" ({provenance['runs_reused']} finished runs reused from an earlier invocation; "
        f"training time of all runs: {provenance['train_s'] / 60:.1f} min)"
    )
