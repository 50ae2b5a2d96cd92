from pathlib import Path

import pytest
import torch

from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.errors import QatkdError


def test_round_trip_and_no_temporary_files_left(tmp_path: Path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "meta": {"names": ["a"]}}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["epoch"] == 3 and loaded["meta"] == {"names": ["a"]}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(tmp_path)["epoch"] == 3  # a run folder means its last.pt


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path):
    save_checkpoint({"model": {"w": torch.ones(1000)}}, tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(QatkdError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "c.pt")


class Payload:
    pass


def test_pickled_objects_are_refused(tmp_path: Path):
    torch.save({"format": "qatkd-checkpoint-v1", "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(QatkdError, match=r"refusing checkpoint .* pickled objects"):
        load_checkpoint(tmp_path / "evil.pt")


def test_missing_and_foreign_files(tmp_path: Path):
    with pytest.raises(QatkdError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(QatkdError, match="is not a qatkd checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_full_disk_is_a_clear_error_and_keeps_the_previous_file(tmp_path: Path, monkeypatch):
    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")

    def full_disk(obj: object, f: object) -> None:  # what torch.save raises on a full disk
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(QatkdError, match=r"last\.pt: No space left on device; the previous"):
        save_checkpoint({"epoch": 2}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
