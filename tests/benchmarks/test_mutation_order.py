"""The mutation runs' test order (benchmarks/_mutation_order.py): quickest first by mutmut's
recorded durations, untouched without them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import _mutation_order as order
import pytest


def items(*node_ids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(nodeid=n) for n in node_ids]


def test_the_tests_run_quickest_first_and_unrecorded_ones_keep_their_place_among_the_instant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    durations = {"t.py::slow": 20.5, "t.py::quick": 0.1, "t.py::medium": 2.0, "t.py::zero": 0.0}
    (tmp_path / order.STATS.name).write_text(json.dumps({"duration_by_test": durations}))
    monkeypatch.chdir(tmp_path)
    selected = items("t.py::slow", "t.py::new", "t.py::medium", "t.py::zero", "t.py::quick")
    order.pytest_collection_modifyitems(selected)
    assert [i.nodeid for i in selected] == [
        "t.py::new",
        "t.py::zero",
        "t.py::quick",
        "t.py::medium",
        "t.py::slow",
    ]


def test_without_a_stats_file_the_order_is_left_alone(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    selected = items("t.py::b", "t.py::a")
    order.pytest_collection_modifyitems(selected)
    assert [i.nodeid for i in selected] == ["t.py::b", "t.py::a"]
