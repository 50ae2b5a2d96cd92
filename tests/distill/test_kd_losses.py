import warnings

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
    """Zero up to float32 rounding of the log-probabilities, times tau^2 = 16."""
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    assert kd_kl(logits, soften(logits, 4.0), 4.0).abs().item() < 1e-5


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


# The ensemble losses against formulas written out here, with torch.softmax and explicit sums:
# never the module's own soften / combined_target / kd_kl (design §1.4: one KD term on the mean
# of the teachers' softened probabilities; MSE on the mean of their logits).


def by_hand_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_c p_c (ln p_c - ln q_c) for each row of two [N, C] distributions."""
    return (p * (p.log() - q.log())).sum(dim=-1)


def ensemble_logits(k: int, rows: int = 6, classes: int = 5) -> tuple[torch.Tensor, list]:
    generator = torch.Generator().manual_seed(k)
    student = torch.randn(rows, classes, generator=generator) * 2
    teachers = [torch.randn(rows, classes, generator=generator) * 3 for _ in range(k)]
    return student, teachers


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("loss", ["kl", "reverse_kl"])
def test_ensemble_kl_is_tau_squared_kl_to_the_mean_of_softened_probabilities(
    k: int, tau: float, loss: str
) -> None:
    student, teachers = ensemble_logits(k)
    p_mean = sum(torch.softmax(t / tau, dim=-1) for t in teachers) / k
    q = torch.softmax(student / tau, dim=-1)
    per_row = by_hand_kl(p_mean, q) if loss == "kl" else by_hand_kl(q, p_mean)
    expected = tau**2 * per_row.sum() / student.shape[0]
    got = build_kd_loss(KDConfig(loss=loss, temperature=tau))(student, teachers)
    torch.testing.assert_close(got, expected)
    # the other rule, softmax of the mean logits, gives a clearly different loss on these logits
    p_of_mean = torch.softmax(sum(teachers) / k / tau, dim=-1)
    other = by_hand_kl(p_of_mean, q) if loss == "kl" else by_hand_kl(q, p_of_mean)
    assert abs(tau**2 * other.mean().item() - expected.item()) > 1e-3 * tau**2


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("loss", ["kl", "reverse_kl"])
def test_per_teacher_kl_terms_are_each_teachers_own_tau_squared_kl(k: int, loss: str) -> None:
    tau = 3.0
    student, teachers = ensemble_logits(k)
    q = torch.softmax(student / tau, dim=-1)
    terms = build_kd_loss(KDConfig(loss=loss, temperature=tau), per_teacher=True)(student, teachers)
    assert isinstance(terms, list) and len(terms) == k
    for term, teacher in zip(terms, teachers, strict=True):
        p = torch.softmax(teacher / tau, dim=-1)
        per_row = by_hand_kl(p, q) if loss == "kl" else by_hand_kl(q, p)
        torch.testing.assert_close(term, tau**2 * per_row.mean())


@pytest.mark.parametrize("k", [2, 3])
def test_mse_ensemble_and_per_teacher_by_hand(k: int) -> None:
    student, teachers = ensemble_logits(k)
    mean_logits = sum(teachers) / k
    expected = ((student - mean_logits) ** 2).sum() / student.numel()
    mse = build_kd_loss(KDConfig(loss="mse", temperature=4.0))
    torch.testing.assert_close(mse(student, teachers), expected)  # no τ in MSE
    terms = build_kd_loss(KDConfig(loss="mse"), per_teacher=True)(student, teachers)
    assert len(terms) == k
    for term, teacher in zip(terms, teachers, strict=True):
        torch.testing.assert_close(term, ((student - teacher) ** 2).sum() / student.numel())


def test_tau_squared_scaling_by_hand() -> None:
    """τ² multiplies the KL of the softened distributions: at τ = 1 the plain KL, at τ = 4
    sixteen times the KL of the τ = 4 softened distributions (and not 4 or 1 times it)."""
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, -0.5]])
    teacher = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.0]])
    for tau in (1.0, 4.0):
        p, q = torch.softmax(teacher / tau, dim=-1), torch.softmax(student / tau, dim=-1)
        raw = (p * (p / q).log()).sum() / 2
        got = build_kd_loss(KDConfig(temperature=tau))(student, [teacher])
        assert got.item() == pytest.approx(tau**2 * raw.item(), rel=1e-5)
        assert raw.item() > 1e-3  # a nonzero KL, so τ² and τ would differ


def test_token_level_ensemble_by_hand() -> None:
    """[B, T, C] logits of a language model: every (b, t) row counts once in the mean."""
    tau = 2.0
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(2, 3, 6, generator=generator)
    teachers = [torch.randn(2, 3, 6, generator=generator) * 2 for _ in range(2)]
    p_mean = (torch.softmax(teachers[0] / tau, -1) + torch.softmax(teachers[1] / tau, -1)) / 2
    q = torch.softmax(student / tau, dim=-1)
    expected = tau**2 * (p_mean * (p_mean.log() - q.log())).sum() / 6
    got = build_kd_loss(KDConfig(temperature=tau))(student, teachers)
    torch.testing.assert_close(got, expected)


def test_kd_loss_defaults_are_the_config_defaults() -> None:
    """KLLoss() directly (the Python API) is `kd:` left at its defaults: τ = 4, one term."""
    from qatkd.distill import KLLoss

    torch.manual_seed(0)
    student, teachers = torch.randn(3, 5), [torch.randn(3, 5), torch.randn(3, 5)]
    loss = KLLoss()
    assert loss.temperature == KDConfig().temperature == 4.0 and loss.per_teacher is False
    expected = build_kd_loss(KDConfig())(student, teachers)
    torch.testing.assert_close(loss(student, teachers), expected)


def test_no_teacher_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"^KD needs the logits of at least one teacher$"):
        build_kd_loss(KDConfig())(torch.zeros(2, 3), [])


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "mse"])
def test_kd_losses_run_without_warnings(loss: str) -> None:
    """No deprecated calls (an implicit softmax dimension warns, and would pick the wrong one
    for 3-D logits)."""
    student, teachers = ensemble_logits(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_kd_loss(KDConfig(loss=loss))(student, teachers)
