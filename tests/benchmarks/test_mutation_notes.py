"""A survivor's note (benchmarks/_mutation_equivalent.py) follows its mutant when mutmut
renumbers the function's mutants, and never reaches another change or another function."""

from __future__ import annotations

import mutation_report as report


def test_a_note_explains_the_same_change_in_the_same_function_whatever_its_number(monkeypatch):
    noted = {"pkg.mod.x_fit__mutmut_396": ("units = 1", "the sum only enters a difference")}
    monkeypatch.setattr(report, "EQUIVALENT", noted)
    diff = "--- a\n+++ b\n-    units = 0\n+    units = 1\n"
    for number in (396, 397):  # as written, and after an edit above it moved the mutant
        found = report.survivor(f"pkg.mod.x_fit__mutmut_{number}", "survived", diff)
        assert found["equivalent"] == "the sum only enters a difference"
    other_change = diff.replace("units = 1", "units = None")
    assert (
        report.survivor("pkg.mod.x_fit__mutmut_396", "survived", other_change)["equivalent"] is None
    )
    other_function = report.survivor("pkg.mod.x_fit_more__mutmut_396", "survived", diff)
    assert other_function["equivalent"] is None
