import pytest
import torch
from torch import nn

from qatkd.balance import grad_conflict


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
