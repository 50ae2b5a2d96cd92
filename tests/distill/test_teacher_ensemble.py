import pytest
import torch
from torch import nn

from qatkd.distill import KDConfig, TeacherEnsemble, build_kd_loss
from qatkd.errors import QatkdError


def make_teachers(num_classes: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
    return [nn.Linear(4, num_classes), nn.Sequential(mlp, nn.Linear(8, num_classes))]


def test_teachers_stay_frozen_and_in_eval_mode() -> None:
    ensemble = TeacherEnsemble(make_teachers())
    parent = nn.ModuleDict({"teachers": ensemble, "student": nn.Linear(4, 3)})
    parent.train()
    assert parent["student"].training
    assert not any(m.training for m in ensemble.modules())
    assert not any(p.requires_grad for p in ensemble.parameters())
    x = torch.randn(5, 4)
    first, second = ensemble(x), ensemble(x)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_student_gradient_flows_through_kd_with_teacher_outputs(loss: str) -> None:
    ensemble, student = TeacherEnsemble(make_teachers()), nn.Linear(4, 3)
    x = torch.randn(5, 4)
    teacher_logits = ensemble(x)
    assert [t.shape for t in teacher_logits] == [torch.Size([5, 3])] * 2
    for per_teacher in (False, True):
        kd = build_kd_loss(KDConfig(loss=loss), per_teacher=per_teacher)(student(x), teacher_logits)
        total = sum(kd) if isinstance(kd, list) else kd
        student.zero_grad()
        total.backward()
        assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0


def test_mismatched_teacher_names_index_and_class_counts() -> None:
    teachers = [*make_teachers(3), nn.Linear(4, 5)]
    ensemble = TeacherEnsemble(teachers, names=["a.pt", "b.pt", "c.pt"])
    with pytest.raises(
        QatkdError, match=r"^teacher 2 \(c.pt\) outputs 5 classes but the student has 3"
    ):
        ensemble.check_num_classes(3, torch.randn(1, 4))
    TeacherEnsemble(make_teachers(3)).check_num_classes(3, torch.randn(1, 4))


def test_empty_ensemble_is_a_clear_error() -> None:
    with pytest.raises(QatkdError, match=r"teacher ensemble is empty: set teachers=\[\.\.\.\]"):
        TeacherEnsemble([])


def test_labels_and_mismatched_names() -> None:
    assert TeacherEnsemble(make_teachers()).labels == ["teacher 0", "teacher 1"]
    assert TeacherEnsemble(make_teachers(), names=["a", "b"]).labels == [
        "teacher 0 (a)",
        "teacher 1 (b)",
    ]
    with pytest.raises(ValueError, match=r"^1 names for 2 teachers$"):
        TeacherEnsemble(make_teachers(), names=["a"])
    with pytest.raises(QatkdError) as error:
        TeacherEnsemble([])
    assert str(error.value) == "the teacher ensemble is empty: set teachers=[...]"


def test_class_count_is_the_last_dimension_of_token_level_logits() -> None:
    """Language teachers give [B, T, C]: the classes are C, not T."""
    tokens = torch.randn(1, 5, 4)  # T = 5 tokens of 4 features
    TeacherEnsemble([nn.Linear(4, 3)]).check_num_classes(3, tokens)
    with pytest.raises(QatkdError, match=r"^teacher 1 outputs 7 classes but the student has 3"):
        TeacherEnsemble([nn.Linear(4, 3), nn.Linear(4, 7)]).check_num_classes(3, tokens)
