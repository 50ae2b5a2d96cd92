import hashlib
from pathlib import Path

import pytest
import torch

from qatkd.checkpoint import content_sha256, file_sha256
from qatkd.distill import TeacherLogitCache
from qatkd.errors import QatkdError

KEY = {"teacher": "abc123", "data": "def456"}
TABLE = torch.randn(6, 3)  # the "teacher's" logits of the 6 samples of the dataset


def rows_of(indices: torch.Tensor) -> torch.Tensor:
    return TABLE[indices]


def never(indices: torch.Tensor) -> torch.Tensor:
    raise AssertionError(f"compute_fn called for {indices.tolist()} although they are cached")


def test_rows_are_stored_by_sample_and_computed_once(tmp_path: Path) -> None:
    computed: list[list[int]] = []

    def compute(indices: torch.Tensor) -> torch.Tensor:
        computed.append(indices.tolist())
        return rows_of(indices)

    first = TeacherLogitCache(tmp_path, KEY, 6).rows(torch.tensor([4, 1]), compute)
    assert torch.equal(first[[1, 4]], TABLE[[1, 4]])
    # another subset of the same data: only its new samples are computed, every row is its own
    second = TeacherLogitCache(tmp_path, KEY, 6).rows(torch.tensor([0, 1, 5]), compute)
    assert computed == [[1, 4], [0, 5]]
    assert torch.equal(second[[0, 1, 4, 5]], TABLE[[0, 1, 4, 5]])
    assert torch.equal(
        TeacherLogitCache(tmp_path, KEY, 6).rows(torch.tensor([5, 0]), never), second
    )
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]


@pytest.mark.parametrize(
    "changed", [{"teacher": "other"}, {"data": "other"}, {"transform": "resize"}]
)
def test_each_key_part_selects_its_own_file(tmp_path: Path, changed: dict) -> None:
    TeacherLogitCache(tmp_path, KEY, 6).rows(torch.arange(6), rows_of)
    other = TeacherLogitCache(tmp_path, KEY | changed, 6)
    assert other.path != TeacherLogitCache(tmp_path, KEY, 6).path
    fresh = torch.zeros(6, 3)
    assert torch.equal(other.rows(torch.arange(6), lambda i: fresh[i]), fresh)  # a miss


def test_size_and_dtype_select_the_file(tmp_path: Path) -> None:
    base = TeacherLogitCache(tmp_path, KEY, 6)
    assert TeacherLogitCache(tmp_path, KEY, 7).path != base.path
    half = TeacherLogitCache(tmp_path, KEY, 6, dtype=torch.float16)
    assert half.path != base.path
    assert half.rows(torch.arange(6), rows_of).dtype == torch.float16


def test_a_corrupt_file_is_one_clear_error(tmp_path: Path) -> None:
    cache = TeacherLogitCache(tmp_path, KEY, 6)
    cache.rows(torch.arange(2), rows_of)
    cache.path.write_bytes(cache.path.read_bytes()[:100])
    with pytest.raises(QatkdError, match=r"teacher-logit cache .* is unreadable .* delete it"):
        cache.rows(torch.arange(2), rows_of)
    torch.save({"logits": torch.zeros(6, 3)}, cache.path)  # a torch file of another layout
    with pytest.raises(QatkdError, match="unreadable or not this cache's file"):
        cache.rows(torch.arange(2), rows_of)


def test_indices_outside_the_dataset_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        TeacherLogitCache(tmp_path, KEY, 6).rows(torch.tensor([6]), rows_of)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"weights")
    assert file_sha256(path) == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(QatkdError, match=r"file not found: .*missing\.pt"):
        file_sha256(tmp_path / "missing.pt")


def test_content_sha256_of_a_folder_follows_every_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"weights")
    before = content_sha256(folder)
    (folder / "pytorch_model.bin").write_bytes(b"other weights")
    assert content_sha256(folder) != before
    (folder / "pytorch_model.bin").write_bytes(b"weights")
    assert content_sha256(folder) == before
    (folder / "pytorch_model.bin").rename(folder / "renamed.bin")
    assert content_sha256(folder) != before
