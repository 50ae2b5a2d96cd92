"""The layering contract (import-linter, `[tool.importlinter]` in pyproject.toml) holds, and no
module of `qatkd` imports itself back through any chain of imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).parents[1]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_strongly_connected_finds_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_cycles_in_qatkd():
    imports = grimp.build_graph("qatkd")
    graph = {m: imports.find_modules_directly_imported_by(m) for m in imports.modules}
    assert strongly_connected(graph) == []


def test_layering_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run(
        [lint, "--no-logo", "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_importing_qatkd_and_validating_configs_loads_no_family():
    """`import qatkd` registers the families' configurations only: `qatkd --help` and one-line
    config errors must not wait for torchvision, torchmetrics (which loads transformers) or the
    ONNX stack; a family loads on first use (`task_family`)."""
    heavy = ["torchvision", "torchmetrics", "transformers", "onnx", "onnxruntime", "openvino"]
    script = (
        "import sys, qatkd\n"
        "from qatkd.config import load_config\n"
        "for task in ('classification', 'detection', 'language'):\n"
        "    load_config(overrides=[f'task={task}'])\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
        "from qatkd.tasks import task_family\n"
        "task_family('classification')\n"
        "print('torchvision' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stdout
