"""`make test`'s order (`slow_files_first`, from tests/conftest.py): files with a slow test
first, each file's tests and the other files in collection order."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from testdata import slow_files_first


def item(path: str, slow: bool = False) -> SimpleNamespace:
    marker = pytest.mark.slow.mark if slow else None
    return SimpleNamespace(path=Path(path), get_closest_marker=lambda name: marker)


def test_files_with_a_slow_test_run_first_and_keep_their_order():
    items = [item("a.py"), item("b.py"), item("b.py", slow=True), item("c.py"), item("d.py", True)]
    expected = [items[1], items[2], items[4], items[0], items[3]]
    slow_files_first(items)
    assert items == expected
