from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qatkd.config import DataConfig
from qatkd.errors import QatkdError
from qatkd.tasks.classification.data import load_data
from qatkd.tasks.fashion_mnist import read_idx
from testdata import make_images, write_idx


def test_idx_round_trip(tmp_path: Path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)


def test_fashion_mnist_loader(fashion_root: Path):
    data = load_data(DataConfig(root=str(fashion_root), augment=False))
    assert (len(data.train), len(data.test), data.num_classes, data.in_channels) == (40, 20, 10, 1)
    image, label = data.test[0]
    expected = read_idx(fashion_root / "t10k-images-idx3-ubyte.gz")[0] / 255
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.allclose(image[0], torch.from_numpy(expected).float())
    assert label == int(read_idx(fashion_root / "t10k-labels-idx1-ubyte.gz")[0])
    assert data.class_names[0] == "T-shirt/top"


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(QatkdError, match="apt-get install dataset-fashion-mnist"):
        load_data(DataConfig(root=str(tmp_path)))


def test_limits_cap_the_splits(fashion_root: Path):
    data = load_data(DataConfig(root=str(fashion_root), train_limit=7, test_limit=5))
    assert (len(data.train), len(data.test)) == (7, 5)


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float"])
def test_npz_layouts(tmp_path: Path, layout: str):
    x, y = make_images(10, 2, 8, 3 if layout != "nhw" else 1, seed=0)
    stored = {"nhw": x[..., 0], "nhwc": x, "nchw": x.transpose(0, 3, 1, 2), "float": x / 255.0}[
        layout
    ]
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=stored, y=y)
    data = load_data(DataConfig(name="npz", root=str(tmp_path), augment=False))
    image, label = data.train[3]
    channels = 1 if layout == "nhw" else 3
    assert image.shape == (channels, 8, 8) and label == y[3]
    assert torch.allclose(image, torch.from_numpy(x[3].transpose(2, 0, 1)[:channels]).float() / 255)


def test_npz_errors(tmp_path: Path):
    with pytest.raises(QatkdError, match=r"needs data\.root"):
        load_data(DataConfig(name="npz"))
    with pytest.raises(QatkdError, match=r"train\.npz not found"):
        load_data(DataConfig(name="npz", root=str(tmp_path)))
    np.savez(tmp_path / "train.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(QatkdError, match="must hold arrays 'x'"):
        load_data(DataConfig(name="npz", root=str(tmp_path)))


def _write_folder(root: Path, broken: bool = False) -> None:
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 16), (i * 90, 30, 200)).save(folder / f"{i}.png")
    if broken:
        (root / "train" / "cat" / "bad.png").write_bytes(b"not a png")


def test_imagefolder(tmp_path: Path):
    _write_folder(tmp_path)
    data = load_data(DataConfig(name="imagefolder", root=str(tmp_path)))
    image, label = data.train[0]
    assert data.class_names == ["cat", "dog"] and image.shape == (3, 32, 32) and label == 0
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_unreadable_image_is_named(tmp_path: Path):
    _write_folder(tmp_path, broken=True)
    data = load_data(DataConfig(name="imagefolder", root=str(tmp_path)))
    with pytest.raises(QatkdError, match=r"cannot read image .*bad.png"):
        [data.train[i] for i in range(len(data.train))]
