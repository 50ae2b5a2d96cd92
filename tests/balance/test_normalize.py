"""`balancer.normalize`: every GoR form's weights on the raw losses sum to 1, as fixed α's do,
the student is trained on exactly those weights, and the parameters keep their own objective."""

import math

import pytest
import torch

from qatkd.balance import BalancerConfig, GoR, build_balancer
from qatkd.errors import QatkdError

LOSSES = [2.0, 0.3, 0.7, 1.1]


def leaf(values: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(v, requires_grad=True) for v in values]


def run(gor: GoR, values: list[float], params: list[float]):
    """The total, ∂total/∂L_k and ∂total/∂param_k for `values` at parameters `params`."""
    with torch.no_grad():
        for p, v in zip(gor.params, params, strict=True):
            p.fill_(v)
    losses = leaf(values)
    total = gor(losses[0], losses[1:] if gor.per_teacher else losses[1])
    total.backward()
    d_params = [0.0 if p.grad is None else p.grad.item() for p in gor.params]
    return total.item(), [t.grad.item() for t in losses], d_params


def plain_weight(form: str, v: float) -> float:
    """Each form's weight, written out independently of the code."""
    if form == "kendall":
        return math.exp(-v)
    if form == "liebel":
        return 1 / (2 * v * v)
    return 2 / (1 + math.exp(v))  # heldout: 2·sigmoid(-s)


@pytest.mark.parametrize("form", ["kendall", "liebel", "heldout"])
@pytest.mark.parametrize("teachers", [None, 3])
def test_normalized_weights_sum_to_one_and_weigh_the_student(form, teachers):
    gor = GoR(form=form, num_teachers=teachers, normalize=True)
    terms = 2 if teachers is None else teachers + 1
    params = [0.7, 1.3, 0.4, 1.9][:terms] if form == "liebel" else [0.5, -1.2, 2.0, 0.1][:terms]
    values = LOSSES[:terms]
    total, d_losses, _ = run(gor, values, params)
    plain = [plain_weight(form, v) for v in params]
    expected = [w / sum(plain) for w in plain]
    assert d_losses == pytest.approx(expected, rel=1e-6)  # what the student's gradient sees
    assert list(gor.weights().values()) == pytest.approx(expected, rel=1e-6)
    assert sum(gor.weights().values()) == pytest.approx(1.0, rel=1e-6)
    assert total == pytest.approx(sum(w * x for w, x in zip(expected, values, strict=True)))


def test_normalized_kendall_keeps_kendalls_parameter_gradient():
    """The ratio kendall settles at is unchanged: its parameters still get 1 - e^{-s}·L."""
    s = [0.5, -1.0]
    _, _, d_params = run(GoR(normalize=True), LOSSES[:2], s)
    assert d_params == pytest.approx(
        [1 - math.exp(-v) * x for v, x in zip(s, LOSSES[:2], strict=True)]
    )


def test_normalized_scale_aware_weights_are_the_effective_ones_rescaled():
    gor = GoR(form="kendall", scale="initial", normalize=True)
    _, d_losses, _ = run(gor, LOSSES[:2], [0.0, 0.0])
    effective = [1 / 2.0, 1 / 0.3]  # e^0 divided by each loss's first value
    expected = [w / sum(effective) for w in effective]
    assert d_losses == pytest.approx(expected, rel=1e-6)
    assert list(gor.weights().values()) == pytest.approx(expected, rel=1e-6)


def test_without_normalize_nothing_changes():
    """Old runs are unchanged: kendall's total is its objective, weights unrescaled."""
    total, d_losses, _ = run(GoR(), LOSSES[:2], [0.5, -1.0])
    assert total == pytest.approx(math.exp(-0.5) * 2.0 + math.exp(1.0) * 0.3 - 0.5)
    assert d_losses == pytest.approx([math.exp(-0.5), math.exp(1.0)])
    assert BalancerConfig().normalize is False


def test_normalize_needs_gor():
    with pytest.raises(QatkdError, match=r"^balancer\.normalize=true needs balancer\.name=gor"):
        build_balancer(BalancerConfig(name="fixed", normalize=True), 1)


def test_gor_builds_with_normalize():
    """The config's normalize reaches GoR: the one balancer it is meant for is not refused."""
    gor = build_balancer(BalancerConfig(normalize=True), 1)
    assert isinstance(gor, GoR) and gor.normalize
    run(gor, LOSSES[:2], [0.5, -1.2])
    assert sum(gor.weights().values()) == pytest.approx(1.0, rel=1e-6)  # e^-0.5 + e^1.2 unscaled
