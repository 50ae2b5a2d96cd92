"""The `LossBalancer` interface: how the task loss and the KD loss(es) become one total."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

KDTerms = Tensor | list[Tensor] | None


class LossBalancer(nn.Module, ABC):
    """Combines L_TS and L_KD into the loss the student minimises.

    `needs_teacher` is False when the total ignores L_KD, so the engine can skip the teachers.
    `per_teacher` is True when `forward` takes one KD term per teacher (a list) instead of one.
    `learns_from_held_out` is True when it learns from the alignments of each term's gradient
    with a held-out task gradient, which the engine then measures every `balancer.every` steps
    on a share of the training data it reserves (`observe`).
    """

    needs_teacher: bool = True
    per_teacher: bool = False
    learns_from_held_out: bool = False

    @abstractmethod
    def forward(self, l_ts: Tensor, l_kd: KDTerms) -> Tensor:
        """The total loss."""

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """The effective weights on each loss term, for logging."""

    def observe(self, alignments: Tensor) -> None:
        """Take this step's alignments cos(∇L_held, ∇L_k), one per term (balancers that
        `learns_from_held_out` only)."""
        raise TypeError(f"{type(self).__name__} does not learn from held-out data")

    def measured(self) -> dict[str, float]:
        """What it measured besides its weights, for logging (none by default)."""
        return {}

    def param_groups(self, lr: float | None, default_lr: float) -> list[dict[str, Any]]:
        """Its own optimizer group: no weight decay (it would pull the weights towards a fixed
        value) and its own learning rate, the model's by default; empty without parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        return [
            {
                "params": params,
                "lr": default_lr if lr is None else lr,
                "weight_decay": 0.0,
                "name": "balancer",
            }
        ]

    def _one_kd(self, l_kd: KDTerms) -> Tensor:
        if not isinstance(l_kd, Tensor):
            raise TypeError(
                f"{type(self).__name__} takes one KD loss tensor, got {type(l_kd).__name__}: "
                "build the KD loss with per_teacher=False"
            )
        return l_kd
