"""What a mutation run's verdicts are keyed by (benchmarks/mutation_report.py): every source,
helper and conftest, and of the test modules only those the module runs."""

from __future__ import annotations

import mutation_report as report

ENGINE = {"mutate": ["src/qatkd/train/engine.py"], "tests": ["tests/test_engine.py"]}
QUANT = {"mutate": ["src/qatkd/quant/*"], "tests": ["tests/quant"]}


def test_test_modules_count_only_where_the_module_runs_them():
    assert report.counts_in_key("tests/test_engine.py", ENGINE)
    assert not report.counts_in_key("tests/test_cli.py", ENGINE)
    assert not report.counts_in_key("tests/quant/test_lsq.py", ENGINE)
    assert report.counts_in_key("tests/quant/test_lsq.py", QUANT)
    assert report.counts_in_key("tests/quant/sub/test_deep.py", QUANT)
    assert not report.counts_in_key("tests/quantized/test_other.py", QUANT)  # not a subfolder
    one_test = {"mutate": [], "tests": ["tests/test_engine.py::test_a"]}
    assert report.counts_in_key("tests/test_engine.py", one_test)


def test_sources_helpers_data_and_conftests_always_count():
    for name in (
        "src/qatkd/train/engine.py",
        "src/qatkd/train/test_like_name.py",
        "tests/conftest.py",
        "tests/testdata.py",
        "tests/quant/conftest.py",
        "tests/data/test_labels.csv",
        "pyproject.toml",
    ):
        assert report.counts_in_key(name, ENGINE), name
    assert report.counts_in_key("tests/test_cli.py", {"mutate": ["src/qatkd/quant/*"]})


def test_changing_a_test_outside_the_selection_keeps_the_key(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_engine.py").write_text("def test_a(): pass\n")
    (tmp_path / "tests" / "test_cli.py").write_text("def test_b(): pass\n")
    files = ["tests/test_engine.py", "tests/test_cli.py"]
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "tracked_files", lambda paths: files)
    monkeypatch.setattr(report, "version", lambda package: "3.8.1")  # mutmut: `make mutate` only
    before = report.content_key(ENGINE)
    (tmp_path / "tests" / "test_cli.py").write_text("def test_b(): assert False\n")
    assert report.content_key(ENGINE) == before
    (tmp_path / "tests" / "test_engine.py").write_text("def test_a(): assert False\n")
    assert report.content_key(ENGINE) != before


def test_the_settings_the_run_takes_change_the_key_of_its_verdicts_not_of_its_sources(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "tracked_files", lambda paths: [])
    monkeypatch.setattr(report, "version", lambda package: "3.8.1")
    verdicts, sources = report.content_key(ENGINE), report.content_key({"mutate": ENGINE["mutate"]})
    monkeypatch.setattr(report, "mutmut_config", lambda spec: "\n[tool.mutmut]\ndebug = false\n")
    assert report.content_key(ENGINE) != verdicts
    assert report.content_key({"mutate": ENGINE["mutate"]}) == sources
