"""What a mutation run's verdicts are keyed by (benchmarks/mutation_report.py): every source,
helper and conftest, and of the test modules only those the module runs."""

from __future__ import annotations

import mutation_report as report

ENGINE = {"mutate": ["src/qatkd/train/engine.py"], "tests": ["tests/test_engine.py"]}
QUANT = {"mutate": ["src/qatkd/quant/*"], "tests": ["tests/quant"]}


def test_test_modules_count_only_where_the_module_runs_them():
    assert report.keyed("tests/test_engine.py", ENGINE)
    assert not report.keyed("tests/test_cli.py", ENGINE)
    assert not report.keyed("tests/quant/test_lsq.py", ENGINE)
    assert report.keyed("tests/quant/test_lsq.py", QUANT)
    assert report.keyed("tests/quant/sub/test_deep.py", QUANT)
    assert not report.keyed("tests/quantized/test_other.py", QUANT)  # a prefix, not a folder


def test_sources_helpers_and_conftests_always_count():
    for name in (
        "src/qatkd/train/engine.py",
        "src/qatkd/train/test_like_name.py",
        "tests/conftest.py",
        "tests/testdata.py",
        "tests/quant/conftest.py",
        "tests/data/labels.csv",
        "pyproject.toml",
    ):
        assert report.keyed(name, ENGINE), name
    assert report.keyed("src/qatkd/quant/base.py", {"mutate": ["src/qatkd/quant/*"]})


def test_adding_a_test_outside_the_selection_keeps_the_key(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_engine.py").write_text("def test_a(): pass\n")
    (tmp_path / "tests" / "test_cli.py").write_text("def test_b(): pass\n")
    files = ["tests/test_engine.py", "tests/test_cli.py"]
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "tracked_files", lambda paths: files)
    before = report.content_key(ENGINE)
    (tmp_path / "tests" / "test_cli.py").write_text("def test_b(): assert False\n")
    assert report.content_key(ENGINE) == before
    (tmp_path / "tests" / "test_engine.py").write_text("def test_a(): assert False\n")
    assert report.content_key(ENGINE) != before
