"""Mutation testing of the core modules with mutmut: how many small changes to the code (a `<`
turned into `<=`, a constant changed, an argument dropped) make a focused test selection fail.

    python benchmarks/mutation_report.py [--jobs N] [MODULE ...]      (what `make mutate` runs)

MODULE is one of the keys of `MODULES` below (default: all of them). Each module runs on its
own, in `.mutation/<module>/`: links to `src/`, `tests/` and the plugin that runs each mutant's
tests quickest first (`_mutation_order`), a copy of `pyproject.toml` with a `[tool.mutmut]`
section naming the files to mutate and the tests to run, and mutmut's `mutants/`
folder. A run that was stopped (a session's end, Ctrl-C) resumes where it stopped when the same
command runs again, but only while `src/`, `tests/` (the selected tests and every helper),
`pyproject.toml`, the test-order plugin, mutmut's version and the module's selection are the
same, byte for byte (`key.txt` holds their hash); anything else starts the module from
scratch. The whole `qatkd` package is copied into `mutants/` (the tests import all of it); only
the module's files are mutated. mutmut runs each mutant against the tests that called the
mutated function, in a forked worker.

Writes benchmarks/results/mutation.{md,json}. A run replaces the entries of the modules it ran
and keeps the others', each with its own commit and date; a module never run is listed as such.
A surviving mutant named in `_mutation_equivalent.EQUIVALENT` (with the mutated line it
expects) is reported with the reason it cannot be killed; every other survivor is a gap in the
tests. A resumed run does not run the mutants a note explains (reported as skipped, not killed).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

import _mutation_progress as progress
from _mutation_equivalent import EQUIVALENT
from _provenance import command, machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / ".mutation"
ORDER_PLUGIN = ROOT / "benchmarks" / "_mutation_order.py"
"""Runs each mutant's tests quickest first: linked into the work folder, and copied from there
into `mutants/`, the folder mutmut puts on the tests' path."""

TRAIN_TESTS = [
    "tests/test_engine.py",
    "tests/test_faults.py",
    "tests/test_learning.py",
    "tests/test_stops.py",
    "tests/test_logs.py",
    "tests/test_validation.py",
    "tests/test_tensorboard.py",
    "tests/test_check.py",
    "tests/test_distributed.py",
    "tests/balance/test_held_out.py",
    "tests/detection/test_detection_kd.py",
]
"""The tests of every part of `train/` (each runs the trainer; detection KD: the only runs with
trained KD parts, its feature adapters)."""

MODULES: dict[str, dict[str, list[str]]] = {
    "quant": {"mutate": ["src/qatkd/quant/*"], "tests": ["tests/quant"]},
    "balance": {"mutate": ["src/qatkd/balance/*"], "tests": ["tests/balance"]},
    "distill": {"mutate": ["src/qatkd/distill/*"], "tests": ["tests/distill"]},
    "train-engine": {
        "mutate": ["src/qatkd/train/engine.py"],
        "tests": TRAIN_TESTS,
    },
    "train-step": {
        "mutate": [f"src/qatkd/train/{f}.py" for f in ("step", "optim", "distributed", "held_out")],
        "tests": [
            *TRAIN_TESTS,
            "tests/test_optim.py",
            "tests/test_step_timing.py",
            "tests/test_device.py",
        ],
    },
    "train-logs": {
        "mutate": [
            f"src/qatkd/train/{f}.py"
            for f in ("logs", "plots", "tensorboard", "stops", "validation", "task")
        ],
        "tests": [*TRAIN_TESTS, "tests/test_plots.py"],
    },
    "export-codes": {
        "mutate": ["src/qatkd/export/codes.py", "src/qatkd/export/bias_grid.py"],
        "tests": ["tests/export"],
    },
    "export-graph": {
        "mutate": [
            f"src/qatkd/export/{f}.py"
            for f in ("onnx_graph", "onnx_registry", "onnx_fallback", "frozen")
        ],
        "tests": ["tests/export"],
    },
    "export-ops": {"mutate": ["src/qatkd/export/onnx_ops.py"], "tests": ["tests/export"]},
}
"""Module -> the files mutmut mutates (globs from the repository root) and the tests it runs.
The trainer and the exporter are three modules each (about 1,800 and 1,900 mutants, each run by
slow tests: hours per part), each resumable across sessions (`_mutation_progress`)."""


STATUSES = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped")


KEYED = ("src", "tests", "pyproject.toml", str(ORDER_PLUGIN.relative_to(ROOT)))
"""What a module's verdicts depend on in the repository (`content_key`)."""
SOURCES_KEYED = ("src", "pyproject.toml")
"""What its mutants and the code under test depend on (with the files mutated): with these
unchanged and the tests or their selection changed, the killed verdicts of a stopped run still
hold for the mutants they name."""


def mutmut_config(spec: dict[str, list[str]]) -> str:
    """The `[tool.mutmut]` section for one module (TOML arrays of strings are JSON arrays)."""
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src/qatkd"]\n'
        f"only_mutate = {json.dumps(spec['mutate'])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(spec['tests'])}\n"
        f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "{ORDER_PLUGIN.stem}"]\n'
        f'also_copy = ["{ORDER_PLUGIN.name}"]\n'
        # torch is not fork-safe once it has run: fork the workers from a clean server process
        'process_isolation = "forkserver"\n'
        # the tests' output in mutmut.log: a failing clean run says which test and why
        "debug = true\n"
    )


def tested_commit() -> str:
    """The commit whose sources and tests were mutated, flagged where they (not the benchmark
    scripts, which a run from an older commit's worktree may take from a newer one) differ."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", *KEYED)
    return git("rev-parse", "--short", "HEAD") + (" (uncommitted changes)" if dirty else "")


def content_key(spec: dict[str, list[str]], paths: tuple[str, ...] = KEYED) -> str:
    """Hash of everything a module's verdicts depend on: the tracked files under `paths` (`src/`,
    `tests/`, `pyproject.toml`, the test-order plugin) as they are on disk, but for the test
    modules outside the module's selection (`counts_in_key`), mutmut's version, the selection
    and, with its tests, the `[tool.mutmut]` section the run takes."""
    settings = [mutmut_config(spec)] if "tests" in spec else []  # what the verdicts ran under
    digest = hashlib.sha256(json.dumps([version("mutmut"), spec, *settings]).encode())
    for name in sorted(tracked_files(paths)):
        path = ROOT / name
        if path.is_file() and counts_in_key(name, spec):  # a deleted file is simply absent
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def tracked_files(paths: tuple[str, ...]) -> list[str]:
    """The files git tracks under `paths`, relative to the repository root."""
    listed = subprocess.run(
        ["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return listed.stdout.split()


def counts_in_key(name: str, spec: dict[str, list[str]]) -> bool:
    """Whether the verdicts of `spec`'s module depend on the repository file `name`: every file
    but the test modules outside its selection, which never run (a test added elsewhere then
    costs a stopped run none of its verdicts); the tests' helpers and conftests count, and
    without a selection every test does."""
    path = PurePosixPath(name)
    is_test_module = path.parts[0] == "tests" and path.name.startswith("test_")
    if not is_test_module or path.suffix != ".py" or "tests" not in spec:
        return True
    selected = [PurePosixPath(t.split("::")[0]) for t in spec["tests"]]
    return any(path == t or t in path.parents for t in selected)


def prepare_work(name: str, spec: dict[str, list[str]], key: str) -> tuple[Path, float | None]:
    """The module's work folder, and the wall seconds an earlier, stopped run of the same
    content (`key`) already spent there (None for a fresh folder)."""
    work = WORK / name
    stamp, spent = work / "key.txt", work / "wall_s.txt"
    if stamp.exists() and stamp.read_text() == key and (work / "mutants").is_dir():
        print(f"mutmut: {name}: resuming the stopped run in {work}")
        return work, float(spent.read_text()) if spent.exists() else 0.0
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "src").symlink_to(ROOT / "src")
    (work / "tests").symlink_to(ROOT / "tests")
    (work / ORDER_PLUGIN.name).symlink_to(ORDER_PLUGIN)
    pyproject = (ROOT / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(pyproject + mutmut_config(spec))
    stamp.write_text(key)
    return work, None


def run_module(name: str, jobs: int) -> dict[str, Any]:
    """Run mutmut over one module (resuming a stopped run of the same content, from its work
    folder or from its committed progress); its counts, score and surviving mutants."""
    spec = MODULES[name]
    keys = progress.Keys(content_key(spec), content_key({"mutate": spec["mutate"]}, SOURCES_KEYED))
    work, spent = prepare_work(name, spec, keys.content)
    started = time.time()
    print(f"mutmut: {name} ({', '.join(spec['mutate'])}; tests {' '.join(spec['tests'])})")
    carried = progress.carried(name) if spent is not None else []
    if spent is None:
        saved = progress.load(name, keys)
        spent, carried = resume(name, work, saved, jobs) if saved else (0.0, [])

    def wall() -> float:
        return round(spent + time.time() - started, 1)

    # a resumed run (its mutants made) does not run the undecided mutants a note explains
    skipped = progress.skip(work, explained(progress.undecided(work), diffs_in(work)))
    if skipped:
        print(f"mutmut: {name}: {skipped} mutants a note explains are not run (skipped)")
    try:
        commit = tested_commit().split()[0]
        with progress.saving(name, keys, commit, work, wall, carried):
            rc = mutmut(work, jobs)
    finally:
        (work / "wall_s.txt").write_text(str(wall()))
    if rc != 0:
        raise stopped(
            work, f"mutmut stopped on {name} (exit {rc}); run the same command again to resume"
        )
    return {"wall_s": wall(), "carried_from": carried, **collect(work, spec)}


def mutmut(work: Path, jobs: int, *mutants: str) -> int:
    """`mutmut run` in `work` (only `mutants` if given), its output appended to mutmut.log."""
    # mutmut puts mutants/src first on sys.path and drops src/; PYTHONPATH must not bring it back
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with (work / "mutmut.log").open("a") as out:
        return subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *mutants],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode


def stopped(work: Path, message: str) -> SystemExit:
    """`message` and the end of mutmut's log in `work`, to exit with."""
    log = work / "mutmut.log"
    return SystemExit(f"{message}. The end of {log}:\n{log.read_text(errors='replace')[-3000:]}")


def resume(name: str, work: Path, saved: dict[str, Any], jobs: int) -> tuple[float, list[str]]:
    """Put the committed verdicts of `saved` into the fresh work folder (where the tests have
    changed since, only the killed ones and the survivors a note explains), once one of them is
    found again live (mutmut generates the mutants and tests that one); the wall seconds they
    took and the commits whose verdicts they carry, or (0, []) where they are not used."""
    verdicts = saved["verdicts"]
    if saved["reuse"] == "killed":
        verdicts = progress.with_status(verdicts, ("killed", "timeout"))
    check = progress.probe(verdicts)
    if check is None:
        return 0.0, []
    mutant, status = check
    rc = mutmut(work, jobs, mutant)
    if rc != 0:  # nothing was learnt about the saved verdicts: keep them for the next try
        error = stopped(
            work,
            f"mutmut stopped on {name} (exit {rc}) while testing a saved verdict again; "
            f"{progress.PROGRESS.name}/{name}.json is kept",
        )
        # the next run must start from a fresh folder again, or it would resume this one,
        # which holds none of the saved verdicts, and save it over them
        shutil.rmtree(work / "mutants")
        raise error
    live = progress.status_of(work, mutant)
    if live != status:
        print(
            f"mutmut: {name}: the saved verdict on {mutant} ({status}) is {live} when tested "
            "again: the saved verdicts are not used"
        )
        return 0.0, []
    if saved["reuse"] == "killed":
        survivors = progress.with_status(saved["verdicts"], ("survived",))
        restored = progress.restore(work, explained(survivors, diffs_in(work)))
        print(f"mutmut: {name}: {restored} survivors a note explains are not tested again")
    restored = progress.restore(work, verdicts)
    print(
        f"mutmut: {name}: {restored} verdicts restored from {progress.PROGRESS.name}/{name}.json "
        f"(commit {saved['commit']}); {mutant} tested again: {status}, as saved"
    )
    carried = saved["carried_from"] + ([saved["commit"]] if saved["reuse"] == "killed" else [])
    return float(saved["wall_s"]), sorted(set(carried))


def diffs_in(work: Path) -> Callable[[str, str], str]:
    """`diff(mutant, source file)` of the mutants mutmut made in `work`."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    def diff(mutant: str, source: str) -> str:
        with contextlib.chdir(work):  # where mutmut finds the mutants' sources
            return get_diff_for_mutant(mutant, path=source)

    return diff


def explained(
    survivors: progress.Verdicts, diff_of: Callable[[str, str], str]
) -> progress.Verdicts:
    """The mutants of `survivors` that a note explains; `diff_of(mutant, source file)` gives a
    mutant's diff."""
    return {
        source: {
            mutant: code
            for mutant, code in codes.items()
            # a diff costs a parse of the source file: only a mutant with a note needs one
            if mutant in EQUIVALENT
            and survivor(mutant, "survived", diff_of(mutant, source))["equivalent"]
        }
        for source, codes in survivors.items()
    }


def collect(work: Path, spec: dict[str, list[str]]) -> dict[str, Any]:
    """Counts and survivors from mutmut's `mutants/*.meta` files, read in `work`."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    counts = dict.fromkeys(STATUSES, 0)
    files: dict[str, dict[str, int]] = {}
    survivors = []
    cwd = Path.cwd()
    os.chdir(work)
    try:
        for meta in sorted(Path("mutants/src").rglob("*.py.meta")):
            source = str(meta.relative_to("mutants"))[: -len(".meta")]
            exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
            file_counts = dict.fromkeys(STATUSES, 0)
            for key, exit_code in exit_codes.items():
                status = status_by_exit_code[exit_code]
                if status == "not checked":
                    raise SystemExit(f"{key} was not checked: the run did not finish")
                file_counts[status] = file_counts.get(status, 0) + 1
                if status not in ("killed", "timeout"):
                    survivors.append(survivor(key, status, get_diff_for_mutant(key, path=source)))
            if exit_codes:
                files[source] = {"mutants": len(exit_codes), **file_counts}
                for status, n in file_counts.items():
                    counts[status] = counts.get(status, 0) + n
    finally:
        os.chdir(cwd)
    total = sum(counts.values())
    return {
        "mutate": spec["mutate"],
        "tests": spec["tests"],
        "mutants": total,
        **counts,
        "score": round((counts["killed"] + counts["timeout"]) / total, 4) if total else None,
        "files": files,
        "survivors": survivors,
    }


def changed_lines(diff: str) -> list[str]:
    """The lines a mutant's diff writes, stripped."""
    return [
        line[1:].strip()
        for line in diff.splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]


def survivor(key: str, status: str, diff: str) -> dict[str, Any]:
    """One mutant that no test caught: its diff, and the reason it is equivalent if known."""
    line, reason = EQUIVALENT.get(key, ("", ""))
    # a note holds only while the mutant (numbered per function) still makes the same change
    equivalent = reason if reason and line in changed_lines(diff) else None
    return {"mutant": key, "status": status, "diff": diff, "equivalent": equivalent}


def renumbered_notes(survivors: list[dict[str, Any]]) -> list[str]:
    """Notes that may have moved: mutmut numbers a function's mutants in order, so a change to
    the function renumbers them and a note no longer finds its mutant. For each survivor left
    unexplained, the unused notes of its function that expect the change it makes: candidates
    to check (`mutmut show`) and renumber by hand, never applied here (a function often has
    several mutants that write the same line)."""
    used = {s["mutant"] for s in survivors if s["equivalent"]}
    hints = []
    for s in survivors:
        if s["equivalent"]:
            continue
        function = s["mutant"].rpartition("__mutmut_")[0]
        changed = changed_lines(s["diff"])
        hints += [
            f"{s['mutant']} writes the line of the note on {key}: {line}"
            for key, (line, _) in EQUIVALENT.items()
            if key not in used and key.rpartition("__mutmut_")[0] == function and line in changed
        ]
    return hints


def print_renumbered(results: dict[str, Any]) -> None:
    for entry in results["modules"].values():
        for hint in renumbered_notes(entry["survivors"]):
            print(f"note moved? {hint}")


def write_report(results: dict[str, Any]) -> None:
    (RESULTS / "mutation.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "# Mutation testing of the core modules",
        "",
        f"Written by `make mutate` (benchmarks/mutation_report.py), mutmut {results['mutmut']}.",
        "Each module's row names the commit and date of its own run, its section the command.",
        "A mutant is *killed* when a test fails on it, a *timeout* when the tests ran past",
        "mutmut's limit (caught too); the score is (killed + timeouts) / mutants. *Other*: no",
        "test of the selection calls the mutated function, mutmut found the result suspicious,",
        "or a note explains the mutant and a resumed run did not run it (skipped).",
        "Not in CI (too slow); the target is 80 % per module.",
        "",
        "| module | mutated | tests | mutants | killed | survived | timeouts | other | score "
        "| wall | commit | date |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, spec in MODULES.items():
        entry = results["modules"].get(name)
        mutated = ", ".join(f"`{p.removeprefix('src/qatkd/')}`" for p in spec["mutate"])
        tests = ", ".join(f"`{t}`" for t in (entry or spec)["tests"])
        if entry is None:
            lines.append(f"| {name} | {mutated} | {tests} | not run yet |  |  |  |  |  |  |  |  |")
            continue
        other = sum(entry[s] for s in STATUSES if s not in ("killed", "survived", "timeout"))
        lines.append(
            f"| {name} | {mutated} | {tests} | {entry['mutants']} | {entry['killed']} "
            f"| {entry['survived']} | {entry['timeout']} | {other} | {percent(entry['score'])} "
            f"| {entry['wall_s'] / 60:.1f} min | {entry['commit']} | {entry['date']} |"
        )
    not_run = [name for name in MODULES if name not in results["modules"]]
    if not_run:
        lines += ["", f"**Not run yet: {', '.join(not_run)}.**"]
    lines += ["", f"Machine of the latest run: {results['machine']}.", ""]
    for name, entry in results["modules"].items():
        lines += module_section(name, entry)
    (RESULTS / "mutation.md").write_text("\n".join(lines).rstrip() + "\n")


def module_section(name: str, entry: dict[str, Any]) -> list[str]:
    lines = [
        f"## {name}",
        "",
        f"- command: `{entry['command']}` ({entry['jobs']} mutant(s) at a time)",
        f"- commit {entry['commit']}, {entry['date']}, wall time {entry['wall_s'] / 60:.1f} min",
    ]
    if entry.get("carried_from"):
        lines.append(
            f"- killed verdicts, and survivors a note explains, carried from commit "
            f"{', '.join(entry['carried_from'])}: the same sources and mutants, the tests "
            "changed since; every other verdict is this commit's"
        )
    lines += [
        "",
        "| file | mutants | killed | survived | timeouts | other |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, c in entry["files"].items():
        other = c["mutants"] - c["killed"] - c["survived"] - c["timeout"]
        lines.append(
            f"| `{path}` | {c['mutants']} | {c['killed']} | {c['survived']} | {c['timeout']} "
            f"| {other} |"
        )
    lines.append("")
    gaps = [s for s in entry["survivors"] if not s["equivalent"]]
    equivalent = [s for s in entry["survivors"] if s["equivalent"]]
    if not entry["survivors"]:
        return [*lines, "Every mutant was caught.", ""]
    if equivalent:
        lines += [
            "Surviving mutants explained: equivalent to the original, or (where the reason says",
            "so) told apart only on a GPU, which these tests do not use:",
            "",
        ]
        for s in equivalent:
            run = " (not run: resumed, the note explains it)" if s["status"] == "skipped" else ""
            lines += [f"- `{s['mutant']}`{run}: {s['equivalent']}", "", *diff_block(s["diff"]), ""]
    if gaps:
        lines += [f"Surviving mutants not yet explained ({len(gaps)}): gaps in the tests.", ""]
        for s in gaps:
            lines += [f"- `{s['mutant']}` ({s['status']})", "", *diff_block(s["diff"]), ""]
    return lines


def diff_block(diff: str) -> list[str]:
    """The changed lines of a mutant's diff, as a fenced block (the hunk headers dropped)."""
    body = [
        line
        for line in diff.splitlines()
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]
    return ["  ```diff", *(f"  {line}" for line in body), "  ```"]


def percent(score: float | None) -> str:
    return "-" if score is None else f"{score:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite mutation.md from mutation.json, with the current EQUIVALENT notes",
    )
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    path = RESULTS / "mutation.json"
    results = json.loads(path.read_text()) if path.exists() else {"modules": {}}
    for entry in results["modules"].values():  # the modules not run now: today's notes too
        entry["survivors"] = [
            survivor(s["mutant"], s["status"], s["diff"]) for s in entry["survivors"]
        ]
    if args.render:
        write_report(results)
        print_renumbered(results)
        return
    commit = tested_commit()
    results |= {"mutmut": version("mutmut"), "machine": machine()}
    for name in args.modules or list(MODULES):
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        entry = {
            "commit": commit,
            "date": date,
            "command": command(),
            "jobs": args.jobs,
            **run_module(name, args.jobs),
        }
        results["modules"][name] = entry
        results["modules"] = {m: results["modules"][m] for m in MODULES if m in results["modules"]}
        write_report(results)  # after each module: a later failure keeps the finished ones
        print(
            f"  {entry['mutants']} mutants, {entry['killed']} killed, {entry['survived']} "
            f"survived, {entry['timeout']} timeouts: {percent(entry['score'])} in "
            f"{entry['wall_s'] / 60:.1f} min"
        )
    print_renumbered(results)


if __name__ == "__main__":
    main()
