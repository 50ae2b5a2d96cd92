import pytest
import torch
from pydantic import ValidationError

from qatkd.distill import KDConfig, build_kd_loss, kd_kl, kd_mse, soften
from qatkd.errors import QatkdError


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    p_t = torch.softmax(teacher / tau, dim=-1)
    log_p_s = torch.log_softmax(student / tau, dim=-1)
    return (p_t * (p_t.log() - log_p_s)).sum() * tau**2 / student.shape[0]


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_kl_equals_reference_formula(tau: float) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    loss = kd_kl(student, soften(teacher, tau), tau)
    torch.testing.assert_close(loss, reference_kl(student, teacher, tau))


def test_kd_kl_is_zero_for_identical_logits() -> None:
    logits = torch.randn(4, 10)
    assert kd_kl(logits, soften(logits, 4.0), 4.0).abs().item() < 1e-6


def test_token_level_logits_are_flattened_to_rows() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    loss = kd_kl(student, soften(teacher, 2.0), 2.0)
    torch.testing.assert_close(
        loss, reference_kl(student.reshape(6, 6), teacher.reshape(6, 6), 2.0)
    )


def test_kd_mse_is_mean_squared_logit_difference() -> None:
    student, teacher = (
        torch.tensor([[1.0, 2.0], [0.0, -1.0]]),
        torch.tensor([[0.0, 2.0], [2.0, 0.0]]),
    )
    torch.testing.assert_close(kd_mse(student, teacher), torch.tensor((1 + 0 + 4 + 1) / 4))


def test_ensemble_target_is_a_distribution_and_one_teacher_is_itself() -> None:
    torch.manual_seed(0)
    kl = build_kd_loss(KDConfig(temperature=3.0))
    teachers = [torch.randn(4, 5) * 3 for _ in range(3)]
    target = kl.combined_target(teachers)
    assert (target >= 0).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(4))
    torch.testing.assert_close(kl.combined_target(teachers[:1]), soften(teachers[0], 3.0))
    student = torch.randn(4, 5)
    torch.testing.assert_close(kl(student, teachers), kd_kl(student, target, 3.0))


def test_per_teacher_gives_one_term_per_teacher() -> None:
    torch.manual_seed(0)
    student, teachers = torch.randn(4, 5), [torch.randn(4, 5) for _ in range(2)]
    terms = build_kd_loss(KDConfig(), per_teacher=True)(student, teachers)
    assert isinstance(terms, list) and len(terms) == 2
    for term, teacher in zip(terms, teachers, strict=True):
        torch.testing.assert_close(term, kd_kl(student, soften(teacher, 4.0), 4.0))


def test_mse_ensemble_targets_the_mean_logits() -> None:
    student, teachers = torch.zeros(2, 3), [torch.ones(2, 3), 3 * torch.ones(2, 3)]
    torch.testing.assert_close(
        build_kd_loss(KDConfig(loss="mse"))(student, teachers), torch.tensor(4.0)
    )


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"teacher 1 logits have shape \(2, 4\)"):
        build_kd_loss(KDConfig())(torch.zeros(2, 3), [torch.zeros(2, 3), torch.zeros(2, 4)])


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        KDConfig(temperature=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        KDConfig(tau=2.0)
    with pytest.raises(ValidationError, match="'kl', 'reverse_kl' or 'mse'"):
        KDConfig(loss="kll")


def test_registry_names_unknown_losses() -> None:
    from qatkd.distill import KD_LOSSES

    assert KD_LOSSES.names() == ["kl", "mse", "reverse_kl"]
    with pytest.raises(QatkdError, match="did you mean 'mse'"):
        KD_LOSSES.get("mes")
