"""The mutation runs' test order (benchmarks/_mutation_order.py): the tests that failed the latest
mutants first, then the quickest module first, each module's tests quickest first, by mutmut's
recorded durations; untouched without them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import _mutation_order as order
import pytest


def items(*node_ids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(nodeid=n) for n in node_ids]


def test_modules_run_whole_quickest_first_and_their_tests_quickest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    durations = {
        "a.py::slow": 20.5,  # module a: 20.6 s
        "a.py::quick": 0.1,
        "b.py::medium": 2.0,  # module b: 2.0 s
        "b.py::zero": 0.0,
        "c.py::one": 1.0,  # module c: 1.0 s, and its unrecorded test counts as taking none
    }
    (tmp_path / order.STATS.name).write_text(json.dumps({"duration_by_test": durations}))
    monkeypatch.chdir(tmp_path)
    selected = items("a.py::slow", "b.py::medium", "c.py::one", "a.py::quick", "b.py::zero")
    selected += items("c.py::new")
    order.pytest_collection_modifyitems(selected)
    assert [i.nodeid for i in selected] == [
        "c.py::new",
        "c.py::one",
        "b.py::zero",
        "b.py::medium",
        "a.py::quick",
        "a.py::slow",
    ]


def test_modules_of_equal_time_do_not_interleave(tmp_path: Path, monkeypatch):
    durations = {"a.py::x": 1.0, "a.py::y": 2.0, "b.py::x": 2.0, "b.py::y": 1.0}
    (tmp_path / order.STATS.name).write_text(json.dumps({"duration_by_test": durations}))
    monkeypatch.chdir(tmp_path)
    selected = items("b.py::x", "a.py::y", "b.py::y", "a.py::x")
    order.pytest_collection_modifyitems(selected)
    assert [i.nodeid for i in selected] == ["a.py::x", "a.py::y", "b.py::y", "b.py::x"]


def test_without_a_stats_file_the_order_is_left_alone(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    selected = items("t.py::b", "t.py::a")
    order.pytest_collection_modifyitems(selected)
    assert [i.nodeid for i in selected] == ["t.py::b", "t.py::a"]


def failed(nodeid: str, outcome: str = "failed") -> SimpleNamespace:
    return SimpleNamespace(nodeid=nodeid, failed=outcome == "failed")


def test_the_latest_killers_run_first_most_recent_first(tmp_path: Path, monkeypatch):
    durations = {"a.py::x": 1.0, "a.py::y": 2.0, "b.py::slow": 30.0, "b.py::z": 0.5}
    (tmp_path / order.STATS.name).write_text(json.dumps({"duration_by_test": durations}))
    monkeypatch.chdir(tmp_path)
    for nodeid in ("a.py::y", "b.py::slow", "gone.py::t"):  # b.py::slow failed the last mutant
        order.pytest_runtest_logreport(failed(nodeid))
    order.pytest_runtest_logreport(failed("a.py::x", "passed"))
    order.pytest_runtest_logreport(failed("b.py::slow"))
    assert order.recent_killers() == ["b.py::slow", "gone.py::t", "a.py::y"]
    selected = items("a.py::x", "a.py::y", "b.py::z", "b.py::slow")
    order.pytest_collection_modifyitems(selected)
    assert [i.nodeid for i in selected] == ["b.py::slow", "a.py::y", "a.py::x", "b.py::z"]
    assert {p.name for p in tmp_path.iterdir()} == {order.STATS.name, order.KILLERS.name}


def test_the_killers_kept_are_the_latest_few(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(order.KEEP + 3):
        order.pytest_runtest_logreport(failed(f"t.py::{i}"))
    latest = [f"t.py::{i}" for i in reversed(range(3, order.KEEP + 3))]
    assert order.recent_killers() == latest


@pytest.mark.parametrize("content", ["", "{not json", '{"a": 1}', '[1, "t.py::a"]'])
def test_an_unreadable_killers_file_only_loses_the_order(tmp_path: Path, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    order.KILLERS.write_text(content)
    assert order.recent_killers() == ([] if content != '[1, "t.py::a"]' else ["t.py::a"])
    order.pytest_runtest_logreport(failed("t.py::b"))
    assert order.recent_killers()[0] == "t.py::b"
