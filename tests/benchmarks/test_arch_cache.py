"""The per-architecture speed page's reuse (benchmarks/_arch_bench.py): a result is reused from
the work folder or the committed page only under the key it was measured with, and it names
the machine it ran on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import _arch_bench as bench
import arch_speed
import pytest
from _arch_models import FineTuning
from _cache import entry, plain, save

SCHEDULE = bench.Schedule(FineTuning(32, 2, 4, 8), 4, 8, (2, 1), threads=1)


def measured(name: str, schedule: bench.Schedule = SCHEDULE) -> dict[str, object]:
    key = plain(bench.result_key(name, schedule))
    return {"export": "ok", "commit": "abc1234", "machine": "some CPU", "key": key}


def test_a_committed_result_is_reused_under_its_own_key_only(tmp_path: Path):
    page = {"resnet18": measured("resnet18")}
    assert bench.cached("resnet18", SCHEDULE, tmp_path, page) == page["resnet18"]
    longer = dataclasses.replace(SCHEDULE, test_images=16)
    assert bench.cached("resnet18", longer, tmp_path, page) is None
    elsewhere = {"resnet18": measured("resnet50")}  # another architecture's key
    assert bench.cached("resnet18", SCHEDULE, tmp_path, elsewhere) is None
    unkeyed = {"resnet18": {"export": "ok", "commit": "abc1234"}}  # a page from before keys
    assert bench.cached("resnet18", SCHEDULE, tmp_path, unkeyed) is None
    assert bench.cached("resnet18", SCHEDULE, tmp_path, {"resnet18": None}) is None


def test_the_work_folder_comes_before_the_committed_page(tmp_path: Path):
    key = bench.result_key("resnet18", SCHEDULE)
    local = measured("resnet18") | {"machine": "this CPU"}
    save(entry(tmp_path / "resnet18", "result", key), key, local)
    page = {"resnet18": measured("resnet18")}
    assert bench.cached("resnet18", SCHEDULE, tmp_path, page)["machine"] == "this CPU"


def test_the_key_names_what_the_result_depends_on_but_not_the_machine():
    key = bench.result_key("resnet18", SCHEDULE)
    assert set(key) == {"architecture", "schedule", "versions", "source"}
    assert key["schedule"]["fine_tuning"]["size"] == 32 and key["architecture"] == "resnet18"


def test_a_measured_result_names_its_machine_and_key_and_is_found_again_on_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(bench, "measure_architecture", lambda *args: {"export": "ok"})
    monkeypatch.setattr(bench, "machine", lambda: "this CPU")
    result = bench.measure_and_cache("resnet18", SCHEDULE, None, None, tmp_path / "a", "abc1234")
    assert result == {
        "export": "ok",
        "commit": "abc1234",
        "machine": "this CPU",
        "key": plain(bench.result_key("resnet18", SCHEDULE)),
    }
    assert bench.cached("resnet18", SCHEDULE, tmp_path / "a", {}) == result  # the work folder
    monkeypatch.setattr(arch_speed, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    page = {"architectures": {"resnet18": result, "vit_b_16": None}}
    (tmp_path / "results" / "arch_speed.json").write_text(json.dumps(page))
    committed = arch_speed.committed_results(quick=False)
    assert bench.cached("resnet18", SCHEDULE, tmp_path / "elsewhere", committed) == result
    assert bench.cached("vit_b_16", SCHEDULE, tmp_path / "elsewhere", committed) is None
    assert arch_speed.committed_results(quick=True) == {}  # no quick page yet


def test_a_page_from_several_machines_says_so_and_lists_each_architecture_under_its_own():
    one = {"resnet18": {"machine": "CPU A"}, "swin_t": {"machine": "CPU A"}}
    assert arch_speed.page_machine(one) == "CPU A"
    two = one | {"vit_b_16": {"machine": "CPU B"}}
    assert arch_speed.page_machine(two).startswith("2 machines (each architecture on one")
    assert arch_speed.machine_lines(two) == [
        "## Machines",
        "",
        "Each architecture's figures come from one run on one of:",
        "",
        "- CPU A: resnet18, swin_t",
        "- CPU B: vit_b_16",
        "",
    ]
    assert arch_speed.machine_lines(one) == []
