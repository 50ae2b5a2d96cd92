"""Fixtures: small datasets the tests write themselves; no test needs a download."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import qatkd
from testdata import (
    learning_overrides,
    make_images,
    slow_files_first,
    write_idx,
    write_learnable_npz,
    write_npz,
)

torch.set_num_threads(1)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Every process a test starts (the CLI in a subprocess, torchrun's ranks) imports the qatkd
    these tests import (a checkout's src/, or mutmut's mutated copy), not an installed copy."""
    root = str(Path(qatkd.__file__).parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow_files_first(items)


@pytest.fixture
def npz_root(tmp_path: Path) -> Path:
    return write_npz(tmp_path / "npz")


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    """A miniature Fashion-MNIST in the Debian package's idx.gz layout."""
    root = tmp_path / "fashion"
    root.mkdir()
    for prefix, n, seed in (("train", 40, 0), ("t10k", 20, 1)):
        x, y = make_images(n, 10, 28, 1, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x[..., 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture(scope="session")
def many_steps_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """npz data with enough images for 57 steps of 8 an epoch (after validation): long enough
    for a signal to land inside an epoch, or for progress lines to be throttled."""
    root = tmp_path_factory.mktemp("npz_many")
    for split, n, seed in (("train", 512, 0), ("test", 24, 1)):
        x, y = make_images(n, 3, 12, 1, seed)
        np.savez(root / f"{split}.npz", x=x[..., 0], y=y)
    return root


@pytest.fixture(scope="session")
def learn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data a model learns in seconds (tests/testdata.py `make_textures`); read-only."""
    return write_learnable_npz(tmp_path_factory.mktemp("learn") / "npz")


@pytest.fixture(scope="session")
def learned_fp32(learn_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FP32 resnet8 trained on `learn_root` (a teacher that knows the classes); read-only."""
    from qatkd import pipeline
    from qatkd.config import load_config

    out = tmp_path_factory.mktemp("learned") / "fp32"
    run_dir, _ = pipeline.train(load_config(overrides=learning_overrides(learn_root, out)))
    return run_dir
