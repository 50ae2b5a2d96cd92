"""The notes that explain surviving mutants (benchmarks/_mutation_equivalent.py), as the mutation
report reads them: a note holds for its mutant only while the mutant writes the line it expects,
and a note whose mutant was renumbered is pointed out, never applied."""

from __future__ import annotations

import mutation_report as report
import pytest
from _mutation_equivalent import _alike

F = "qatkd.m.x_f__mutmut_"
G = "qatkd.m.x_g__mutmut_"


def diff(old: str, new: str) -> str:
    return f"--- src/qatkd/m.py\n+++ src/qatkd/m.py\n@@ -1,1 +1,1 @@\n-    {old}\n+    {new}\n"


@pytest.fixture(autouse=True)
def notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        report,
        "EQUIVALENT",
        {
            f"{F}3": ("x = None", "None reads as empty"),
            f"{F}4": ("return y or 0", "y is never falsy"),
            f"{G}3": ("x = None", "another function's note"),
        },
    )


def test_a_note_explains_its_mutant_only_while_it_writes_the_expected_line():
    assert report.survivor(f"{F}3", "survived", diff("x = []", "x = None"))["equivalent"] == (
        "None reads as empty"
    )
    assert report.survivor(f"{F}3", "survived", diff("x = []", "x = ()"))["equivalent"] is None
    assert report.survivor(f"{F}9", "survived", diff("x = []", "x = None"))["equivalent"] is None


def test_an_unexplained_survivor_names_the_unused_notes_of_its_function_that_fit_it():
    survivors = [
        report.survivor(f"{F}5", "survived", diff("x = []", "x = None")),  # was F3
        report.survivor(f"{F}6", "survived", diff("return y", "return y or 0")),  # F4: used
        report.survivor(f"{F}4", "survived", diff("return y", "return y or 0")),
        report.survivor(f"{G}7", "survived", diff("z = 1", "z = 2")),
    ]
    assert [s["equivalent"] is not None for s in survivors] == [False, False, True, False]
    assert report.renumbered_notes(survivors) == [
        f"{F}5 writes the line of the note on {F}3: x = None"
    ]


def test_past_new_tests_only_the_survivors_a_note_explains_keep_their_verdict():
    """The others are tested again: one without a note, one whose note expects another line."""
    diffs = {
        f"{F}3": diff("x = []", "x = None"),
        f"{F}4": diff("return y or 0", "return y or 1"),
        f"{F}6": diff("x = []", "x = None"),
    }
    survivors = {"src/qatkd/m.py": {f"{F}3": 0, f"{F}4": 0, f"{F}6": 0}}
    kept = report.explained(survivors, lambda mutant, source: diffs[mutant])
    assert kept == {"src/qatkd/m.py": {f"{F}3": 0}}


def test_notes_made_alike_fill_each_place_of_their_line_in_order():
    assert _alike(F, "why", {2: "a", 5: ""}, "f({})") == {
        f"{F}2": ("f(a)", "why"),
        f"{F}5": ("f()", "why"),
    }
    # a part may hold braces of its own: only the line's places are filled
    assert _alike(F, "why", {7: ("{x}", "1")}, "g({}, {})") == {f"{F}7": ("g({x}, 1)", "why")}
    assert _alike(G, "why", {3: 'return {"a": 1}'}) == {f"{G}3": ('return {"a": 1}', "why")}
    with pytest.raises(ValueError, match=r"x_f__mutmut_8: 1 parts for 2 places"):
        _alike(F, "why", {8: "a"}, "g({}, {})")


def test_of_the_undecided_mutants_only_those_a_note_explains_are_skipped_and_shown_as_not_run():
    diffs = {f"{F}3": diff("x = []", "x = None"), f"{F}5": diff("x = []", "x = ()")}
    undecided = {"src/qatkd/m.py": {f"{F}3": 34, f"{F}5": 34}}
    skipped = report.explained(undecided, lambda mutant, source: diffs[mutant])
    assert skipped == {"src/qatkd/m.py": {f"{F}3": 34}}
    entry = {
        "command": "python benchmarks/mutation_report.py m",
        "jobs": 2,
        "commit": "abc1234",
        "date": "2026-12-07",
        "wall_s": 60.0,
        "files": {"src/qatkd/m.py": {"mutants": 2, "killed": 1, "survived": 0, "timeout": 0}},
        "survivors": [report.survivor(f"{F}3", "skipped", diffs[f"{F}3"])],
    }
    section = "\n".join(report.module_section("m", entry))
    assert f"- `{F}3` (not run: resumed, the note explains it): None reads as empty" in section
    assert "| `src/qatkd/m.py` | 2 | 1 | 0 | 0 | 1 |" in section  # skipped: other, not killed
