import pytest
import torch
from torch import nn

from qatkd.balance import alignments, grad_conflict
from qatkd.balance.diagnostics import dot


def losses() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    return model, model(torch.randn(6, 3)).pow(2).mean()


def test_identical_losses_have_cosine_one() -> None:
    model, loss = losses()
    stats = grad_conflict(loss, 2 * loss, model.parameters())
    assert stats["grad_cosine"] == pytest.approx(1.0)
    assert stats["grad_ratio"] == pytest.approx(0.5)
    assert stats["grad_norm_kd"] == pytest.approx(2 * stats["grad_norm_ts"])
    loss.backward()  # the graph survives for the training step
    assert model[0].weight.grad is not None


def test_opposite_losses_have_cosine_minus_one() -> None:
    model, loss = losses()
    assert grad_conflict(loss, -loss, model.parameters())["grad_cosine"] == pytest.approx(-1.0)


def test_per_teacher_terms_count_as_their_sum() -> None:
    model, loss = losses()
    stats = grad_conflict(loss, [loss, 2 * loss], model.parameters())
    assert stats["grad_ratio"] == pytest.approx(1 / 3)


def test_without_a_kd_loss_it_is_one_clear_error() -> None:
    model, loss = losses()
    with pytest.raises(ValueError, match=r"^grad_conflict needs a KD loss$"):
        grad_conflict(loss, None, model.parameters())


def test_parameters_only_one_loss_reaches_count_in_that_loss_alone() -> None:
    """A head that only L_TS uses and one that only L_KD uses (a student's task head and a
    distillation head on a shared trunk): each norm covers what its loss reaches, the cosine
    only the shared trunk."""
    torch.manual_seed(0)
    trunk, head_ts, head_kd = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    features = trunk(torch.randn(6, 3))
    l_ts, l_kd = head_ts(features).pow(2).mean(), head_kd(features).pow(2).mean()
    params = [*trunk.parameters(), *head_ts.parameters(), *head_kd.parameters()]
    stats = grad_conflict(l_ts, l_kd, params)
    reached_ts, reached_kd = [*trunk.parameters(), *head_ts.parameters()], [*trunk.parameters()]
    reached_kd += head_kd.parameters()
    g_ts = torch.autograd.grad(l_ts, reached_ts, retain_graph=True)
    g_kd = torch.autograd.grad(l_kd, reached_kd, retain_graph=True)
    norm_ts = torch.sqrt(sum(g.double().pow(2).sum() for g in g_ts))
    norm_kd = torch.sqrt(sum(g.double().pow(2).sum() for g in g_kd))
    dot = sum((a.double() * b.double()).sum() for a, b in zip(g_ts[:2], g_kd[:2], strict=True))
    assert stats["grad_norm_ts"] == pytest.approx(norm_ts.item())
    assert stats["grad_norm_kd"] == pytest.approx(norm_kd.item())
    assert stats["grad_ratio"] == pytest.approx((norm_ts / norm_kd).item())
    assert stats["grad_cosine"] == pytest.approx((dot / (norm_ts * norm_kd)).item())


def test_dot_is_float64_even_when_no_entry_is_shared() -> None:
    """⟨a, b⟩ of float32 gradients is float64, and stays float64 (an exact zero) when no
    parameter has an entry in both: a missing entry counts as zeros."""
    g = torch.tensor([1.0, 2.0])
    both = dot([g, None], [3 * g, g])
    assert both.dtype == torch.float64 and both.item() == 15.0
    disjoint = dot([g, None], [None, g])
    assert disjoint.dtype == torch.float64 and disjoint.item() == 0.0


def test_alignments_refuse_a_held_out_gradient_over_other_parameters() -> None:
    """A held-out gradient with fewer entries than the parameters is an error, not a cosine
    over the entries the two happen to share."""
    p1, p2 = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    term = (p1 - p2).sum()
    with pytest.raises(ValueError, match=r"^zip\(\) argument 2 is longer than argument 1$"):
        alignments([torch.ones(2)], [term], [p1, p2])
