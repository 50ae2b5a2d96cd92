"""Detection KD (tasks/detection/kd.py): each term against a hand-computed reference, the
foreground-mass normalisation, feature hooks and their errors, and the adapters: trained with the
student, in its checkpoints, resumed exactly, and never exported."""

from __future__ import annotations

import math
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qatkd import pipeline
from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.config import load_config
from qatkd.distill import TeacherEnsemble
from qatkd.errors import QatkdError
from qatkd.tasks import task_family
from qatkd.tasks.detection.config import DetectionKDConfig
from qatkd.tasks.detection.kd import (
    DenseKD,
    FeatureAdapters,
    LegacyKD,
    detection_kd,
    pkd_loss,
    quality_focal_kd,
)
from qatkd.tasks.detection.models import build_detector
from qatkd.train import step
from qatkd.train.distributed import World
from qatkd.train.stops import RunStopped
from testdata import (
    make_images,
    measured_alignments,
    nan_after_step,
    signal_after_epoch,
    write_idx,
)

K = 1  # classes in the hand-computed maps


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def qfl_reference(z: float, p: float, beta: float = 2.0) -> float:
    q = sigmoid(z)
    return -(p * math.log(q) + (1 - p) * math.log(1 - q)) * abs(q - p) ** beta


def giou_loss_reference(a: list[float], b: list[float]) -> float:
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return 1 - (inter / union - (hull - union) / hull)


def dense_map(logits: list[float], log_distances: list[float]) -> torch.Tensor:
    """A [1, K + 5, 1, W] detector output: one class logit, the same 4 box values (log of the
    distance in strides) and a centerness logit of 0 per location."""
    columns = [[z, v, v, v, v, 0.0] for z, v in zip(logits, log_distances, strict=True)]
    return torch.tensor(columns).T.reshape(1, K + 5, 1, len(logits)).contiguous()


def kd(**keys: object) -> DenseKD | LegacyKD:
    return detection_kd(DetectionKDConfig(temperature=1.0, **{"feature_weight": 0.0, **keys}))


def test_class_score_term_is_quality_focal_bce_and_pulls_towards_the_teacher() -> None:
    z = torch.tensor([0.0, 2.0], requires_grad=True)
    p = torch.tensor([0.2, 0.9])
    loss = quality_focal_kd(z, p, beta=2.0)
    assert loss.item() == pytest.approx(qfl_reference(0.0, 0.2) + qfl_reference(2.0, 0.9), 1e-5)
    loss.backward()
    assert z.grad[0] > 0 > z.grad[1]  # σ(0) = 0.5 > 0.2 goes down, σ(2) = 0.88 < 0.9 goes up
    assert quality_focal_kd(p.logit(), p, beta=2.0).item() == pytest.approx(0.0, abs=1e-9)


def test_dense_kd_value_is_the_hand_computed_sum_over_the_foreground_mass() -> None:
    # two locations at x = 4 and 12 (stride 8); student boxes 8 px to each side
    student = dense_map([0.0, -1.0], [0.0, 0.0]).requires_grad_()
    teacher = dense_map([3.0, 1.0], [math.log(2.0), 0.0])  # 16 px at the first location
    mass = sigmoid(3.0) + sigmoid(1.0)  # > 1: the floor does not apply
    cls = qfl_reference(0.0, sigmoid(3.0)) + qfl_reference(-1.0, sigmoid(1.0))
    box = sigmoid(3.0) * giou_loss_reference([-4, -4, 12, 12], [-12, -12, 20, 20])
    loss = kd()(student, [teacher])
    assert loss.item() == pytest.approx((cls + box) / mass, rel=1e-5)
    only_cls = kd(cls_weight=2.0, box_weight=0.0)(student, [teacher])
    assert only_cls.item() == pytest.approx(2 * cls / mass, rel=1e-5)
    only_box = kd(cls_weight=0.0, box_weight=1.0)(student, [teacher])
    assert only_box.item() == pytest.approx(box / mass, rel=1e-5)
    only_box.backward()
    # the student's first box is smaller than the teacher's: its distances must grow
    assert (student.grad[0, K : K + 4, 0, 0] < 0).all()


def test_background_locations_leave_the_dense_kd_unchanged_unlike_a_mean() -> None:
    """Adding locations where teacher and student both see nothing changes neither sum nor mass;
    the legacy KD, a mean over locations, shrinks. A student's false positive there costs."""
    objects = ([0.0, -1.0], [3.0, 1.0])
    empty = [-30.0] * 6
    narrow_s, narrow_t = dense_map(objects[0], [0.0] * 2), dense_map(objects[1], [0.0] * 2)
    wide_s = dense_map(objects[0] + empty, [0.0] * 8)
    wide_t = dense_map(objects[1] + empty, [0.0] * 8)
    narrow = kd()(narrow_s, [narrow_t]).item()
    assert kd()(wide_s, [wide_t]).item() == pytest.approx(narrow, rel=1e-5)
    legacy = kd(form="legacy")
    assert legacy(wide_s, [wide_t]).item() < 0.8 * legacy(narrow_s, [narrow_t]).item()
    false_positive = dense_map(objects[0] + [3.0] + empty[1:], [0.0] * 8)
    assert kd()(false_positive, [wide_t]).item() > narrow + 1.0


def test_several_teachers_combine_and_per_teacher_gives_one_term_each() -> None:
    student = dense_map([0.0, -1.0], [0.0, 0.0])
    a, b = dense_map([3.0, 1.0], [0.5, 0.0]), dense_map([-2.0, 2.0], [0.0, 0.3])
    per_teacher = DenseKD(DetectionKDConfig(temperature=1.0, feature_weight=0.0), per_teacher=True)
    terms = per_teacher(student, [a, student])
    assert len(terms) == 2
    assert terms[0].item() == pytest.approx(kd()(student, [a]).item(), rel=1e-6)
    assert terms[1].item() == pytest.approx(0.0, abs=1e-6)  # the student is its own teacher
    assert kd()(student, [a, b]).item() != pytest.approx(kd()(student, [a]).item(), rel=1e-3)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


def test_feature_term_is_two_times_one_minus_pearson_and_blind_to_scale() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(2, 3, 2, 2)
    s, t = student.detach().numpy(), teacher.numpy()
    reference = np.mean([2 * (1 - pearson(s[:, c], t[:, c])) for c in range(3)])
    loss = pkd_loss(student, teacher)
    assert loss.item() == pytest.approx(reference, rel=1e-3)
    assert pkd_loss(student, 10 * teacher + 3).item() == pytest.approx(loss.item(), rel=1e-4)
    shift = torch.tensor([5.0, -3.0, 0.7]).view(1, 3, 1, 1)  # per channel: what a bias adds
    assert pkd_loss(student + shift, teacher).item() == pytest.approx(loss.item(), rel=1e-4)
    assert pkd_loss(teacher * 0.1 - 2, teacher).item() == pytest.approx(0.0, abs=1e-4)
    loss.backward()
    stepped = (student - 0.05 * student.grad).detach().numpy()
    for c in range(3):  # one descent step makes every channel more correlated
        assert pearson(stepped[:, c], t[:, c]) > pearson(s[:, c], t[:, c])


def detector(name: str) -> torch.nn.Module:
    torch.manual_seed({"det_s": 0, "det_m": 1, "det_res": 2}[name])
    return build_detector(name, 1, 10, [0.2], [0.3])


def test_a_missing_feature_name_is_one_error_listing_the_modules() -> None:
    with pytest.raises(
        QatkdError,
        match=r"^teacher 0 \(res.pt\) has no module 'net.nek' to read a feature from "
        r"\(kd.features\) \(did you mean 'net.neck'\?\); its modules: net, net.stem, ",
    ):
        TeacherEnsemble([detector("det_res")], names=["res.pt"], features=["net.nek"])
    ensemble = TeacherEnsemble([detector("det_res")], features=["net.neck"])
    kd_loss = DenseKD(DetectionKDConfig(features=["net.stages"], feature_weight=1.0))
    with pytest.raises(QatkdError, match=r"^the student has no module 'net.stages'.*net.backbone"):
        kd_loss.parts(detector("det_s"), lambda b: ensemble.with_features(b[0]), None, None)


def test_adapters_map_the_student_width_to_each_teacher_and_leave_the_student_as_it_was() -> None:
    student = detector("det_s").train()
    teachers = TeacherEnsemble([detector("det_res"), detector("det_s")], features=["net.neck"])
    x = torch.rand(2, 1, 96, 96)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kd_loss = DenseKD(DetectionKDConfig(feature_weight=1.0), per_teacher=True)
    parts = kd_loss.parts(student, lambda batch: teachers.with_features(batch[0]), (x,), x)
    assert isinstance(parts, FeatureAdapters)
    conv, same = parts.adapters[0][0], parts.adapters[1][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (64, 96, (1, 1))
    assert conv.bias is None  # the feature term is blind to a channel's shift
    assert isinstance(same, torch.nn.Identity)  # det_s teaches det_s: the widths match
    assert student.training
    for key, value in student.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(value, before[key]), key
    terms = kd_loss(student(x), teachers.with_features(x))
    assert len(terms) == 2
    terms[0].backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    features_off = DenseKD(DetectionKDConfig(feature_weight=0.0), per_teacher=True)
    assert terms[0].item() > features_off(student(x), teachers.with_features(x))[0].item()


def test_kd_cache_with_the_feature_term_is_refused(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")
    common = ["task=detection", f"teachers=[{teacher}]", "kd.cache=true", "data.augment=false"]
    family = task_family("detection")
    with pytest.raises(QatkdError, match=r"^kd.cache=true holds teacher logits only"):
        family.check(load_config(overrides=[*common, "kd.feature_weight=1"]))
    family.check(load_config(overrides=common))  # the default: no feature term


def test_every_dense_term_off_is_a_config_error() -> None:
    off = ["kd.cls_weight=0", "kd.box_weight=0", "kd.feature_weight=0"]
    with pytest.raises(QatkdError, match="every dense KD term is off"):
        load_config(overrides=["task=detection", *off])
    load_config(overrides=["task=detection", *off, "kd.form=legacy"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Tiny canvases and an FP32 det_res teacher (another architecture than the det_s student)."""
    root = tmp_path_factory.mktemp("fashion")
    for prefix, n, seed in (("train", 40, 0), ("t10k", 20, 1)):
        x, y = make_images(n, 10, 28, 1, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x[..., 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    work = tmp_path_factory.mktemp("runs")
    common = [
        "task=detection",
        f"data.root={root}",
        "data.train_limit=16",
        "data.test_limit=8",
        "data.val_split=0",
        "train.batch_size=8",
        "train.threads=1",
    ]
    teacher = [*common, "model.name=det_res", "train.epochs=1", f"out={work / 'teacher'}"]
    pipeline.train(load_config(overrides=teacher))
    student = [
        *common,
        "quant.bits=W4A4",
        f"teachers=[{work / 'teacher' / 'last.pt'}]",
        "balancer.name=fixed",
        "balancer.alpha=0.5",
        "kd.feature_weight=1",
        "train.epochs=2",
    ]
    return {"student": student, "work": [str(work)]}


def test_non_finite_adapter_weights_are_named_as_the_kd_parts(runs, monkeypatch) -> None:
    """The adapters' weights become NaN in the last step of epoch 1: the message names them."""
    nan_after_step(monkeypatch, bad_step=2, group="kd_weights")  # 16 images, 8 a step
    out = Path(runs["work"][0]) / "diverged"
    message = (
        r"^the weights became non-finite \(kd_parts: adapters\.0\.0\.weight\) by step 2 "
        r"\(epoch 1\); no checkpoint was written yet: lower train\.lr and start again$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.distill(load_config(overrides=[*runs["student"], f"out={out}"]))


def test_the_adapters_gradients_are_averaged_over_the_processes_with_the_balancers(
    runs, monkeypatch
) -> None:
    """DDP averages the student's gradients; each step averages the balancer's and the
    adapters' itself, or every process would train adapters of its own. One process averages
    over itself, so what is checked is which parts each step hands over."""
    averaged: list[set[str]] = []
    average = step.average_gradients

    def recorded(world: World, module: torch.nn.Module) -> None:
        averaged.append({name for name, _ in module.named_parameters()})
        average(world, module)

    monkeypatch.setattr(step, "average_gradients", recorded)
    out = Path(runs["work"][0]) / "averaged"
    pipeline.distill(load_config(overrides=[*runs["student"], "train.epochs=1", f"out={out}"]))
    # the fixed balancer has no parameters; 2 steps
    assert averaged == [set(), {"adapters.0.0.weight"}] * 2


@pytest.mark.parametrize(
    ("alpha", "adapters"),
    [("0.5", {"adapters.0.0.weight"}), ("0", None)],
    ids=["the teachers used", "the teachers unused"],
)
def test_the_steps_check_times_train_the_adapters_where_the_run_has_them(
    runs, monkeypatch, alpha, adapters
) -> None:
    """`qatkd check` times the run's step: its optimizer holds the feature adapters as the
    run's does, and none where the balancer gives the KD loss no weight."""
    built: list[set[str] | None] = []
    build = step.build_optimizer

    def recorded(model, balancer, config, kd_parts=None):
        built.append(None if kd_parts is None else {n for n, _ in kd_parts.named_parameters()})
        return build(model, balancer, config, kd_parts)

    monkeypatch.setattr(step, "build_optimizer", recorded)
    out = Path(runs["work"][0]) / "checked"
    overrides = [*runs["student"], f"balancer.alpha={alpha}", f"out={out}"]
    pipeline.check(load_config(overrides=overrides), "distill")
    assert built == [adapters]


def test_adapters_train_with_the_student_and_resume_exactly(runs, monkeypatch) -> None:
    work = Path(runs["work"][0])
    whole = work / "whole"
    pipeline.distill(load_config(overrides=[*runs["student"], f"out={whole}"]))
    state = load_checkpoint(whole / "last.pt")
    groups = {g["name"]: g["params"] for g in state["optimizer"]["param_groups"]}
    assert len(groups["kd_weights"]) == 1 and "kd_norms_biases_quantizers" not in groups
    trained = state["optimizer"]["state"]
    assert all(trained[i]["momentum_buffer"].abs().sum() > 0 for i in groups["kd_weights"])
    assert set(state["kd_parts"]) == {"adapters.0.0.weight"}  # no bias: standardising cancels it
    assert not any("adapter" in key for key in state["model"])

    halves = work / "halves"
    with monkeypatch.context() as m, pytest.raises(RunStopped):
        signal_after_epoch(m, 0, signal.SIGTERM)
        pipeline.distill(load_config(overrides=[*runs["student"], f"out={halves}"]))
    stopped = load_checkpoint(halves / "last.pt")
    first = stopped["kd_parts"]
    stripped = shutil.copytree(halves, work / "stripped")  # a checkpoint without the adapters
    save_checkpoint({k: v for k, v in stopped.items() if k != "kd_parts"}, stripped / "last.pt")
    message = (
        f"^{re.escape(str(stripped / 'last.pt'))} holds no state of the KD loss's trainable "
        r"parts \(feature adapters\), which this run has: it cannot resume exactly; start it again$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.resume(stripped)
    foreign = shutil.copytree(halves, work / "foreign")  # adapters with a bias, as once saved
    biased = {**stopped["kd_parts"], "adapters.0.0.bias": torch.zeros(96)}
    save_checkpoint({**stopped, "kd_parts": biased}, foreign / "last.pt")
    message = (
        f"^{re.escape(str(foreign / 'last.pt'))} holds a state of the KD loss's trainable parts "
        r"that does not fit this run's \(Error\(s\) in loading state_dict for FeatureAdapters: "
        r'Unexpected key\(s\) in state_dict: "adapters\.0\.0\.bias"\.\): it cannot resume; '
        "start it again$"
    )
    with pytest.raises(QatkdError, match=message):
        pipeline.resume(foreign)
    pipeline.resume(halves)
    resumed = load_checkpoint(halves / "last.pt")
    for key, value in state["kd_parts"].items():
        assert torch.equal(resumed["kd_parts"][key], value), key
        assert not torch.equal(first[key], value), key  # the second epoch moved them
    for key, value in state["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_heldout_gor_per_teacher_trains_a_detector(runs) -> None:
    """GoR form heldout with a weight per teacher (k+1 = 3) on detection batches: the held-out
    pass runs the detector's own loss and measures every term's alignment."""
    work = Path(runs["work"][0])
    teacher = work / "teacher" / "last.pt"
    out = work / "heldout"
    heldout = [
        "balancer.name=gor",
        "balancer.form=heldout",
        "balancer.every=1",
        "train.log_every=1",
    ]
    extra = [*heldout, "balancer.per_teacher=true", f"teachers=[{teacher},{teacher}]"]
    metrics = pipeline.distill(load_config(overrides=[*runs["student"], *extra, f"out={out}"]))[1]
    assert list(measured_alignments(out)) == ["align_ts", "align_kd0", "align_kd1"]
    assert metrics["final_w_kd0"] != 1.0 and metrics["final_align_ts"] != 0


def test_the_exported_student_has_no_adapter(runs) -> None:
    work = Path(runs["work"][0])
    graphs = {}
    for name, extra in (("features", []), ("no_features", ["kd.feature_weight=0"])):
        out = work / f"export_{name}"
        overrides = [*runs["student"], "train.epochs=1", *extra, f"out={out}"]
        pipeline.distill(load_config(overrides=overrides))
        pipeline.export(out)
        graphs[name] = onnx.load(str(out / "model.int8.onnx")).graph
        state = load_checkpoint(out / "last.pt")
        assert (state["kd_parts"] is None) == (name == "no_features")
    with_term, without = graphs["features"], graphs["no_features"]
    assert len(with_term.node) == len(without.node)
    assert sorted(i.name for i in with_term.initializer) == sorted(
        i.name for i in without.initializer
    )
