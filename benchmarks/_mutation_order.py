"""A pytest plugin for the mutation runs: the selected tests run quickest first, by the durations
mutmut recorded in its stats run (`mutmut-stats.json` in its `mutants/` folder), a test module
at a time.

mutmut hands a mutant's tests to pytest in no particular order and stops at the first failure
(`-x`), so a killed mutant costs the tests that ran before the one that failed it: on the
trainer, where the covering tests take from 0.1 s to 20 s, quickest first kills most mutants
in seconds. The modules stay whole (the quickest module first, by the sum of its selected
tests' durations), because pytest builds a module's fixtures again each time the order comes
back to it, and mutmut times no fixture (only the tests' bodies). The order changes no verdict
(the tests are independent), and a survivor still runs them all. Without a stats file (mutmut's
first stats run), the order is left as it is.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

STATS = Path("mutmut-stats.json")


def recorded_durations(stats: Path = STATS) -> dict[str, float]:
    """Seconds per test node id, as mutmut recorded them; empty where there is no stats file."""
    if not stats.is_file():
        return {}
    return json.loads(stats.read_text())["duration_by_test"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the test modules quickest first, and each module's tests quickest first; a test
    without a recorded duration counts as taking none (the sort is stable)."""
    durations = recorded_durations()
    if not durations:
        return
    module_seconds: dict[str, float] = defaultdict(float)
    for item in items:
        module_seconds[_module(item)] += durations.get(item.nodeid, 0.0)

    def order(item: pytest.Item) -> tuple[float, str, float]:
        module = _module(item)
        return module_seconds[module], module, durations.get(item.nodeid, 0.0)

    items.sort(key=order)


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]
