"""The verdicts of a mutation run, kept where git keeps them, so that a later session resumes a
stopped run on any machine (a module of the trainer or the exporter takes longer than a
session, and mutmut's own work folder lives only on the machine that made it), and tests only
the survivors of a finished one again once tests are added for them.

    benchmarks/results/mutation_progress/<module>.json
        {"key": ..., "source_key": ..., "commit": ..., "wall_s": ..., "carried_from": [...],
         "verdicts": {source file: {mutant: exit code}}}

`key` is the module's content key (`mutation_report.content_key`: the sources, the selected
tests and the tests' helpers, pyproject.toml, the test-order plugin, mutmut's version and the
selection): with the same key every verdict is reused.
`source_key` leaves the tests out: where only the tests changed (a session adds tests for the
survivors it has seen), the mutants are the same and their killed verdicts still hold, so those
are reused, as are the survivors a note explains (`_mutation_equivalent`: a new test can only
kill one, so keeping it survived can only understate the score), and the other survivors are
tested again; the commit they were found on is listed in `carried_from`, which the report
shows. Reuse is checked against the live computation once: one
reused verdict is tested again first, and a different answer discards them all. A resumed run
does not run the mutants a note explains that have no verdict yet either: they are `skipped`,
counted as not killed, which can only understate the score (a survivor costs every test of its
function, the longest runs of a module). The file is
written every few minutes while mutmut runs, and kept when the module finishes (its results are
then in mutation.json too)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

PROGRESS = Path(__file__).resolve().parent / "results" / "mutation_progress"
SAVE_EVERY_S = 300.0
"""How often the verdicts are saved while mutmut runs (a session's end kills it unannounced)."""

Verdicts = dict[str, dict[str, int]]
"""Source file (as in `mutants/`) -> mutant name -> mutmut's exit code."""
SKIPPED = 34
"""mutmut's exit code for a mutant it was told not to run (status `skipped`)."""


class Keys(NamedTuple):
    """A module's content key (sources and tests) and its sources-only key."""

    content: str
    sources: str


def _path(module: str) -> Path:
    return PROGRESS / f"{module}.json"


def _read(module: str) -> dict[str, Any] | None:
    path = _path(module)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        missing = {"key", "source_key", "commit", "wall_s", "carried_from", "verdicts"}
        missing -= set(saved)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))}")
    except (ValueError, TypeError) as e:
        print(f"mutmut: {module}: ignoring unreadable {path} ({e})")
        return None
    return saved


def load(module: str, keys: Keys) -> dict[str, Any] | None:
    """The saved progress of `module`, with `reuse`: "all" where it was made on the same
    content, "killed" where only the tests differ (the killed verdicts, and the survivors a note
    explains); None (saying why) where the sources do."""
    saved = _read(module)
    if saved is None:
        return None
    if saved["key"] == keys.content:
        return saved | {"reuse": "all"}
    if saved["source_key"] == keys.sources:
        print(
            f"mutmut: {module}: the tests changed since commit {saved['commit']}: its killed "
            "verdicts and the survivors a note explains are reused, its other survivors tested "
            "again"
        )
        return saved | {"reuse": "killed"}
    print(
        f"mutmut: {module}: {_path(module)} holds verdicts for other sources (commit "
        f"{saved['commit']}): starting from scratch. To resume it instead, run this command in "
        f"a worktree at that commit (git worktree add DIR {saved['commit']})."
    )
    return None


def carried(module: str) -> list[str]:
    """The commits whose killed verdicts the saved progress of `module` carries."""
    saved = _read(module)
    return [] if saved is None else list(saved["carried_from"])


def _codes_in(work: Path) -> Iterator[tuple[str, dict[str, int | None]]]:
    """Each source file of mutmut's work folder (as in `mutants/`) and its mutants' exit codes
    (None: not checked yet), from `mutants/**/*.py.meta`."""
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(work / "mutants"))[: -len(".meta")]
        yield source, json.loads(meta.read_text())["exit_code_by_key"]


def verdicts_in(work: Path) -> Verdicts:
    """The verdicts mutmut has reached in its work folder (`mutants/**/*.py.meta`); a mutant
    not yet checked, or whose check was interrupted, has none."""
    from mutmut.stats import status_by_exit_code

    unreached = ("not checked", "check was interrupted by user")
    return {
        source: {k: v for k, v in codes.items() if status_by_exit_code[v] not in unreached}
        for source, codes in _codes_in(work)
    }


def save(
    module: str, keys: Keys, commit: str, wall_s: float, work: Path, carried_from: list[str]
) -> None:
    """Write the verdicts of `work` (atomically: a session may end mid-write)."""
    try:
        verdicts = verdicts_in(work)
    except (OSError, ValueError):  # mutmut is rewriting a meta file: next time
        return
    PROGRESS.mkdir(parents=True, exist_ok=True)
    path = _path(module)
    record = {
        "key": keys.content,
        "source_key": keys.sources,
        "commit": commit,
        "wall_s": round(wall_s, 1),
        "carried_from": carried_from,
        "verdicts": verdicts,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def restore(work: Path, verdicts: Verdicts) -> int:
    """Write the saved verdicts into mutmut's fresh meta files, for the mutants that exist there
    and have none yet; how many were restored."""
    restored = 0
    for source, saved in verdicts.items():
        meta = work / "mutants" / f"{source}.meta"
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        for mutant, code in saved.items():
            if mutant in codes and codes[mutant] is None:
                codes[mutant] = code
                restored += 1
        meta.write_text(json.dumps(data))
    return restored


def undecided(work: Path) -> Verdicts:
    """The mutants mutmut has not decided in `work` (no verdict yet, or `skipped`: not run),
    each with the `skipped` code."""
    return {
        source: {k: SKIPPED for k, v in codes.items() if v in (None, SKIPPED)}
        for source, codes in _codes_in(work)
    }


def skip(work: Path, mutants: Verdicts) -> int:
    """Mark `mutants` skipped (mutmut does not run them) and give every other skipped mutant of
    `work` back to mutmut (its note may be gone); how many are skipped."""
    skipped = 0
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(work / "mutants"))[: -len(".meta")]
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        for mutant, code in codes.items():
            if mutant in mutants.get(source, {}) and code in (None, SKIPPED):
                codes[mutant] = SKIPPED
                skipped += 1
            elif code == SKIPPED:
                codes[mutant] = None
        meta.write_text(json.dumps(data))
    return skipped


def with_status(verdicts: Verdicts, statuses: tuple[str, ...]) -> Verdicts:
    """The verdicts whose status (killed, timeout, survived, ...) is one of `statuses`."""
    from mutmut.stats import status_by_exit_code

    return {
        source: {m: c for m, c in codes.items() if status_by_exit_code[c] in statuses}
        for source, codes in verdicts.items()
    }


def status_of(work: Path, mutant: str) -> str | None:
    """The status (killed, survived, ...) mutmut gave `mutant` in `work`, None if none yet."""
    from mutmut.stats import status_by_exit_code

    for codes in verdicts_in(work).values():
        if mutant in codes:
            return str(status_by_exit_code[codes[mutant]])
    return None


def probe(verdicts: Verdicts) -> tuple[str, str] | None:
    """A saved verdict to test again live, (mutant, its status): a killed mutant (the quickest
    to rerun), else a survivor; None if there is neither."""
    from mutmut.stats import status_by_exit_code

    found = {
        status: (mutant, status)
        for codes in verdicts.values()
        for mutant, code in sorted(codes.items(), reverse=True)
        if (status := status_by_exit_code[code]) in ("killed", "survived")
    }
    return found.get("killed") or found.get("survived")


@contextmanager
def saving(
    module: str,
    keys: Keys,
    commit: str,
    work: Path,
    wall_s: Callable[[], float],
    carried_from: list[str],
) -> Iterator[None]:
    """Save the verdicts of `work` every `SAVE_EVERY_S` while the block runs, and once at its
    end; `wall_s()` gives the run's wall seconds so far."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(SAVE_EVERY_S):
            save(module, keys, commit, wall_s(), work, carried_from)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        save(module, keys, commit, wall_s(), work, carried_from)
