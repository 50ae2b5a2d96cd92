"""The documentation cannot drift from the code: the configuration reference lists every key with
the defaults a run really gets, the site builds with --strict, the README's headline table is the
one the result pages give, and the API example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import qatkd  # noqa: F401  (registers the task families)
from qatkd.config import FAMILY_CONFIGS, build_config, config_keys, config_to_dict
from qatkd.reference import family_keys, fine_tune_defaults, help_lines, markdown
from qatkd.tasks import task_family

ROOT = Path(__file__).resolve().parent.parent
TASKS = sorted(FAMILY_CONFIGS)


def _family_section(text: str, task: str) -> str:
    return text.split(f"## `task: {task}`", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("task", TASKS)
def test_reference_lists_every_key_of_the_family_with_a_description(task):
    section = _family_section(markdown(), task)
    keys = config_keys(FAMILY_CONFIGS[task].config_type)
    leaves = [k for k in keys if not any(other.startswith(f"{k}.") for other in keys)]
    missing = [k for k in [*leaves, "quant"] if f"| `{k}` |" not in section]
    assert not missing, f"keys of task={task} missing from the reference: {missing}"
    undescribed = [d.key for d in family_keys(task) if not d.description]
    assert not undescribed, f"config keys without a description: {undescribed}"


def _at(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("task", TASKS)
def test_reference_defaults_are_what_a_run_gets(task):
    """Every default shown is the resolved config's value; quant.* those of a quantizing run
    after the family's `resolve` (language: its weight-only defaults)."""
    plain = config_to_dict(build_config({"task": task}))
    quantized = task_family(task).resolve(build_config({"task": task, "quant": {}}))
    plain["quant"] = config_to_dict(quantized)["quant"]
    for doc in family_keys(task):
        if doc.type != "section or null":
            assert doc.default == _at(plain, doc.key), doc.key


def test_fine_tuning_defaults_are_what_a_run_from_a_trained_model_gets():
    tuned = config_to_dict(build_config({"task": "detection", "model": {"init": "m.pt"}}))
    assert fine_tune_defaults("detection") == {
        "train.lr": tuned["train"]["lr"],
        "train.warmup_epochs": tuned["train"]["warmup_epochs"],
    }
    assert (
        tuned["train"]["lr"] != config_to_dict(build_config({"task": "detection"}))["train"]["lr"]
    )


def test_help_prints_the_reference(capsys):
    from qatkd.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for line in help_lines():
        assert " ".join(line.split()) in " ".join(out.split())
    assert "quant.group_size = 64" in out  # language's quant default, under task=language


def test_site_builds_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "site" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "<code>train.save_every_min</code>" in page  # the generated reference is in it


def _nav_pages(node) -> set[str]:
    if isinstance(node, str):
        return {node}
    items = node.values() if isinstance(node, dict) else node
    return set().union(*(_nav_pages(item) for item in items))


def test_every_page_is_in_the_navigation():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages == _nav_pages(nav)


def test_headline_tables_are_read_from_the_result_pages():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import headline
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for path in headline.TARGETS:
        text = path.read_text(encoding="utf-8")
        assert headline.with_table(text, path) == text, (
            f"{path.name}: run python benchmarks/headline.py"
        )


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move detail into docs/"


def test_api_example_runs_as_written():
    """The Python block of docs/api.md, with small stand-ins for the user's data and teachers."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)

    def teacher() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    names = {
        "loader": [(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)],
        "teacher_a": teacher(),
        "teacher_b": teacher(),
    }
    exec(compile(code, "docs/api.md", "exec"), names)
    assert torch.isfinite(names["loss"])
    moved = [p.detach().abs().max().item() for p in names["gor"].parameters()]
    assert len(moved) == 2 and min(moved) > 0  # GoR's two parameters trained with the student
