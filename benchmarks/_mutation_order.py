"""A pytest plugin for the mutation runs: the tests that failed the latest mutants first, then the
selected tests quickest first, by the durations mutmut recorded in its stats run
(`mutmut-stats.json` in its `mutants/` folder), a test module at a time.

mutmut hands a mutant's tests to pytest in no particular order and stops at the first failure
(`-x`), so a killed mutant costs the tests that ran before the one that failed it. Quickest
first kills most of the trainer's mutants in seconds (its covering tests take from 0.1 s to
20 s). The modules stay whole (the quickest module first, by the sum of its selected tests'
durations), because pytest builds a module's fixtures again each time the order comes back to
it, and mutmut times no fixture (only the tests' bodies). But mutants of one stretch of code
mostly fall to one test, often a slow one (a resume's bookkeeping only a resume test reads): the
tests that failed the latest mutants (`recent_killers`, written by every worker) run before all
others. The order changes
no verdict (the tests are independent), and a survivor still runs them all. Without a stats
file (mutmut's first stats run), the order is left as it is.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

STATS = Path("mutmut-stats.json")
KILLERS = Path("mutation-killers.json")
"""The tests that failed the latest mutants, most recent first, shared by mutmut's workers."""
KEEP = 8
"""How many recent killers run first: a stretch of code falls to a few tests at most."""


def recorded_durations(stats: Path = STATS) -> dict[str, float]:
    """Seconds per test node id, as mutmut recorded them; empty where there is no stats file."""
    if not stats.is_file():
        return {}
    return json.loads(stats.read_text())["duration_by_test"]


def recent_killers(path: Path = KILLERS) -> list[str]:
    """The node ids of the tests that failed the latest mutants, most recent first; none where
    no test has failed yet or the file is unreadable (it only orders the tests)."""
    try:
        killers = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [k for k in killers if isinstance(k, str)] if isinstance(killers, list) else []


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the recent killers first (most recent first), then the test modules quickest first,
    and each module's tests quickest first; a test without a recorded duration counts as taking
    none (the sort is stable)."""
    durations = recorded_durations()
    if not durations:
        return
    module_seconds: dict[str, float] = defaultdict(float)
    for item in items:
        module_seconds[_module(item)] += durations.get(item.nodeid, 0.0)
    killers = {nodeid: rank for rank, nodeid in enumerate(recent_killers())}

    def order(item: pytest.Item) -> tuple[int, float, str, float]:
        module = _module(item)
        first = killers.get(item.nodeid, len(killers))
        return first, module_seconds[module], module, durations.get(item.nodeid, 0.0)

    items.sort(key=order)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A test that failed (in its set-up or its body) becomes the most recent killer. The file is
    replaced whole (a temporary file per process, then a rename): another worker reads the old
    list or the new one, never a part."""
    if not report.failed:
        return
    killers = [report.nodeid, *(k for k in recent_killers() if k != report.nodeid)][:KEEP]
    temporary = KILLERS.with_name(f"{KILLERS.name}.{os.getpid()}")
    temporary.write_text(json.dumps(killers))
    os.replace(temporary, KILLERS)


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]
