"""The balancers: fixed weights (baselines) and GoR, the learned weighting (design §1.3)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from qatkd.balance.base import KDTerms, LossBalancer

GoRForm = Literal["liebel", "kendall"]
KENDALL_BOUND = 5.0


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

    `liebel` (default) learns σ (init 1): Σ L_i/(2σ_i²) + ln(1+σ_i²), weight 1/(2σ²).
    `kendall` learns s = log σ² (init 0, kept in [-5, 5]): Σ e^{-s_i}·L_i + s_i, weight e^{-s}.
    By default there are two parameters (TS and one KD term); `num_teachers=k` makes it k+1, one
    per teacher, and `forward` then takes a list of k KD terms.
    """

    def __init__(self, form: GoRForm = "liebel", num_teachers: int | None = None) -> None:
        super().__init__()
        if form not in ("liebel", "kendall"):
            raise ValueError(f"unknown GoR form {form!r}")
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

    def forward(self, l_ts: Tensor, l_kd: KDTerms) -> Tensor:
        losses = torch.stack([t.float() for t in [l_ts, *self._kd_terms(l_kd)]])
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
            return dict(zip(self.weight_names, self._weight(values).tolist(), strict=True))

    def extra_repr(self) -> str:
        return f"form={self.form!r}, terms={len(self.params)}"

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
