"""The optimizer and learning-rate schedule of a run (qatkd.train.optim), against their
definitions: which parameters decay, which rate and decay each group takes, which optimizer the
config names, and the warm-up-then-cosine factor in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qatkd.balance import build_balancer
from qatkd.config import load_config
from qatkd.quant.quantizers import LSQQuantizer
from qatkd.train import optim


class Quantized(nn.Module):
    """A conv with a per-channel weight quantizer (its step has the weight's rank), a norm, a
    frozen linear and a trainable one after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.quantizer = LSQQuantizer(4, weight_shape=self.conv.weight.shape)
        self.norm = nn.BatchNorm2d(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(2, 3)


def names(group: dict, model: nn.Module) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in group["params"]]


def test_only_trainable_conv_and_linear_weights_decay_not_quantizer_steps_of_any_rank():
    model = Quantized()
    assert model.quantizer.step.ndim > 1  # so that only its being a quantizer's keeps it out
    decay, no_decay = optim.parameter_groups(model, 3e-4)
    assert (decay["name"], decay["weight_decay"]) == ("weights", 3e-4)
    assert names(decay, model) == ["conv.weight", "head.weight"]
    assert (no_decay["name"], no_decay["weight_decay"]) == ("norms_biases_quantizers", 0.0)
    assert names(no_decay, model) == [
        "conv.bias",
        "quantizer.step",
        "norm.weight",
        "norm.bias",
        "head.bias",
    ]


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_the_optimizer_is_the_configs_with_its_rate_decay_and_momentum(name: str, kind: type):
    config = load_config(
        overrides=[
            f"train.optimizer={name}",
            "train.lr=0.05",
            "train.weight_decay=0.001",
            "train.momentum=0.8",
            "balancer.name=gor",
            "balancer.lr=0.3",
        ]
    )
    model = Quantized()
    balancer = build_balancer(config.balancer, num_teachers=1)
    optimizer = optim.build_optimizer(model, balancer, config)
    assert type(optimizer) is kind
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["weights", "norms_biases_quantizers", "balancer"]
    assert [g["lr"] for g in groups.values()] == [0.05, 0.05, 0.3]
    assert [g["weight_decay"] for g in groups.values()] == [0.001, 0.0, 0.0]
    assert [id(p) for p in groups["balancer"]["params"]] == [id(p) for p in balancer.parameters()]
    if name == "sgd":
        assert all(g["momentum"] == 0.8 and g["nesterov"] for g in groups.values())


def test_kd_parts_train_at_the_models_rate_and_decay_in_their_own_named_groups():
    config = load_config(overrides=["train.lr=0.05", "train.weight_decay=0.001"])
    balancer = build_balancer(config.balancer, num_teachers=1)
    adapters = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False))  # weights only: no empty group
    optimizer = optim.build_optimizer(Quantized(), balancer, config, adapters)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert "kd_norms_biases_quantizers" not in groups
    kd = groups["kd_weights"]
    assert (kd["lr"], kd["weight_decay"]) == (0.05, 0.001)
    assert [id(p) for p in kd["params"]] == [id(adapters[0].weight)]


HALF_SQRT2 = math.sqrt(2) / 2


@pytest.mark.parametrize(
    "total, warmup, step, factor",
    [
        (10, 4, 0, 0.25),  # linear warm-up: (step + 1) / warmup
        (10, 4, 2, 0.75),
        (10, 4, 3, 1.0),
        (10, 2, 2, 1.0),  # the cosine starts at the full rate
        (10, 2, 4, (1 + HALF_SQRT2) / 2),  # a quarter of the way: (1 + cos(pi / 4)) / 2
        (10, 2, 6, 0.5),  # half way
        (10, 2, 8, (1 - HALF_SQRT2) / 2),
        (10, 2, 10, 0.0),  # the end
        (10, 2, 13, 0.0),  # and after it
        (10, 0, 0, 1.0),  # no warm-up
        (10, 0, 5, 0.5),
        (7, 7, 7, 1.0),  # all warm-up: the cosine has no steps (its length counts as one)
        (7, 7, 8, 0.0),
        (1, 0, 0, 1.0),
    ],
)
def test_warm_up_then_cosine_against_hand_computed_factors(
    total: int, warmup: int, step: int, factor: float
):
    assert optim.warmup_cosine(total, warmup)(step) == pytest.approx(factor, abs=1e-12)
