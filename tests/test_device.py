"""`train.device`: resolution, errors, batches, mixed precision, loaders and the process group,
all checked on the CPU (CUDA's presence is simulated where the logic only asks about it)."""

from __future__ import annotations

import pytest
import torch

from qatkd import device as dev
from qatkd.cli import EXIT_USER_ERROR, main
from qatkd.config import load_config
from qatkd.device import (
    loader_options,
    mixed_precision,
    module_device,
    resolve_device,
    to_device,
)
from qatkd.errors import QatkdError
from qatkd.train import distributed

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA as torch would report it on a machine with two GPUs (nothing is allocated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")


def test_cuda_takes_the_local_ranks_gpu(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")


def test_a_gpu_beyond_the_count_is_refused(two_gpus):
    with pytest.raises(QatkdError, match=r"train.device=cuda:2: .* GPU 2, but there are only 2"):
        resolve_device("cuda:2")
    with pytest.raises(QatkdError, match="needs GPU 3"):
        resolve_device("cuda", local_rank=3)


def test_cuda_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QatkdError, match=r"train.device=cuda: no CUDA device is available here"):
        resolve_device("cuda")


@no_cuda
def test_cuda_without_cuda_is_a_one_line_cli_error_before_any_work(capsys, tmp_path):
    code = main(["train", "train.device=cuda", f"out={tmp_path / 'r'}", "data.root=/nonexistent"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and err.count("\n") == 1
    assert err.startswith("qatkd: error: train.device=cuda: no CUDA device is available here")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_values_accepted(value):
    assert load_config(overrides=[f"train.device={value}"]).train.device == value


@pytest.mark.parametrize("value", ["gpu", "cuda:-1", "cuda:x", "CPU", "mps"])
def test_device_values_refused(value):
    with pytest.raises(QatkdError, match=f"'train.device' = '{value}': use auto, cpu, cuda"):
        load_config(overrides=[f"train.device={value}"])


def test_batches_move_with_their_structure():
    meta = torch.device("meta")
    batch = (torch.ones(2), [torch.zeros(1), 3], {"boxes": torch.ones(1, 4), "name": "x"})
    moved = to_device(batch, meta)
    assert isinstance(moved, tuple) and isinstance(moved[1], list) and moved[1][1] == 3
    assert moved[0].device == moved[1][0].device == moved[2]["boxes"].device == meta
    assert moved[2]["name"] == "x"


def test_module_device():
    assert module_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


def test_mixed_precision(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert mixed_precision(cpu, False) == dev.Precision(False, torch.bfloat16, scaled=False)
    assert mixed_precision(cpu, True) == dev.Precision(True, torch.bfloat16, scaled=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert mixed_precision(gpu, True) == dev.Precision(True, torch.bfloat16, scaled=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert mixed_precision(gpu, True) == dev.Precision(True, torch.float16, scaled=True)
    assert not mixed_precision(gpu, False).enabled


def test_loaders_pin_memory_and_use_workers_on_gpus_only():
    assert loader_options(torch.device("cpu")) == {}
    gpu = loader_options(torch.device("cuda", 0))
    assert gpu["pin_memory"] is True and gpu["num_workers"] >= 1


@pytest.mark.parametrize(("spec", "backend"), [("cpu", "gloo"), ("cuda", "nccl")])
def test_process_group_backend_follows_the_device(monkeypatch, two_gpus, spec, backend):
    joined, selected = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", joined.append)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    world = distributed.init_world(spec)
    assert joined == [backend]
    expected = torch.device("cuda", 1) if spec == "cuda" else torch.device("cpu")
    assert world == distributed.World(1, 2, expected)
    assert selected == ([expected] if spec == "cuda" else [])
