"""The balancers: fixed weights (baselines) and GoR, the learned weighting (design §1.3)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from qatkd.balance.base import KDTerms, LossBalancer

GoRForm = Literal["liebel", "kendall"]
LossScale = Literal["none", "initial", "running"]
KENDALL_BOUND = 5.0
RUNNING_MOMENTUM = 0.99


class Fixed(LossBalancer):
    """`(1-α)·L_TS + α·L_KD`, the hand-tuned baseline; α=0 is plain QAT and α=1 KD alone."""

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.needs_teacher = alpha > 0

    def forward(self, l_ts: Tensor, l_kd: KDTerms = None) -> Tensor:
        total = (1.0 - self.alpha) * l_ts
        if self.needs_teacher:
            total = total + self.alpha * self._one_kd(l_kd)
        return total

    def weights(self) -> dict[str, float]:
        return {"w_ts": 1.0 - self.alpha, "w_kd": self.alpha}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class GoR(LossBalancer):
    """Game of Regularizer: one learned weight per loss term, with a regularizer that keeps the
    weights from collapsing to zero.

    `kendall` (default) learns s = log σ² (init 0, kept in [-5, 5]): Σ e^{-s_i}·L_i + s_i,
    weight e^{-s}. `liebel` learns σ (init 1): Σ L_i/(2σ_i²) + ln(1+σ_i²), weight 1/(2σ²).
    The default is the form with the best mean validation rank over the GoR benchmarks' cells
    (benchmarks/results/gor_default.md).
    By default there are two parameters (TS and one KD term); `num_teachers=k` makes it k+1, one
    per teacher, and `forward` then takes a list of k KD terms.

    Both forms settle on weights inversely related to each loss's size, so a KD loss a sixth of
    the task loss ends up weighted several times higher whatever it is worth. `scale` makes
    GoR scale-aware: each loss is divided by an estimate of its own size (detached) before the
    learned weighting, its value at the first training step (`initial`) or a bias-corrected
    running mean over the training steps (`running`, momentum 0.99); the weighting then sees
    losses near 1. `weights()` reports the effective weights on the raw losses. The estimate is
    a buffer, saved and resumed with the parameters.
    """

    def __init__(
        self,
        form: GoRForm = "kendall",
        num_teachers: int | None = None,
        scale: LossScale = "none",
    ) -> None:
        super().__init__()
        if form not in ("liebel", "kendall"):
            raise ValueError(f"unknown GoR form {form!r}")
        if scale not in ("none", "initial", "running"):
            raise ValueError(f"unknown GoR loss scale {scale!r}")
        if num_teachers is not None and num_teachers < 1:
            raise ValueError(f"per-teacher GoR needs num_teachers >= 1, got {num_teachers}")
        self.form = form
        self.per_teacher = num_teachers is not None
        kd_names = [f"w_kd{i}" for i in range(num_teachers)] if num_teachers else ["w_kd"]
        self.weight_names = ["w_ts", *kd_names]
        init = 1.0 if form == "liebel" else 0.0
        self.params = nn.ParameterList(
            nn.Parameter(torch.tensor(init, dtype=torch.float32)) for _ in self.weight_names
        )
        self.scale = scale
        if scale != "none":
            self.register_buffer("loss_sizes", torch.zeros(len(self.weight_names)))
            self.register_buffer("size_updates", torch.zeros(()))

    def forward(self, l_ts: Tensor, l_kd: KDTerms) -> Tensor:
        losses = torch.stack([t.float() for t in [l_ts, *self._kd_terms(l_kd)]])
        if self.scale != "none":
            losses = losses / self._sizes(losses.detach())
        if self.form == "kendall":
            # Project into the bound instead of clamping in the graph: a clamp's gradient is zero
            # at and beyond the bound, so a parameter that reached it would stay there for good.
            with torch.no_grad():
                for p in self.params:
                    p.clamp_(-KENDALL_BOUND, KENDALL_BOUND)
        values = torch.stack(list(self.params))
        return (self._weight(values) * losses + self._regularizer(values)).sum()

    def weights(self) -> dict[str, float]:
        with torch.no_grad():
            values = torch.stack(list(self.params))
            if self.form == "kendall":  # the values the next forward projects to
                values = values.clamp(-KENDALL_BOUND, KENDALL_BOUND)
            weights = self._weight(values)
            if self.scale != "none" and self.size_updates > 0:
                weights = weights / self._estimate()
            return dict(zip(self.weight_names, weights.tolist(), strict=True))

    def extra_repr(self) -> str:
        return f"form={self.form!r}, terms={len(self.params)}, scale={self.scale!r}"

    def _sizes(self, losses: Tensor) -> Tensor:
        """The loss-size estimate, updated with this step's losses in training mode (the first
        step sets it for `initial`); before any update, the losses themselves."""
        if self.training and (self.scale == "running" or self.size_updates == 0):
            with torch.no_grad():
                momentum = RUNNING_MOMENTUM if self.scale == "running" else 0.0
                self.loss_sizes.mul_(momentum).add_((1 - momentum) * losses)
                self.size_updates.add_(1)
        if self.size_updates == 0:
            return losses
        return self._estimate()

    def _estimate(self) -> Tensor:
        if self.scale == "initial":
            return self.loss_sizes
        return self.loss_sizes / (1 - RUNNING_MOMENTUM**self.size_updates)

    def _kd_terms(self, l_kd: KDTerms) -> list[Tensor]:
        if not self.per_teacher:
            return [self._one_kd(l_kd)]
        expected = len(self.params) - 1
        if not isinstance(l_kd, (list, tuple)) or len(l_kd) != expected:
            raise TypeError(
                f"per-teacher GoR takes a list of {expected} KD losses, got {l_kd!r:.80}: "
                "build the KD loss with per_teacher=True"
            )
        return list(l_kd)

    def _weight(self, values: Tensor) -> Tensor:
        return 0.5 / values**2 if self.form == "liebel" else torch.exp(-values)

    def _regularizer(self, values: Tensor) -> Tensor:
        return torch.log1p(values**2) if self.form == "liebel" else values
