"""The committed progress of a stopped mutation run (benchmarks/_mutation_progress.py): reused
only for the content it was found on, restored only where mutmut has no verdict yet."""

from __future__ import annotations

import json
from pathlib import Path

import _mutation_progress as progress
import pytest


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(progress, "PROGRESS", tmp_path / "progress")
    (tmp_path / "progress").mkdir()
    return tmp_path / "progress"


def write(folder: Path, **record: object) -> None:
    (folder / "engine.json").write_text(json.dumps(record))


def test_saved_verdicts_are_reused_all_for_the_same_content_and_killed_for_new_tests(
    folder, capsys
):
    verdicts = {"src/qatkd/train/engine.py": {"m_1": 1, "m_2": 0}}
    record = {"key": "abc", "source_key": "src", "commit": "31006db", "wall_s": 60.0}
    write(folder, **record, carried_from=["20b7562"], verdicts=verdicts)
    same = progress.load("engine", progress.Keys("abc", "src"))
    assert same["reuse"] == "all" and same["verdicts"] == verdicts
    assert progress.carried("engine") == ["20b7562"]
    new_tests = progress.load("engine", progress.Keys("other", "src"))
    assert new_tests["reuse"] == "killed"
    assert "the tests changed since commit 31006db" in capsys.readouterr().out
    assert progress.load("engine", progress.Keys("other", "other sources")) is None
    said = capsys.readouterr().out
    assert "verdicts for other sources (commit 31006db)" in said
    assert "git worktree add DIR 31006db" in said
    assert progress.load("absent", progress.Keys("abc", "src")) is None


@pytest.mark.parametrize("text", ["{not json", '{"key": "abc"}', "[1, 2]"])
def test_an_unreadable_progress_file_is_ignored_and_named(folder, capsys, text):
    (folder / "engine.json").write_text(text)
    assert progress.load("engine", progress.Keys("abc", "src")) is None
    assert f"ignoring unreadable {folder / 'engine.json'}" in capsys.readouterr().out


def test_restore_fills_only_the_mutants_mutmut_has_not_decided(tmp_path):
    meta = tmp_path / "mutants" / "src" / "qatkd" / "train" / "engine.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": {"m_1": None, "m_2": 1, "m_3": None}}))
    saved = {
        "src/qatkd/train/engine.py": {"m_1": 0, "m_2": 0, "m_gone": 1},
        "src/qatkd/train/absent.py": {"m_9": 1},
    }
    assert progress.restore(tmp_path, saved) == 1
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    assert codes == {"m_1": 0, "m_2": 1, "m_3": None}  # m_2 keeps mutmut's own verdict


def test_the_undecided_mutants_a_note_explains_are_skipped_and_no_others(tmp_path):
    meta = tmp_path / "mutants" / "src" / "qatkd" / "train" / "engine.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {"m_1": None, "m_2": 0, "m_3": 1, "m_4": None, "m_5": progress.SKIPPED}
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    undecided = progress.undecided(tmp_path)
    assert undecided == {"src/qatkd/train/engine.py": {"m_1": 34, "m_4": 34, "m_5": 34}}
    noted = {"src/qatkd/train/engine.py": {"m_1": 34, "m_2": 34}}  # m_5's note is gone
    assert progress.skip(tmp_path, noted) == 1
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    assert codes == {"m_1": 34, "m_2": 0, "m_3": 1, "m_4": None, "m_5": None}
