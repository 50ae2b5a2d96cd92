"""The `balancer:` config section and the registry that turns it into a `LossBalancer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qatkd.balance.balancers import Fixed, GoR
from qatkd.balance.base import LossBalancer
from qatkd.errors import QatkdError
from qatkd.registry import Registry


class BalancerConfig(BaseModel):
    """The `balancer:` section of a run config; `alpha` is read by `fixed` only, `form`, `scale`,
    `normalize` and `per_teacher` by `gor` only, `held_out` and `every` by `gor` form `heldout`
    only, `lr` (default: the model's) by balancers with parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "gor",
        description="how L_TS and L_KD are combined: gor (two learned weights), fixed "
        "((1-alpha)·L_TS + alpha·L_KD), ts_only (plain QAT), kd_only",
    )
    form: Literal["liebel", "kendall", "heldout"] = Field(
        "kendall",
        description="GoR's form: kendall and liebel weigh each loss by its size (learned "
        "uncertainty); heldout weighs each by use, from the alignment of its gradient with the "
        "task gradient on data reserved for it (balancer.held_out, balancer.every)",
    )
    normalize: bool = Field(
        False,
        description="GoR: rescale the weights to sum to 1 before they weigh the losses, as "
        "fixed α's (1-α, α) do, so the form sets the ratio and train.lr the step, the same "
        "step as plain QAT's and fixed α's",
    )
    held_out: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="form heldout: share of the training set reserved for the balancer and "
        "removed from the student's training data (drawn by data.val_seed, so the same for "
        "every seed; never the validation or test data)",
    )
    every: int = Field(
        10,
        gt=0,
        description="form heldout: steps between the balancer's held-out passes (one forward "
        "and backward on a held-out batch, one backward per loss term)",
    )
    scale: Literal["none", "initial", "running"] = Field(
        "none",
        description="scale-aware GoR: divide each loss by its value at the first step (initial) "
        "or a bias-corrected running mean (running) before the learned weighting",
    )
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="the KD weight of fixed")
    per_teacher: bool = Field(
        False, description="GoR with one learned weight per teacher (k+1 parameters)"
    )
    lr: float | None = Field(
        default=None,
        gt=0.0,
        description="learning rate of the balancer's parameters; null: the model's",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        # pydantic reports a ValueError with the field's location; reuse the registry's hint.
        try:
            BALANCERS.get(name)
        except QatkdError as e:
            raise ValueError(str(e)) from None
        return name


BalancerFactory = Callable[[BalancerConfig, int], LossBalancer]
BALANCERS: Registry[BalancerFactory] = Registry("balancer")


@BALANCERS.register("ts_only")
def _ts_only(config: BalancerConfig, num_teachers: int) -> LossBalancer:
    return Fixed(alpha=0.0)


@BALANCERS.register("kd_only")
def _kd_only(config: BalancerConfig, num_teachers: int) -> LossBalancer:
    return Fixed(alpha=1.0)


@BALANCERS.register("fixed")
def _fixed(config: BalancerConfig, num_teachers: int) -> LossBalancer:
    return Fixed(alpha=config.alpha)


@BALANCERS.register("gor")
def _gor(config: BalancerConfig, num_teachers: int) -> LossBalancer:
    return GoR(
        form=config.form,
        num_teachers=num_teachers if config.per_teacher else None,
        scale=config.scale,
        normalize=config.normalize,
    )


def build_balancer(config: BalancerConfig, num_teachers: int) -> LossBalancer:
    """The configured balancer, after checking it fits the number of teachers."""
    factory = BALANCERS.get(config.name)
    if config.per_teacher and config.name != "gor":
        raise QatkdError(f"balancer.per_teacher=true needs balancer.name=gor, not '{config.name}'")
    if config.scale != "none" and config.name != "gor":
        raise QatkdError(
            f"balancer.scale={config.scale} needs balancer.name=gor, not '{config.name}'"
        )
    if config.normalize and config.name != "gor":
        raise QatkdError(f"balancer.normalize=true needs balancer.name=gor, not '{config.name}'")
    if config.form == "heldout" and config.scale != "none":
        raise QatkdError(
            f"balancer.scale={config.scale} is for GoR forms kendall and liebel; "
            "form heldout does not weigh by loss size: drop balancer.scale"
        )
    if num_teachers == 0 and config.name != "ts_only":
        raise QatkdError(
            f"balancer '{config.name}' needs at least one teacher: set teachers=[...] "
            "(or balancer.name=ts_only for plain QAT)"
        )
    return factory(config, num_teachers)
