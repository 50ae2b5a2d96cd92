import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from qatkd.config import DataConfig
from qatkd.errors import QatkdError
from qatkd.tasks.classification.data import CIFAR_STATS, load_data
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


CIFAR_LAYOUT = {
    # name: (class, folder, train files, test file, meta file, label key, class-name key, classes)
    "cifar10": (
        datasets.CIFAR10,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": (
        datasets.CIFAR100,
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
    ),
}


def _write_cifar(root: Path, name: str) -> dict:
    """A miniature CIFAR folder in the python-version archive's layout (pickled dicts of N×3072
    uint8 rows, channel-major); returns the images (N×3×32×32), labels and class names."""
    _, folder, train_files, test_file, meta_file, label_key, names_key, classes = CIFAR_LAYOUT[name]
    rng = np.random.default_rng(7)
    written: dict = {"train": ([], []), "test": ([], [])}
    (root / folder).mkdir(parents=True)
    for split, files, per_file in (("train", train_files, 3), ("test", [test_file], 4)):
        for file in files:
            rows = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
            labels = rng.integers(0, classes, per_file).tolist()
            with (root / folder / file).open("wb") as f:
                pickle.dump({"data": rows, label_key: labels, "filenames": ["x.png"] * per_file}, f)
            written[split][0].append(rows.reshape(-1, 3, 32, 32))
            written[split][1].extend(labels)
    names = [f"class_{i}" for i in range(classes)]
    with (root / folder / meta_file).open("wb") as f:
        pickle.dump({names_key: names}, f)
    images = {split: np.concatenate(parts[0]) for split, parts in written.items()}
    return {"images": images, "labels": {s: p[1] for s, p in written.items()}, "names": names}


def _accept_checksums(monkeypatch: pytest.MonkeyPatch, root: Path, name: str) -> None:
    """torchvision checks each file's md5 against the real archive's: give it the miniature's."""
    cls, folder, train_files, test_file, meta_file, _, names_key, _ = CIFAR_LAYOUT[name]

    def md5(file: str) -> str:
        return hashlib.md5((root / folder / file).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[test_file, md5(test_file)]])
    monkeypatch.setattr(
        cls, "meta", {"filename": meta_file, "key": names_key, "md5": md5(meta_file)}
    )


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_reads_the_python_layout(tmp_path: Path, monkeypatch, name: str):
    written = _write_cifar(tmp_path, name)
    _accept_checksums(monkeypatch, tmp_path, name)
    data = load_data(DataConfig(name=name, root=str(tmp_path), augment=False))
    assert (data.name, data.in_channels, data.image_size) == (name, 3, 32)
    assert (len(data.train), len(data.test)) == (3 * len(CIFAR_LAYOUT[name][2]), 4)
    assert data.class_names == written["names"] and data.num_classes == CIFAR_LAYOUT[name][7]
    assert (tuple(data.mean), tuple(data.std)) == CIFAR_STATS[name]
    for split, dataset in (("train", data.train), ("test", data.test)):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            expected = torch.from_numpy(written["images"][split][i]).float() / 255
            assert torch.equal(image, expected), (split, i)
            assert label == written["labels"][split][i], (split, i)
    augmented = load_data(DataConfig(name=name, root=str(tmp_path), augment=True, test_limit=2))
    assert augmented.train.transform is not None and len(augmented.test) == 2
    assert torch.equal(augmented.test[1][0], data.test[1][0])  # test images are not augmented


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_or_damaged_cifar_names_the_folder_to_put_there(tmp_path: Path, name, folder):
    message = (
        rf"^{name} not found in {re.escape(str(tmp_path))}: put the python-version archive's "
        rf"folder \({folder}\) there, as torchvision lays it out$"
    )
    with pytest.raises(QatkdError, match=message):
        load_data(DataConfig(name=name, root=str(tmp_path)))
    _write_cifar(tmp_path, name)  # files whose checksums are not the real archive's
    with pytest.raises(QatkdError, match=message):
        load_data(DataConfig(name=name, root=str(tmp_path)))
    with pytest.raises(QatkdError, match=r"^data\.root not found: .*nowhere$"):
        load_data(DataConfig(name=name, root=str(tmp_path / "nowhere")))
