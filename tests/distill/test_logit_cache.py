import hashlib
from pathlib import Path

import pytest
import torch

from qatkd.distill import TeacherLogitCache, file_sha256
from qatkd.errors import QatkdError


def key(**overrides: object) -> dict[str, object]:
    return {
        "teacher": "abc123",
        "dataset": "fashion_mnist/test",
        "transform": "normalize",
        "n": 4,
        **overrides,
    }


def never() -> torch.Tensor:
    raise AssertionError("compute_fn called although the logits are cached")


def test_second_call_loads_without_computing(tmp_path: Path) -> None:
    logits = torch.randn(4, 10)
    first = TeacherLogitCache(tmp_path, key()).get(lambda: logits)

    second = TeacherLogitCache(tmp_path, key()).get(never)
    assert torch.equal(first, logits) and torch.equal(second, first)
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]


def test_key_parts_and_dtype_select_the_entry(tmp_path: Path) -> None:
    half = TeacherLogitCache(tmp_path, key(), dtype=torch.float16)
    assert half.path != TeacherLogitCache(tmp_path, key()).path
    assert TeacherLogitCache(tmp_path, key(n=5)).path != TeacherLogitCache(tmp_path, key()).path
    stored = half.get(lambda: torch.randn(4, 10))
    assert stored.dtype == torch.float16
    assert torch.equal(TeacherLogitCache(tmp_path, key(), dtype=torch.float16).get(never), stored)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"weights")
    assert file_sha256(path) == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(QatkdError, match=r"file not found: .*missing\.pt"):
        file_sha256(tmp_path / "missing.pt")
