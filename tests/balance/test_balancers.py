import math

import pytest
import torch
from pydantic import ValidationError

from qatkd.balance import BALANCERS, KENDALL_BOUND, BalancerConfig, Fixed, GoR, build_balancer
from qatkd.errors import QatkdError

L_TS, L_KD = torch.tensor(2.0), torch.tensor(0.3)


def set_params(gor: GoR, values: list[float]) -> None:
    with torch.no_grad():
        for p, v in zip(gor.params, values, strict=True):
            p.fill_(v)


def build(num_teachers: int = 1, **config: object):
    return build_balancer(BalancerConfig(**config), num_teachers)


def test_registry_names() -> None:
    assert BALANCERS.names() == ["fixed", "gor", "kd_only", "ts_only"]


@pytest.mark.parametrize(
    ("config", "expected", "weights"),
    [
        ({"name": "ts_only"}, 2.0, {"w_ts": 1.0, "w_kd": 0.0}),
        ({"name": "kd_only"}, 0.3, {"w_ts": 0.0, "w_kd": 1.0}),
        ({"name": "fixed", "alpha": 0.25}, 0.75 * 2.0 + 0.25 * 0.3, {"w_ts": 0.75, "w_kd": 0.25}),
    ],
)
def test_fixed_balancers_follow_their_formula(config: dict, expected: float, weights: dict) -> None:
    balancer = build(**config)
    assert balancer.forward(L_TS, L_KD).item() == pytest.approx(expected)
    assert balancer.weights() == pytest.approx(weights)
    assert balancer.param_groups(None, 0.1) == []


def test_ts_only_needs_no_teacher() -> None:
    balancer = build(num_teachers=0, name="ts_only")
    assert not balancer.needs_teacher
    assert balancer(L_TS, None).item() == 2.0
    assert build(name="fixed").needs_teacher


def test_gor_liebel_formula() -> None:
    gor = GoR(form="liebel")
    assert gor.weights() == pytest.approx({"w_ts": 0.5, "w_kd": 0.5})
    set_params(gor, [2.0, 0.5])
    expected = 2.0 / (2 * 4) + math.log(1 + 4) + 0.3 / (2 * 0.25) + math.log(1 + 0.25)
    assert gor(L_TS, L_KD).item() == pytest.approx(expected)
    assert gor.weights() == pytest.approx({"w_ts": 1 / 8, "w_kd": 2.0})


def test_gor_kendall_is_the_default_form() -> None:
    assert GoR().form == "kendall" and BalancerConfig().form == "kendall"


def test_gor_kendall_formula_and_bound() -> None:
    gor = GoR(form="kendall")
    assert gor.weights() == pytest.approx({"w_ts": 1.0, "w_kd": 1.0})
    set_params(gor, [0.5, -1.0])
    expected = math.exp(-0.5) * 2.0 + math.exp(1.0) * 0.3 + 0.5 - 1.0
    assert gor(L_TS, L_KD).item() == pytest.approx(expected)
    set_params(gor, [7.0, -9.0])
    assert gor.weights() == pytest.approx({"w_ts": math.exp(-5), "w_kd": math.exp(5)})
    gor(L_TS, L_KD).backward()
    assert [p.item() for p in gor.params] == [KENDALL_BOUND, -KENDALL_BOUND]
    assert all(p.grad.abs().item() > 0 for p in gor.params)  # projected, not stuck outside


def test_gor_has_exactly_two_trainable_scalars_that_get_gradients() -> None:
    gor = GoR()
    params = [p for p in gor.parameters() if p.requires_grad]
    assert len(params) == 2 and all(p.dim() == 0 and p.dtype == torch.float32 for p in params)
    gor(L_TS, L_KD).backward()
    assert all(p.grad is not None and p.grad.item() != 0 for p in params)


@pytest.mark.parametrize("form", ["liebel", "kendall"])
def test_gor_converges_to_the_analytic_optimum(form: str) -> None:
    gor = GoR(form=form)
    optimizer = torch.optim.Adam(gor.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        gor(L_TS, L_KD).backward()
        optimizer.step()
    if form == "liebel":
        optimum = {
            f"w_{k}": 1 / (2 * (v + math.sqrt(v * v + 8 * v)) / 4)
            for k, v in (("ts", 2.0), ("kd", 0.3))
        }
    else:
        optimum = {"w_ts": 1 / 2.0, "w_kd": 1 / 0.3}
    weights = gor.weights()
    assert weights == pytest.approx(optimum, rel=1e-3)
    assert weights["w_ts"] < weights["w_kd"]  # the larger loss ends with the smaller weight


def test_per_teacher_gor_has_one_weight_per_teacher() -> None:
    gor = build(num_teachers=3, per_teacher=True)
    assert sum(p.numel() for p in gor.parameters()) == 4 and gor.per_teacher
    assert list(gor.weights()) == ["w_ts", "w_kd0", "w_kd1", "w_kd2"]
    terms = [torch.tensor(0.1), torch.tensor(0.2), torch.tensor(0.4)]
    expected = 2.0 + 0.7  # kendall at s = 0: every weight 1, the regularizer 0
    assert gor(L_TS, terms).item() == pytest.approx(expected)
    with pytest.raises(TypeError, match="takes a list of 3 KD losses"):
        gor(L_TS, terms[:2])
    with pytest.raises(TypeError, match="takes one KD loss tensor, got list"):
        GoR()(L_TS, terms)


def test_state_dict_round_trip_restores_parameters() -> None:
    trained = build(num_teachers=2, per_teacher=True, form="kendall")
    set_params(trained, [0.1, 0.2, 0.3])
    restored = build(num_teachers=2, per_teacher=True, form="kendall")
    restored.load_state_dict(trained.state_dict())
    assert restored.weights() == trained.weights()


def test_param_group_has_no_decay_and_its_own_lr() -> None:
    gor = GoR()
    (group,) = gor.param_groups(None, 0.1)
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.0
    assert gor.param_groups(0.01, 0.1)[0]["lr"] == 0.01
    torch.optim.SGD(gor.param_groups(None, 0.1), lr=1.0, weight_decay=0.5)


def test_clear_errors() -> None:
    with pytest.raises(
        QatkdError, match=r"^balancer 'gor' needs at least one teacher: set teachers"
    ):
        build(num_teachers=0)
    with pytest.raises(QatkdError, match=r"per_teacher=true needs balancer\.name=gor, not 'fixed'"):
        build(num_teachers=2, name="fixed", per_teacher=True)
    with pytest.raises(ValidationError, match=r"unknown balancer 'gorr' \(did you mean 'gor'\?\)"):
        BalancerConfig(name="gorr")
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        BalancerConfig(alpha=1.5)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        BalancerConfig(weight=0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        Fixed(-0.1)


def test_scale_aware_gor_divides_each_loss_by_its_first_value() -> None:
    gor = build(form="liebel", scale="initial")
    first = 0.5 * 1.0 + math.log(2) + 0.5 * 1.0 + math.log(2)  # both losses become 1
    assert gor(L_TS, L_KD).item() == pytest.approx(first)
    assert gor.weights() == pytest.approx({"w_ts": 0.5 / 2.0, "w_kd": 0.5 / 0.3})
    later = 0.5 * 2.0 + 0.5 * 2.0 + 2 * math.log(2)  # the estimate stays at the first values
    assert gor(2 * L_TS, 2 * L_KD).item() == pytest.approx(later)
    assert gor.loss_sizes.tolist() == pytest.approx([2.0, 0.3])


def test_running_scale_is_a_bias_corrected_mean_updated_in_training_only() -> None:
    gor = build(form="liebel", scale="running")
    gor.eval()
    assert gor(L_TS, L_KD).item() == pytest.approx(1.0 + 2 * math.log(2))  # no estimate yet
    assert gor.size_updates.item() == 0
    gor.train()
    gor(L_TS, L_KD)
    gor(2 * L_TS, 2 * L_KD)
    m = 0.99
    mean = (m * (1 - m) * 2.0 + (1 - m) * 4.0) / (1 - m**2)  # the task loss's estimate
    assert gor.weights()["w_ts"] == pytest.approx(0.5 / mean, rel=1e-5)  # float32 buffers
    restored = build(form="liebel", scale="running")
    restored.load_state_dict(gor.state_dict())  # the estimate is saved and resumed
    assert restored.weights() == pytest.approx(gor.weights())


def test_scale_aware_gor_equalises_the_weighted_losses() -> None:
    """Plain GoR ends with w·L ∝ √L (the smaller loss weighted up but contributing less); with
    the losses' scale divided out, both contribute alike, whatever their size."""
    gor = build(scale="running")
    optimizer = torch.optim.Adam(gor.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        gor(L_TS, L_KD).backward()
        optimizer.step()
    weights = gor.weights()
    assert weights["w_ts"] * 2.0 == pytest.approx(weights["w_kd"] * 0.3, rel=1e-3)


def test_scale_needs_gor() -> None:
    with pytest.raises(QatkdError, match=r"balancer\.scale=initial needs balancer\.name=gor"):
        build(name="fixed", scale="initial")
    with pytest.raises(ValidationError):
        BalancerConfig(scale="median")


def grads(gor: GoR, l_ts: torch.Tensor, l_kd) -> tuple[float, list[float], list[float]]:
    """The balanced loss, its gradient w.r.t. GoR's parameters and w.r.t. each loss term."""
    losses = [l_ts.clone().requires_grad_(), *(t.clone().requires_grad_() for t in l_kd)]
    kd = losses[1:] if gor.per_teacher else losses[1]
    total = gor(losses[0], kd)
    total.backward()
    return total.item(), [p.grad.item() for p in gor.params], [t.grad.item() for t in losses]


@pytest.mark.parametrize("s", [[0.0, 0.0], [0.5, -1.0], [-2.0, 3.0]])
def test_kendall_gradients_are_the_closed_form(s: list[float]) -> None:
    """L = e^{-s_ts}·L_ts + e^{-s_kd}·L_kd + s_ts + s_kd: ∂L/∂s_i = 1 - e^{-s_i}·L_i, and the
    model's losses are weighted by ∂L/∂L_i = e^{-s_i}."""
    gor = GoR(form="kendall")
    set_params(gor, s)
    total, d_params, d_losses = grads(gor, L_TS, [L_KD])
    losses = [L_TS.item(), L_KD.item()]
    assert total == pytest.approx(sum(math.exp(-v) * x + v for v, x in zip(s, losses, strict=True)))
    assert d_params == pytest.approx([1 - math.exp(-v) * x for v, x in zip(s, losses, strict=True)])
    assert d_losses == pytest.approx([math.exp(-v) for v in s])


@pytest.mark.parametrize("sigma", [[1.0, 1.0], [2.0, 0.5], [0.3, 1.7]])
def test_liebel_gradients_are_the_closed_form(sigma: list[float]) -> None:
    """L = Σ L_i/(2σ_i²) + ln(1+σ_i²): ∂L/∂σ_i = -L_i/σ_i³ + 2σ_i/(1+σ_i²), ∂L/∂L_i = 1/(2σ_i²)."""
    gor = GoR(form="liebel")
    set_params(gor, sigma)
    total, d_params, d_losses = grads(gor, L_TS, [L_KD])
    losses = [L_TS.item(), L_KD.item()]
    expected = sum(
        x / (2 * v * v) + math.log(1 + v * v) for v, x in zip(sigma, losses, strict=True)
    )
    assert total == pytest.approx(expected)
    assert d_params == pytest.approx(
        [-x / v**3 + 2 * v / (1 + v * v) for v, x in zip(sigma, losses, strict=True)]
    )
    assert d_losses == pytest.approx([1 / (2 * v * v) for v in sigma])


def test_kendall_projects_into_the_bound_and_differentiates_there() -> None:
    """Parameters outside [-5, 5] are moved onto the bound before the loss is computed: the value
    and the gradients are those at ±5 (not zero, as a clamp inside the graph would give), and a
    parameter inside the bound is left alone."""
    gor = GoR(form="kendall")
    set_params(gor, [7.0, -9.0])
    total, d_params, d_losses = grads(gor, L_TS, [L_KD])
    b = KENDALL_BOUND
    assert b == 5.0
    assert total == pytest.approx(math.exp(-b) * 2.0 + math.exp(b) * 0.3 + b - b)
    assert d_params == pytest.approx([1 - math.exp(-b) * 2.0, 1 - math.exp(b) * 0.3])
    assert d_losses == pytest.approx([math.exp(-b), math.exp(b)])
    set_params(gor, [4.9, -4.9])
    gor(L_TS, L_KD)
    assert [p.item() for p in gor.params] == pytest.approx([4.9, -4.9])
    liebel = GoR(form="liebel")
    set_params(liebel, [7.0, 0.1])
    liebel(L_TS, L_KD)  # liebel's σ has no bound
    assert [p.item() for p in liebel.params] == pytest.approx([7.0, 0.1])


def test_an_optimizer_step_on_kendall_moves_each_parameter_by_its_closed_form_gradient() -> None:
    """One SGD step: s_i ← s_i - lr·(1 - e^{-s_i}·L_i); past the bound it is projected back at
    the next forward."""
    gor = GoR(form="kendall")
    set_params(gor, [0.5, 4.8])
    optimizer = torch.optim.SGD(gor.parameters(), lr=0.1)
    gor(L_TS, L_KD).backward()
    optimizer.step()
    expected = [0.5 - 0.1 * (1 - math.exp(-0.5) * 2.0), 4.8 - 0.1 * (1 - math.exp(-4.8) * 0.3)]
    assert [p.item() for p in gor.params] == pytest.approx(expected)
    set_params(gor, [0.0, -4.99])
    optimizer.zero_grad()
    gor(torch.tensor(0.0), torch.tensor(100.0)).backward()
    optimizer.step()  # s_ts by -lr·1; s_kd by lr·(e^{4.99}·100 - 1), far past the bound
    assert gor.params[0].item() == pytest.approx(-0.1)
    assert gor.params[1].item() == pytest.approx(-4.99 + 0.1 * (math.exp(4.99) * 100 - 1))
    assert gor.weights()["w_kd"] == pytest.approx(math.exp(-KENDALL_BOUND))
    gor(L_TS, L_KD)
    assert [p.item() for p in gor.params] == pytest.approx([-0.1, KENDALL_BOUND])


@pytest.mark.parametrize("form", ["kendall", "liebel"])
def test_per_teacher_gor_values_and_gradients_by_hand(form: str) -> None:
    gor = build(num_teachers=3, per_teacher=True, form=form)
    values = [0.5, -0.5, 1.5, 0.8] if form == "kendall" else [0.5, 1.2, 2.0, 0.8]
    set_params(gor, values)
    terms = [torch.tensor(0.1), torch.tensor(0.2), torch.tensor(0.4)]
    total, d_params, d_losses = grads(gor, L_TS, terms)
    losses = [L_TS.item(), *(t.item() for t in terms)]
    if form == "kendall":
        value = sum(math.exp(-v) * x + v for v, x in zip(values, losses, strict=True))
        d_value = [1 - math.exp(-v) * x for v, x in zip(values, losses, strict=True)]
        weights = [math.exp(-v) for v in values]
    else:
        value = sum(
            x / (2 * v * v) + math.log(1 + v * v) for v, x in zip(values, losses, strict=True)
        )
        d_value = [-x / v**3 + 2 * v / (1 + v * v) for v, x in zip(values, losses, strict=True)]
        weights = [1 / (2 * v * v) for v in values]
    assert total == pytest.approx(value)
    assert d_params == pytest.approx(d_value)
    assert d_losses == pytest.approx(weights)
    assert list(gor.weights().values()) == pytest.approx(weights)


# Exact messages, defaults and bounds: what a user or a checkpoint sees.


def test_messages_name_the_fix_in_full() -> None:
    with pytest.raises(QatkdError) as error:
        build(num_teachers=0)
    assert str(error.value) == (
        "balancer 'gor' needs at least one teacher: set teachers=[...] "
        "(or balancer.name=ts_only for plain QAT)"
    )
    with pytest.raises(TypeError) as error:
        GoR()(L_TS, [L_KD])
    assert str(error.value) == (
        "GoR takes one KD loss tensor, got list: build the KD loss with per_teacher=False"
    )
    with pytest.raises(TypeError) as error:
        GoR(num_teachers=2)(L_TS, L_KD)
    assert str(error.value) == (
        "per-teacher GoR takes a list of 2 KD losses, got tensor(0.3000): "
        "build the KD loss with per_teacher=True"
    )


def test_gor_refuses_unknown_settings_by_name() -> None:
    with pytest.raises(ValueError, match=r"^unknown GoR form 'lieble'$"):
        GoR(form="lieble")
    with pytest.raises(ValueError, match=r"^unknown GoR loss scale 'median'$"):
        GoR(scale="median")
    with pytest.raises(ValueError, match=r"^per-teacher GoR needs num_teachers >= 1, got 0$"):
        GoR(num_teachers=0)


def test_per_teacher_gor_with_one_teacher() -> None:
    gor = GoR(num_teachers=1)
    assert gor.per_teacher and list(gor.weights()) == ["w_ts", "w_kd0"]
    assert gor(L_TS, [L_KD]).item() == pytest.approx(2.0 + 0.3)


def test_fixed_alpha_default_and_bounds() -> None:
    assert Fixed().alpha == 0.5 and Fixed().weights() == {"w_ts": 0.5, "w_kd": 0.5}
    assert Fixed(1.0).weights() == {"w_ts": 0.0, "w_kd": 1.0}
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.01"):
        Fixed(1.01)


def test_param_group_is_named_balancer() -> None:
    gor = GoR()
    assert gor.param_groups(None, 0.1) == [
        {"params": list(gor.params), "lr": 0.1, "weight_decay": 0.0, "name": "balancer"}
    ]


def test_gor_parameters_are_float32_whatever_the_default_dtype() -> None:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gor = GoR(form="liebel")
    finally:
        torch.set_default_dtype(default)
    assert [p.dtype for p in gor.params] == [torch.float32, torch.float32]


def test_only_scale_aware_gor_has_loss_size_buffers() -> None:
    """The state dict is what checkpoints hold: plain GoR's has its parameters only."""
    assert list(GoR().state_dict()) == ["params.0", "params.1"]
    assert list(GoR(scale="running").state_dict()) == [
        "loss_sizes",
        "size_updates",
        "params.0",
        "params.1",
    ]


@pytest.mark.parametrize("scale", ["initial", "running"])
def test_scale_aware_weights_before_the_first_step_are_the_plain_ones(scale: str) -> None:
    """No loss size is known yet: the weights are GoR's own, not divided by an empty estimate."""
    assert GoR(scale=scale).weights() == {"w_ts": 1.0, "w_kd": 1.0}


def test_liebel_weights_are_unbounded_like_its_sigma() -> None:
    """Only kendall and heldout are projected into [-5, 5]: liebel's σ beyond it keeps its own
    weight 1/(2σ²), the one its forward weighs the losses with (not 1/(2·5²))."""
    gor = GoR(form="liebel")
    set_params(gor, [7.0, -6.0])
    assert gor.weights() == pytest.approx({"w_ts": 1 / 98, "w_kd": 1 / 72})
    _, _, d_losses = grads(gor, L_TS, [L_KD])
    assert d_losses == pytest.approx([1 / 98, 1 / 72])


@pytest.mark.parametrize(
    ("balancer", "name"), [(GoR(), "GoR"), (GoR(form="liebel"), "GoR"), (Fixed(), "Fixed")]
)
def test_observe_names_the_balancer_that_cannot_learn_from_held_out_data(balancer, name) -> None:
    with pytest.raises(TypeError) as error:
        balancer.observe(torch.zeros(2))
    assert str(error.value) == f"{name} does not learn from held-out data"


def test_a_non_finite_step_leaves_the_loss_sizes_and_the_alignments_as_they_were() -> None:
    """A NaN loss (a step that train.on_nonfinite=skip skips) or the NaN alignments measured on
    it must not enter the running loss sizes or the held-out form's next update."""
    running = GoR(form="liebel", scale="running").train()
    running(torch.tensor(2.0), torch.tensor(0.5))
    sizes, updates = running.loss_sizes.clone(), running.size_updates.clone()
    running(torch.tensor(float("nan")), torch.tensor(0.5))
    assert torch.equal(running.loss_sizes, sizes) and torch.equal(running.size_updates, updates)
    held = GoR(form="heldout").train()
    held.observe(torch.tensor([0.25, -0.5]))
    held.observe(torch.tensor([float("nan"), 0.1]))
    assert held.alignment.tolist() == [0.25, -0.5] and held.pending.tolist() == [0.25, -0.5]
