"""GoR form `heldout`: its formula by hand, the alignments it learns from, the training data it
reserves, and, through the real pipeline, that it turns a harmful teacher down and keeps a
helpful one, and resumes exactly."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from qatkd import pipeline
from qatkd.balance import BalancerConfig, Fixed, GoR, alignments, build_balancer
from qatkd.balance.balancers import HELDOUT_PULL
from qatkd.checkpoint import load_checkpoint
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.train.distributed import World
from qatkd.train.held_out import HeldOutPass, reserve_held_out
from qatkd.train.logs import read_csv
from testdata import learning_overrides, permuted_teacher, stop_after_epoch_1

L_TS, L_KD = 2.0, 0.3


def weight(s: float) -> float:
    return 2 / (1 + math.exp(s))  # 2·sigmoid(-s)


def step(gor: GoR, s: list[float]) -> tuple[float, list[float], list[float | None]]:
    """One forward and backward at parameters `s`: the total, ∂/∂L_k, ∂/∂s_k (None: none)."""
    with torch.no_grad():
        for p, v in zip(gor.params, s, strict=True):
            p.fill_(v)
            p.grad = None
    losses = [torch.tensor(L_TS, requires_grad=True), torch.tensor(L_KD, requires_grad=True)]
    total = gor(*losses)
    total.backward()
    d_params = [None if p.grad is None else p.grad.item() for p in gor.params]
    return total.item(), [t.grad.item() for t in losses], d_params


def test_heldout_formula_by_hand():
    """The student's loss is Σ w_k·L_k with w = 2·sigmoid(-s) held constant; the parameters
    get a_k + ρ·s_k on a step with alignments, and no gradient on the others."""
    gor = GoR(form="heldout")
    s = [0.3, -0.7]
    w = [weight(v) for v in s]
    total, d_losses, d_params = step(gor, s)
    assert total == pytest.approx(w[0] * L_TS + w[1] * L_KD)
    assert d_losses == pytest.approx(w)
    assert d_params == [None, None]  # the training total does not move them
    gor.observe(torch.tensor([0.2, -0.5]))
    total, d_losses, d_params = step(gor, s)
    assert total == pytest.approx(w[0] * L_TS + w[1] * L_KD)  # the objective adds zero
    assert d_losses == pytest.approx(w)
    assert d_params == pytest.approx([0.2 + HELDOUT_PULL * 0.3, -0.5 - HELDOUT_PULL * 0.7])
    assert HELDOUT_PULL == 0.01
    assert step(gor, s)[2] == [None, None]  # used once
    assert gor.measured() == pytest.approx({"align_ts": 0.2, "align_kd": -0.5})
    assert gor.weights() == pytest.approx({"w_ts": w[0], "w_kd": w[1]})
    assert GoR(form="heldout").weights() == {"w_ts": 1.0, "w_kd": 1.0}  # as the other forms


def test_an_sgd_step_raises_an_aligned_weight_and_lowers_an_opposed_one():
    gor = GoR(form="heldout")
    optimizer = torch.optim.SGD(gor.parameters(), lr=0.5)
    gor.observe(torch.tensor([0.4, -0.6]))
    gor(torch.tensor(L_TS), torch.tensor(L_KD)).backward()
    optimizer.step()
    assert [p.item() for p in gor.params] == pytest.approx([-0.2, 0.3])
    assert gor.weights() == pytest.approx({"w_ts": weight(-0.2), "w_kd": weight(0.3)})


def test_heldout_is_bounded_and_per_teacher():
    gor = build_balancer(BalancerConfig(form="heldout", per_teacher=True), 3)
    assert gor.learns_from_held_out and list(gor.measured()) == [
        "align_ts",
        "align_kd0",
        "align_kd1",
        "align_kd2",
    ]
    with torch.no_grad():
        for p, v in zip(gor.params, [7.0, -9.0, 0.0, 1.0], strict=True):
            p.fill_(v)
    gor(torch.tensor(1.0), [torch.tensor(1.0)] * 3)
    assert [p.item() for p in gor.params] == [5.0, -5.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"4 alignments expected"):
        gor.observe(torch.zeros(2))
    gor.eval()
    gor.observe(torch.ones(4))
    one = torch.tensor(1.0, requires_grad=True)
    gor(one, [one] * 3).backward()  # eval: no update
    assert all(p.grad is None for p in gor.params)


def test_only_heldout_learns_from_held_out_data():
    for balancer in (GoR(), Fixed()):
        assert not balancer.learns_from_held_out and balancer.measured() == {}
        with pytest.raises(TypeError, match="does not learn from held-out data"):
            balancer.observe(torch.zeros(2))
    with pytest.raises(QatkdError, match=r"^balancer\.scale=running is for GoR forms"):
        build_balancer(BalancerConfig(form="heldout", scale="running"), 1)
    with pytest.raises(ValidationError):
        BalancerConfig(held_out=0.0)
    with pytest.raises(ValidationError):
        BalancerConfig(every=0)
    assert (BalancerConfig().held_out, BalancerConfig().every) == (0.05, 10)


def test_alignments_are_the_cosines_by_hand():
    """Linear terms have constant gradients: c_k·p has gradient c_k (p2 is unused by term 1)."""
    p1 = torch.zeros(3, requires_grad=True)
    p2 = torch.zeros(2, requires_grad=True)
    c = [np.array([1.0, 2.0, -1.0, 0.5, 0.0]), np.array([-3.0, 0.0, 1.0, 2.0, 1.0])]
    terms = [
        (torch.tensor(c[0][:3]).float() * p1).sum() + (torch.tensor(c[0][3:]).float() * p2).sum(),
        (torch.tensor(c[1][:3]).float() * p1).sum() + (torch.tensor(c[1][3:]).float() * p2).sum(),
        (torch.tensor([1.0, 1.0, 1.0]) * p1).sum(),
    ]
    c.append(np.array([1.0, 1.0, 1.0, 0.0, 0.0]))
    h = np.array([0.5, -1.0, 2.0, 1.0, -0.5])
    held = [torch.tensor(h[:3]).float(), torch.tensor(h[3:]).float()]
    expected = [v @ h / (np.linalg.norm(v) * np.linalg.norm(h)) for v in c]
    measured = alignments(held, terms, [p1, p2])
    assert measured.dtype == torch.float32
    assert measured.tolist() == pytest.approx(expected, rel=1e-6)
    flipped = alignments(held, terms, [p1, p2], lambda g: [-x if x is not None else x for x in g])
    assert flipped.tolist() == pytest.approx([-v for v in expected], rel=1e-6)


def held_config(*extra: str):
    return load_config(overrides=["balancer.form=heldout", "balancer.held_out=0.25", *extra])


def test_the_reserved_share_belongs_to_the_data_not_to_the_seed():
    data = list(range(40))
    gor = GoR(form="heldout")
    train, held = reserve_held_out(data, held_config("data.val_seed=3"), gor)
    assert len(held) == 10 and sorted([*train, *held]) == data  # removed from training
    assert set(train).isdisjoint(held)
    same = reserve_held_out(data, held_config("data.val_seed=3", "seed=7"), gor)[1]
    assert list(same) == list(held)
    assert list(reserve_held_out(data, held_config("data.val_seed=4"), gor)[1]) != list(held)
    assert reserve_held_out(data, held_config(), GoR()) == (data, None)  # other forms: nothing
    with pytest.raises(QatkdError, match=r"^balancer\.held_out=0\.25 holds out no sample of 1"):
        reserve_held_out([0], held_config(), gor)


def test_held_out_batches_cover_the_data_and_split_over_ranks():
    config = held_config("balancer.every=2")

    def batches(rank: int, size: int, batch: int) -> HeldOutPass:
        return HeldOutPass(list(range(10)), None, None, [], config, batch, World(rank, size), None)

    one = batches(0, 1, 4)
    first = one.indices(0) + one.indices(1) + one.indices(2)[:2]
    assert sorted(first) == list(range(10))  # a permutation before any repeat
    assert one.indices(3) == batches(0, 1, 4).indices(3)  # no state: the update's number
    two = [batches(r, 2, 2) for r in (0, 1)]
    for update in range(5):
        assert two[0].indices(update) + two[1].indices(update) == one.indices(update)


# Through the real pipeline, on data a W4A4 resnet8 learns in seconds (tests/testdata.py).

HELDOUT = ("quant.bits=W4A4", "balancer.form=heldout", "balancer.every=1", "balancer.lr=1")
"""A 30-step run: the balancer's rate is set high enough to decide within it."""


def test_a_harmful_teacher_is_turned_down_and_the_student_matches_plain_qat(
    learn_root: Path, learned_fp32: Path, tmp_path: Path
):
    teacher = permuted_teacher(learned_fp32, tmp_path / "wrong.pt")
    overrides = learning_overrides(learn_root, tmp_path / "gor", *HELDOUT, f"teachers=[{teacher}]")
    run_dir, metrics = pipeline.distill(load_config(overrides=overrides))
    plain = learning_overrides(learn_root, tmp_path / "qat", "quant.bits=W4A4")
    _, qat = pipeline.train(load_config(overrides=plain))
    assert metrics["final_w_kd"] < 0.05 * metrics["final_w_ts"], metrics
    assert metrics["test_acc"] >= qat["test_acc"] - 0.5, (metrics, qat)
    rows = read_csv(run_dir / "steps.csv")[len(read_csv(run_dir / "steps.csv")) // 2 :]
    assert np.mean([r["align_kd"] for r in rows]) < 0 < np.mean([r["align_ts"] for r in rows])


def test_a_helpful_teacher_stays_on(learn_root: Path, learned_fp32: Path, tmp_path: Path):
    teacher = learned_fp32 / "last.pt"
    overrides = learning_overrides(learn_root, tmp_path / "gor", *HELDOUT, f"teachers=[{teacher}]")
    _, metrics = pipeline.distill(load_config(overrides=overrides))
    assert metrics["final_w_kd"] > 0.5 * metrics["final_w_ts"], metrics
    assert metrics["final_align_kd"] != 0


def test_the_pass_runs_every_every_steps_on_the_next_held_out_batch(
    learn_root: Path, learned_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """At balancer.every=3, steps 1, 4, 7, ... measure, each on a held-out batch of its own."""
    passes: list[int] = []
    indices = HeldOutPass.indices

    def recorded(self: HeldOutPass, update: int) -> list[int]:
        passes.append(update)
        return indices(self, update)

    monkeypatch.setattr(HeldOutPass, "indices", recorded)
    extra = [*HELDOUT, "balancer.every=3", f"teachers=[{learned_fp32 / 'last.pt'}]"]
    run_dir, _ = pipeline.distill(
        load_config(overrides=learning_overrides(learn_root, tmp_path / "run", *extra))
    )
    steps = load_checkpoint(run_dir / "last.pt")["step"]
    assert steps >= 7 and passes == list(range(math.ceil(steps / 3)))


def test_resume_reproduces_the_uninterrupted_run(
    learn_root: Path, learned_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def overrides(name: str) -> list[str]:
        extra = [*HELDOUT, "balancer.every=2", f"teachers=[{learned_fp32 / 'last.pt'}]"]
        return learning_overrides(learn_root, tmp_path / name, *extra, "train.epochs=2")

    full, _ = pipeline.distill(load_config(overrides=overrides("full")))
    stop_after_epoch_1(
        monkeypatch, lambda: pipeline.distill(load_config(overrides=overrides("cut")))
    )
    resumed, _ = pipeline.resume(tmp_path / "cut")
    a, b = (load_checkpoint(r / "last.pt") for r in (full, resumed))
    for part in ("model", "balancer"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert (full / "steps.csv").read_text() == (resumed / "steps.csv").read_text()


def test_check_counts_the_balancers_share_and_times_its_pass(
    learn_root: Path, learned_fp32: Path, tmp_path: Path
):
    teacher = f"teachers=[{learned_fp32 / 'last.pt'}]"
    overrides = learning_overrides(learn_root, tmp_path / "x", *HELDOUT, teacher)
    facts = pipeline.check(load_config(overrides=overrides), "distill")
    plain = pipeline.check(load_config(overrides=learning_overrides(learn_root, tmp_path / "y")))
    assert facts["samples"]["train"] + facts["samples"]["balancer"] == plain["samples"]["train"]
    assert facts["samples"]["balancer"] == round(0.05 * plain["samples"]["train"])
    assert facts["steps_per_epoch"] == facts["samples"]["train"] // 16
    assert facts["seconds_per_step"] > 0


def test_check_counts_the_pass_at_its_share(
    learn_root: Path, learned_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """On a clock that only a pass moves (by 0.2 s), a step costs 0.2 s at balancer.every=1 and
    0.02 s at every=10."""
    clock = [0.0]

    def observe(*args, **kwargs) -> None:
        clock[0] += 0.2

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(HeldOutPass, "observe", observe)
    teacher = f"teachers=[{learned_fp32 / 'last.pt'}]"

    def seconds(every: int) -> float:
        extra = [*HELDOUT, teacher, f"balancer.every={every}"]
        config = load_config(overrides=learning_overrides(learn_root, tmp_path / "x", *extra))
        return pipeline.check(config, "distill")["seconds_per_step"]

    assert seconds(1) == pytest.approx(0.2)
    assert seconds(10) == pytest.approx(0.02)


def test_gor_heldout_refuses_a_loss_scale_in_full():
    """GoR itself refuses the combination (not only the config), with the fix named."""
    for scale in ("initial", "running"):
        with pytest.raises(ValueError) as error:
            GoR(form="heldout", scale=scale)
        assert str(error.value) == (
            "GoR form 'heldout' does not weigh by loss size: use scale='none'"
        )
    assert GoR(form="heldout", scale="none").scale == "none"


def test_config_heldout_refuses_a_loss_scale_in_full():
    with pytest.raises(QatkdError) as error:
        build_balancer(BalancerConfig(form="heldout", scale="initial"), 1)
    assert str(error.value) == (
        "balancer.scale=initial is for GoR forms kendall and liebel; "
        "form heldout does not weigh by loss size: drop balancer.scale"
    )
