"""Training learns: on data a resnet8 can learn in seconds (tests/testdata.py `make_textures`),
the training loss falls and the test accuracy beats always answering the most frequent class by
a wide margin, for FP32, QAT and distillation, through the real pipeline and engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qatkd import pipeline
from qatkd.artifacts import load_model
from qatkd.checkpoint import load_checkpoint
from qatkd.config import load_config
from qatkd.quant import is_quantized
from qatkd.tasks.classification.task import ClassificationTask
from qatkd.train.logs import read_csv
from testdata import learning_overrides, majority_share, permuted_teacher

MARGIN = 40.0
"""Points above the majority-class share (~40 %) a learned model must reach (it reaches ~100)."""


def step_losses(run_dir: Path, column: str = "loss") -> list[float]:
    return [row[column] for row in read_csv(run_dir / "steps.csv")]


def epoch_losses(run_dir: Path) -> list[float]:
    return [row["train_loss"] for row in read_csv(run_dir / "log.csv")]


def assert_falls(losses: list[float]) -> None:
    """The last 3 values under a third of the first 3 (a learning run ends under 10 %)."""
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) / 3, f"the loss did not fall: {losses}"


def assert_learned(run_dir: Path, metrics: dict, root: Path) -> None:
    """Training loss falls, step by step (steps.csv) and epoch by epoch (log.csv), and the test
    accuracy beats always answering the most frequent class by `MARGIN` points."""
    assert_falls(step_losses(run_dir))
    epochs = epoch_losses(run_dir)
    assert epochs[-1] < epochs[0] / 3, epochs
    assert metrics["test_acc"] >= majority_share(root) + MARGIN, metrics


def held_out(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(root / "test.npz") as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    return x[:, None].float() / 255, y


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100 * (a == b).float().mean().item()


def predictions(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(ckpt)
    with torch.no_grad():
        return model(x).argmax(-1)


def test_fp32_training_learns_and_eval_reproduces_it(learn_root: Path, learned_fp32: Path):
    metrics = json.loads((learned_fp32 / "metrics.json").read_text())
    assert_learned(learned_fp32, metrics, learn_root)
    evaluated = pipeline.evaluate(learned_fp32)
    assert evaluated["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-4)
    x, y = held_out(learn_root)
    accuracy = agreement(predictions(learned_fp32 / "last.pt", x), y)
    assert accuracy == pytest.approx(metrics["test_acc"], abs=1e-4)


@pytest.fixture
def test_split_logits(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The logits of each evaluation of a test split, in order, as the pipeline's model gave
    them (an extra eval-mode forward pass beside the real evaluation, which it leaves alone)."""
    seen: list[torch.Tensor] = []
    evaluate = ClassificationTask.evaluate

    def spy(self, model, loader, split="test"):
        if split == "test":
            was_training = model.training
            with torch.no_grad():
                seen.append(torch.cat([model.eval()(x) for x, *_ in loader]))
            model.train(was_training)
        return evaluate(self, model, loader, split)

    monkeypatch.setattr(ClassificationTask, "evaluate", spy)
    return seen


@pytest.mark.parametrize("bits", ["W4A4", "W8A8"])
def test_qat_from_scratch_learns_and_eval_reproduces_its_logits(
    learn_root: Path, tmp_path: Path, bits: str, test_split_logits: list[torch.Tensor]
):
    """The learned model's test logits at the end of training are those `qatkd eval` computes
    from last.pt (quantizer steps and BatchNorm statistics restored), and those of the model
    `load_model` gives."""
    config = load_config(
        overrides=learning_overrides(learn_root, tmp_path / "qat", f"quant.bits={bits}")
    )
    run_dir, metrics = pipeline.train(config)
    model = load_model(run_dir / "last.pt")[0]
    assert is_quantized(model)
    assert_learned(run_dir, metrics, learn_root)
    assert len(test_split_logits) == 5  # one test evaluation an epoch
    trained = test_split_logits[-1]
    assert pipeline.evaluate(run_dir)["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-4)
    evaluated = test_split_logits[5]
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(held_out(learn_root)[0]), trained, rtol=0, atol=1e-5)


def test_a_kd_only_student_learns_its_teachers_answers_not_the_labels(
    learn_root: Path, learned_fp32: Path, tmp_path: Path
):
    """The teacher answers (c+1) % 3 for class c; a W4A4 student from scratch that learns from the
    teacher alone (no label term) takes its answers: all wrong, where a student trained on the
    labels gets ~100 % (test_qat_from_scratch_learns_and_eval_reproduces_its_logits)."""
    x, y = held_out(learn_root)
    teacher = permuted_teacher(learned_fp32, tmp_path / "permuted.pt")
    teacher_says = predictions(teacher, x)
    assert agreement(teacher_says, (y + 1) % 3) >= 90
    overrides = learning_overrides(
        learn_root,
        tmp_path / "kd",
        "quant.bits=W4A4",
        f"teachers=[{teacher}]",
        "balancer.name=kd_only",
    )
    run_dir, metrics = pipeline.distill(load_config(overrides=overrides))
    assert_falls(step_losses(run_dir, "l_kd"))
    assert agreement(predictions(run_dir / "last.pt", x), teacher_says) >= 90
    assert metrics["test_acc"] <= 10


def test_a_gor_student_learns_from_labels_and_teachers(
    learn_root: Path, learned_fp32: Path, tmp_path: Path
):
    """The default distillation (GoR, kendall) of a W4A4 student from scratch with two teachers:
    both its losses fall, it beats the majority class and answers what its teachers answer."""
    teacher = learned_fp32 / "last.pt"
    overrides = learning_overrides(
        learn_root, tmp_path / "gor", "quant.bits=W4A4", f"teachers=[{teacher},{teacher}]"
    )
    run_dir, metrics = pipeline.distill(load_config(overrides=overrides))
    assert_falls(step_losses(run_dir, "l_ts"))
    assert_falls(step_losses(run_dir, "l_kd"))
    assert metrics["test_acc"] >= majority_share(learn_root) + MARGIN, metrics
    x, _ = held_out(learn_root)
    assert agreement(predictions(run_dir / "last.pt", x), predictions(teacher, x)) >= 90


def test_bf16_autocast_trains_on_the_cpu(
    learn_root: Path, learned_fp32: Path, tmp_path: Path, monkeypatch
):
    """`train.bf16=true` on the CPU: the forward pass runs in bfloat16 (autocast), the run learns,
    and its weights are not those of the same run in float32 (learned_fp32)."""
    from qatkd.tasks.classification.task import ClassificationTask

    dtypes = set()
    task_loss = ClassificationTask.task_loss

    def recording(self, outputs, batch):
        dtypes.add(outputs.dtype)
        return task_loss(self, outputs, batch)

    monkeypatch.setattr(ClassificationTask, "task_loss", recording)
    overrides = learning_overrides(learn_root, tmp_path / "bf16", "train.bf16=true")
    run_dir, metrics = pipeline.train(load_config(overrides=overrides))
    assert dtypes == {torch.bfloat16}
    assert_learned(run_dir, metrics, learn_root)
    bf16, fp32 = (load_checkpoint(r / "last.pt")["model"] for r in (run_dir, learned_fp32))
    assert bf16.keys() == fp32.keys()
    assert not all(torch.equal(bf16[k], fp32[k]) for k in fp32)
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items())  # float32 weights kept


def reverse_kl(student: np.ndarray, teacher: np.ndarray, tau: float) -> float:
    """τ²·KL(softmax(s/τ) || softmax(t/τ)), averaged over rows: written out here."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z / tau
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    log_s, log_t = log_softmax(student), log_softmax(teacher)
    return float((np.exp(log_s) * (log_s - log_t)).sum(axis=1).mean() * tau**2)


def mse(student: np.ndarray, teacher: np.ndarray, tau: float) -> float:
    return float(((student - teacher) ** 2).mean())


@pytest.mark.parametrize(
    ("loss", "formula"), [("mse", mse), ("reverse_kl", reverse_kl)], ids=["mse", "reverse_kl"]
)
def test_distill_with_another_kd_loss_logs_its_formula_and_learns(
    learn_root: Path, learned_fp32: Path, tmp_path: Path, monkeypatch, loss, formula
):
    """`kd.loss=mse` / `reverse_kl` through `qatkd distill`: every step's l_kd in steps.csv is
    the loss's formula (computed here, in float64) on that step's student and teacher logits,
    and it falls."""
    from qatkd.cli import main
    from qatkd.tasks.classification.task import ClassificationTask

    seen = []
    kd_loss = ClassificationTask.kd_loss

    def recording(self, outputs, teacher_outputs):
        seen.append((outputs.detach().double().numpy(), teacher_outputs[0].double().numpy()))
        return kd_loss(self, outputs, teacher_outputs)

    monkeypatch.setattr(ClassificationTask, "kd_loss", recording)
    out = tmp_path / loss
    teacher = f"teachers=[{learned_fp32 / 'last.pt'}]"
    argv = learning_overrides(learn_root, out, teacher, f"kd.loss={loss}")
    assert main(["--quiet", "distill", *argv]) == 0
    assert (out / "metrics.json").is_file()
    logged = step_losses(out, "l_kd")
    assert len(logged) == len(seen) == 35
    tau = load_config(out / "config.yaml").kd.temperature
    assert tau == 4.0
    expected = [formula(student, teacher, tau) for student, teacher in seen]
    assert logged == pytest.approx(expected, rel=2e-5, abs=1e-6)
    assert_falls(logged)
