import hashlib
import json
import os
from fractions import Fraction
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


def test_the_file_is_named_by_the_hash_of_the_sorted_key(tmp_path: Path) -> None:
    """The key is key_parts with the size and dtype, as sorted JSON (values that are not JSON by
    their str): the same parts in another order or type find the same file."""
    cache = TeacherLogitCache(tmp_path, {"teacher": "abc", "data": Path("/d")}, 6)
    assert cache.key == json.dumps(
        {"data": "/d", "dtype": "torch.float32", "size": 6, "teacher": "abc"}, sort_keys=True
    )
    assert cache.path == tmp_path / f"{hashlib.sha256(cache.key.encode()).hexdigest()}.pt"
    assert TeacherLogitCache(tmp_path, {"data": "/d", "teacher": "abc"}, 6).path == cache.path


def test_a_file_of_another_key_or_size_is_refused(tmp_path: Path) -> None:
    cache = TeacherLogitCache(tmp_path, KEY, 6)
    other = TeacherLogitCache(tmp_path, KEY | {"teacher": "other"}, 6)
    layout = {"logits": torch.zeros(6, 3), "filled": torch.zeros(6, dtype=torch.bool)}
    tmp_path.mkdir(exist_ok=True)
    torch.save({"key": other.key, **layout}, cache.path)  # right size, another key
    with pytest.raises(QatkdError, match="unreadable or not this cache's file"):
        cache.rows(torch.arange(2), rows_of)
    short = {"logits": torch.zeros(5, 3), "filled": torch.zeros(5, dtype=torch.bool)}
    torch.save({"key": cache.key, **short}, cache.path)  # this key, 5 rows for 6 samples
    with pytest.raises(QatkdError, match="unreadable or not this cache's file"):
        cache.rows(torch.arange(2), rows_of)


def test_a_file_that_needs_arbitrary_unpickling_is_refused(tmp_path: Path) -> None:
    """The cache loads with weights_only: a file holding any other object is not unpickled."""
    cache = TeacherLogitCache(tmp_path, KEY, 6)
    cache.rows(torch.arange(6), rows_of)
    stored = torch.load(cache.path, weights_only=True)
    torch.save({**stored, "note": Fraction(1, 3)}, cache.path)
    with pytest.raises(QatkdError, match="unreadable or not this cache's file"):
        cache.rows(torch.arange(2), never)


def test_writes_create_the_folder_and_rename_a_temp_file_beside_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Atomic only if the rename stays in one folder; a write cut short leaves a `.tmp` file."""
    renames: list[tuple[Path, Path]] = []
    replace = os.replace

    def recording_replace(src: str, dst: Path) -> None:
        renames.append((Path(src), Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    cache = TeacherLogitCache(tmp_path / "a" / "b", KEY, 6)
    cache.rows(torch.tensor([1]), rows_of)
    ((src, dst),) = renames
    assert dst == cache.path and src.parent == cache.path.parent and src.suffix == ".tmp"
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]


def test_one_index_and_int32_indices(tmp_path: Path) -> None:
    """A batch of one sample is in range; the missing indices reach compute_fn as int64."""
    seen: list[torch.Tensor] = []

    def compute(indices: torch.Tensor) -> torch.Tensor:
        seen.append(indices)
        return rows_of(indices)

    cache = TeacherLogitCache(tmp_path, KEY, 6)
    assert torch.equal(cache.rows(torch.tensor([5]), compute)[5], TABLE[5])
    cache.rows(torch.tensor([3, 0, 3], dtype=torch.int32), compute)
    assert [(t.dtype, t.tolist()) for t in seen] == [(torch.int64, [5]), (torch.int64, [0, 3])]


def test_compute_fn_giving_the_wrong_number_of_rows_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^1 rows computed for 2 samples$"):
        TeacherLogitCache(tmp_path, KEY, 6).rows(torch.tensor([0, 1]), lambda i: TABLE[:1])
