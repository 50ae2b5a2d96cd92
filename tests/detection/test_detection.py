"""The detection task family: generated data, YOLO folders, losses, KD, mAP, export parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from qatkd.cli import main
from qatkd.errors import QatkdError
from qatkd.export import as_exported, to_onnx
from qatkd.export.runtime import ort_session
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.tasks.data_identity import content_digest
from qatkd.tasks.detection.boxes import STRIDE, assign, locations
from qatkd.tasks.detection.config import DetectionKDConfig
from qatkd.tasks.detection.data import (
    VISIBLE,
    CanvasDetection,
    YoloFolder,
    apply_augment,
    read_yolo_labels,
    unpadded,
    write_yolo_folder,
)
from qatkd.tasks.detection.kd import binary_kl
from qatkd.tasks.detection.models import build_detector
from qatkd.tasks.detection.parity import compare_detections
from qatkd.tasks.detection.task import DetectionTask

NAMES = [f"c{i}" for i in range(10)]


def _items(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST-like items: a bright block in a dark 28x28 square, at random spots."""
    gen = torch.Generator().manual_seed(0)
    items = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        y, x = torch.randint(2, 10, (2,), generator=gen).tolist()
        items[i, y : y + 14, x : x + 12] = 200
    return items, torch.arange(n) % 10


def test_generated_canvases_are_deterministic_and_boxes_fit_the_items():
    items, labels = _items()
    a = CanvasDetection(items, labels, 30, seed=3)
    b = CanvasDetection(items, labels, 30, seed=3)
    assert torch.equal(a.images, b.images)
    singles = 0
    for i in range(len(a)):
        image, boxes, item_labels = a[i]
        boxes, item_labels = unpadded(boxes, item_labels)
        assert torch.equal(boxes, b[i][1][: len(boxes)]) and 1 <= len(boxes) <= 5
        if len(boxes) == 1:  # one item: its box is the extent of the visible pixels
            rows, cols = torch.nonzero(image[0] * 255 > VISIBLE, as_tuple=True)
            extent = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert boxes[0].tolist() == [float(v) for v in extent]
            singles += 1
    assert singles > 0


def test_yolo_folder_round_trip(tmp_path):
    items, labels = _items()
    data = CanvasDetection(items, labels, 6, seed=1)
    write_yolo_folder(data, tmp_path, NAMES)
    loaded = YoloFolder(tmp_path, NAMES, size=96)
    assert len(loaded) == 6
    for i in range(6):
        image, boxes, item_labels = loaded[i]
        assert torch.equal(image, data[i][0])
        assert torch.equal(item_labels, data[i][2])
        torch.testing.assert_close(boxes, data[i][1], rtol=0, atol=1e-3)


def test_yolo_folder_digest_reads_files_and_labels_not_augmented_samples(tmp_path):
    items, labels = _items()
    write_yolo_folder(CanvasDetection(items, labels, 4, seed=1), tmp_path, NAMES)
    augment = v2.RandomHorizontalFlip()
    base = content_digest(YoloFolder(tmp_path, NAMES, size=96, augment=augment))
    torch.rand(5)  # another random state: the same digest
    assert content_digest(YoloFolder(tmp_path, NAMES, size=96, augment=augment)) == base
    assert content_digest(YoloFolder(tmp_path, NAMES, size=64, augment=augment)) != base
    assert content_digest(YoloFolder(tmp_path, NAMES, size=96)) != base
    label = sorted((tmp_path / "labels").iterdir())[0]
    label.write_text("1 0.5 0.5 0.2 0.2\n")
    assert content_digest(YoloFolder(tmp_path, NAMES, size=96, augment=augment)) != base


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("3 0.5 0.5 0.2", "expected 'class cx cy w h' (5 fields), got 4"),
        ("x 0.5 0.5 0.2 0.2", "expected an integer class and 4 numbers"),
        ("12 0.5 0.5 0.2 0.2", "class id 12 is out of range: the folder has 10 classes"),
        ("1 0.5 1.5 0.2 0.2", "must lie in [0, 1]"),
    ],
)
def test_malformed_yolo_labels_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "a.txt"
    path.write_text(f"1 0.5 0.5 0.1 0.1\n\n{line}\n")
    with pytest.raises(QatkdError) as error:
        read_yolo_labels(path, 10)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)


def test_malformed_yolo_label_is_a_one_line_cli_error(tmp_path, capsys):
    items, labels = _items()
    for split in ("train", "test"):
        write_yolo_folder(CanvasDetection(items, labels, 2, seed=1), tmp_path / split, NAMES)
    (tmp_path / "classes.txt").write_text("\n".join(NAMES))
    bad = tmp_path / "train" / "labels" / "000001.txt"
    bad.write_text("1 0.5 0.5 0.1\n")
    code = main(["train", "task=detection", "data.name=yolo", f"data.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{bad}:1: expected 'class cx cy w h' (5 fields), got 4" in err


def test_flip_moves_boxes_with_the_pixels():
    items, labels = _items()
    image, boxes, item_labels = CanvasDetection(items, labels, 1, seed=0)[0]
    boxes, item_labels = unpadded(boxes, item_labels)
    flipped, flipped_boxes, same_labels = apply_augment(
        v2.RandomHorizontalFlip(p=1.0), image, boxes, item_labels
    )
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(same_labels, item_labels)
    expected = torch.stack([96 - boxes[:, 2], boxes[:, 1], 96 - boxes[:, 0], boxes[:, 3]], 1)
    torch.testing.assert_close(flipped_boxes, expected)


def _dense_from_truth(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int = 10):
    """The dense output a perfect detector gives for one image (12 x 12 cells)."""
    points = locations(12, 12)
    index = assign(points, boxes)
    out = torch.full((num_classes + 5, 144), -12.0)
    out[num_classes : num_classes + 4] = 0.0
    positive = index >= 0
    gt = boxes[index[positive]]
    p = points[positive]
    distances = torch.stack(
        [p[:, 0] - gt[:, 0], p[:, 1] - gt[:, 1], gt[:, 2] - p[:, 0], gt[:, 3] - p[:, 1]], 1
    )
    out[labels[index[positive]], positive.nonzero()[:, 0]] = 12.0
    out[num_classes : num_classes + 4, positive] = (distances / STRIDE).log().T
    out[num_classes + 4, positive] = 12.0
    return out.reshape(1, num_classes + 5, 12, 12)


def test_map_of_the_ground_truth_is_one():
    """Truth encoded as dense outputs, decoded, NMS'd and scored by torchmetrics: mAP = 100 %."""
    items, labels = _items()
    data = CanvasDetection(items, labels, 8, seed=2)

    class Perfect(torch.nn.Module):
        def forward(self, x):
            index = int(x[0, 0, 0, 0].item())  # the image's index, smuggled in pixel (0, 0)
            return _dense_from_truth(*unpadded(data[index][1], data[index][2]))

    batches = [
        (torch.full((1, 1, 96, 96), float(i)), data[i][1][None], data[i][2][None]) for i in range(8)
    ]
    metrics = DetectionTask(10).evaluate(Perfect(), batches)
    assert metrics["map50"] == pytest.approx(100.0) and metrics["map"] == pytest.approx(100.0)


def test_loss_decreases_when_overfitting_a_tiny_batch():
    items, labels = _items()
    data = CanvasDetection(items, labels, 4, seed=4)
    batch = tuple(torch.stack([data[i][k] for i in range(4)]) for k in range(3))
    torch.manual_seed(0)
    model = build_detector("det_s", 1, 10, [0.1], [0.25])
    task = DetectionTask(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = task.task_loss(model(batch[0]), batch)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("form", ["legacy", "dense"])
def test_kd_is_zero_for_the_teacher_itself_and_binary_kl_matches_reference(form: str):
    torch.manual_seed(0)
    outputs, teacher = torch.randn(2, 15, 12, 12), torch.randn(2, 15, 12, 12)
    kd = DetectionKDConfig(temperature=1.0, form=form, feature_weight=0)
    task = DetectionTask(10, kd)
    assert task.kd_loss(teacher, [teacher]).item() == pytest.approx(0.0, abs=1e-5)
    per_teacher = DetectionTask(10, kd, per_teacher=True).kd_loss(outputs, [teacher, outputs])
    assert len(per_teacher) == 2 and per_teacher[1].item() == pytest.approx(0.0, abs=1e-5)
    z, p = torch.randn(3, 4), torch.rand(3, 4)
    q = torch.sigmoid(z / 2)
    reference = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1).mean() * 4
    assert binary_kl(z, p, 2.0).item() == pytest.approx(reference.item(), rel=1e-4)


def test_exported_detector_matches_the_quantized_model():
    items, labels = _items()
    data = CanvasDetection(items, labels, 16, seed=5)
    torch.manual_seed(0)
    model = prepare(build_detector("det_res", 1, 10, [0.1], [0.25]), QuantConfig(bits="W8A8"))
    x = torch.stack([data[i][0] for i in range(16)])
    calibrate(model, [x], 16)
    model = as_exported(model.eval(), [1, 96, 96])
    session = ort_session(to_onnx(model, [1, 96, 96]).SerializeToString())

    def runner(array: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": array})[0]

    batches = [
        (
            x,
            torch.stack([data[i][1] for i in range(16)]),
            torch.stack([data[i][2] for i in range(16)]),
        )
    ]
    parity = compare_detections(model, runner, batches)
    # an untrained detector scores many boxes near the threshold: tiny mAP moves only
    assert parity["agreement"] == 100.0 and abs(parity["map50_diff"]) < 0.01
    assert parity["max_output_diff"] < 1e-3
    assert math.isfinite(parity["map_export"])


def test_detection_cli_train_distill_eval(tmp_path, capsys, fashion_root):
    common = [
        "task=detection",
        f"data.root={fashion_root}",
        "data.train_limit=32",
        "data.test_limit=16",
        "train.epochs=1",
        "train.batch_size=16",
        "train.threads=1",
    ]
    assert main(["train", *common, f"out={tmp_path / 't'}"]) == 0
    teacher = tmp_path / "t" / "last.pt"
    student = [
        "quant.bits=W4A4",
        f"model.init={teacher}",
        f"teachers=[{teacher},{teacher}]",
        "balancer.per_teacher=true",
    ]
    assert main(["distill", *common, *student, f"out={tmp_path / 's'}"]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "s")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert evaluated.keys() >= {"test_map", "test_map50"}  # eval reproduces the run's result
    for key in evaluated:
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-4), key
    assert {"final_w_kd0", "final_w_kd1"} <= metrics.keys()
