"""The balancers: fixed weights (baselines) and GoR, the learned weighting (design §1.3)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from qatkd.balance.base import KDTerms, LossBalancer

GoRForm = Literal["liebel", "kendall", "heldout"]
LossScale = Literal["none", "initial", "running"]
KENDALL_BOUND = 5.0
RUNNING_MOMENTUM = 0.99
HELDOUT_PULL = 0.01
"""The held-out form's regularizer strength ρ: (ρ/2)·Σ s_k² pulls each weight back towards the
plain weight 1. At equilibrium s_k = -a_k/ρ, so a mean alignment of ±0.03 already moves a
weight most of the way to its bound, while an alignment that is only noise around zero
leaves it near 1."""


def gradient_only(x: Tensor) -> Tensor:
    """Zero in value, `x`'s gradient in backward: a balancer's own objective joins the total
    without changing the loss that is logged."""
    return x - x.detach()


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

    `heldout` weighs by use instead of size. It learns s (init 0, kept in [-5, 5]), weight
    w = 2·sigmoid(-s) in (0, 2) (1 at init, like the other forms), and its parameters never see
    the training total: the student's loss is Σ w_k·L_k with w held constant, and s follows
    the alignments a_k = cos(∇L_held, ∇L_k) that the engine measures every `balancer.every`
    steps (`observe`): ∇L_held is the task loss's gradient on a batch of the share of the
    training data reserved for the balancer, ∇L_k the gradient of term k on the training batch.
    After θ' = θ - η·Σ w_k·∇L_k the held-out loss changes by dL_held(θ')/dw_k ≈ -η·⟨∇L_held,
    ∇L_k⟩ (the first-order hypergradient of Auto-λ, Liu et al. 2022), so ∂L_held/∂s_k is that
    times the positive factor η·|dw_k/ds_k|. Dividing each coordinate by its positive scale
    η·|dw_k/ds_k|·‖∇L_held‖·‖∇L_k‖ leaves a_k: still a descent direction of the held-out loss,
    but free of the loss sizes, gradient norms and learning rate that differ by orders of
    magnitude between task families and bit-widths (and that would make a raw hypergradient's
    balancer rate need tuning per task). A term whose gradient points against the held-out
    task gradient is turned down, as in Du et al. 2018's gating, and one that helps is turned
    up, at most to twice the plain weight. The regularizer (ρ/2)·Σ s_k² (ρ = `HELDOUT_PULL`)
    pulls each weight back to 1 when the evidence fades. The form stays a scalar weighting with
    few parameters: Kurin et al. 2022 found tuned scalar weights hard to beat, so the bar is
    never ending worse than plain QAT or a tuned α, not a new optimiser.

    `normalize` separates the balance from the step size: the weights on the raw losses are
    rescaled to sum to 1 before they weigh the losses, like fixed α's (1 - α, α), so the form
    decides the ratio and the learning rate the step: the step of plain QAT and fixed α at the
    same rate (kendall and heldout start at a sum of 2, twice that step). The student's loss
    is then Σ w̃_k·L_k with w̃ held constant; the parameters still follow their own objective
    (kendall's or liebel's on the losses' values, or the held-out alignments), whose value
    joins the total as zero (`gradient_only`), so `loss` logs the student's weighted loss.
    Without `normalize`, kendall and liebel are exactly the objectives above.
    """

    def __init__(
        self,
        form: GoRForm = "kendall",
        num_teachers: int | None = None,
        scale: LossScale = "none",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if form not in ("liebel", "kendall", "heldout"):
            raise ValueError(f"unknown GoR form {form!r}")
        if scale not in ("none", "initial", "running"):
            raise ValueError(f"unknown GoR loss scale {scale!r}")
        if form == "heldout" and scale != "none":
            raise ValueError("GoR form 'heldout' does not weigh by loss size: use scale='none'")
        if num_teachers is not None and num_teachers < 1:
            raise ValueError(f"per-teacher GoR needs num_teachers >= 1, got {num_teachers}")
        self.form = form
        self.normalize = normalize
        self.per_teacher = num_teachers is not None
        self.learns_from_held_out = form == "heldout"
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
        self.pending: Tensor | None = None
        if (
            self.learns_from_held_out
        ):  # the last alignments measured: logged, and resumed with the rest
            self.register_buffer("alignment", torch.zeros(len(self.weight_names)))

    def forward(self, l_ts: Tensor, l_kd: KDTerms) -> Tensor:
        raw = torch.stack([t.float() for t in [l_ts, *self._kd_terms(l_kd)]])
        sizes = self._sizes(raw.detach()) if self.scale != "none" else None
        if self.form != "liebel":
            # Project into the bound instead of clamping in the graph: a clamp's gradient is zero
            # at and beyond the bound, so a parameter that reached it would stay there for good.
            with torch.no_grad():
                for p in self.params:
                    p.clamp_(-KENDALL_BOUND, KENDALL_BOUND)
        values = torch.stack(list(self.params))
        losses = raw if sizes is None else raw / sizes
        if self.form != "heldout" and not self.normalize:
            return self._objective(values, losses)
        student = (self._effective(values, sizes).detach() * raw).sum()
        if self.form == "heldout":
            return student + gradient_only(self._held_out_objective(values))
        return student + gradient_only(self._objective(values, losses.detach()))

    def observe(self, alignments: Tensor) -> None:
        """This step's alignments a_k = cos(∇L_held, ∇L_k) (the same on every rank): the next
        `forward` gives the parameters the gradient a_k + ρ·s_k."""
        if not self.learns_from_held_out:
            super().observe(alignments)
        if alignments.shape != self.alignment.shape:
            raise ValueError(f"{len(self.params)} alignments expected, got {alignments.shape}")
        if not bool(torch.isfinite(alignments).all()):
            return  # measured on a non-finite loss (a step train.on_nonfinite=skip skips)
        self.alignment.copy_(alignments.detach())
        self.pending = self.alignment.clone()

    def weights(self) -> dict[str, float]:
        with torch.no_grad():
            values = torch.stack(list(self.params))
            if self.form != "liebel":  # the values the next forward projects to
                values = values.clamp(-KENDALL_BOUND, KENDALL_BOUND)
            sizes = None
            if self.scale != "none" and self.size_updates > 0:
                sizes = self._estimate()
            weights = self._effective(values, sizes)
            return dict(zip(self.weight_names, weights.tolist(), strict=True))

    def measured(self) -> dict[str, float]:
        """heldout: the last alignments measured, `align_ts`, `align_kd` (per teacher
        `align_kd0`, ...); other forms measure nothing."""
        if not self.learns_from_held_out:
            return {}
        names = [f"align_{name[2:]}" for name in self.weight_names]
        return dict(zip(names, self.alignment.tolist(), strict=True))

    def extra_repr(self) -> str:
        return (
            f"form={self.form!r}, terms={len(self.params)}, scale={self.scale!r}, "
            f"normalize={self.normalize}"
        )

    def _objective(self, values: Tensor, losses: Tensor) -> Tensor:
        """kendall's or liebel's objective: the weighted losses and the regularizer."""
        return (self._weight(values) * losses + self._regularizer(values)).sum()

    def _held_out_objective(self, values: Tensor) -> Tensor:
        """Σ a_k·s_k + (ρ/2)·Σ s_k², whose gradient a_k + ρ·s_k is the parameters' update on a
        step with new alignments (`observe`). On the others it is a constant, so the parameters
        get no gradient at all and the optimizer (its momentum too) leaves them alone."""
        if not self.training or self.pending is None:
            return values.new_zeros(())
        alignments, self.pending = self.pending, None
        return (alignments * values + 0.5 * HELDOUT_PULL * values**2).sum()

    def _effective(self, values: Tensor, sizes: Tensor | None) -> Tensor:
        """The weights on the raw losses: each divided by its loss-size estimate (`scale`) and,
        with `normalize`, rescaled to sum to 1."""
        weights = self._weight(values)
        if sizes is not None:
            weights = weights / sizes
        if self.normalize:
            weights = weights / weights.sum()
        return weights

    def _sizes(self, losses: Tensor) -> Tensor:
        """The loss-size estimate, updated with this step's losses in training mode (the first
        step sets it for `initial`) where they are finite (a step with a non-finite loss is
        skipped or stops the run); before any update, the losses themselves."""
        finite = bool(torch.isfinite(losses).all())
        if self.training and finite and (self.scale == "running" or self.size_updates == 0):
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
        if self.form == "liebel":
            return 0.5 / values**2
        if self.form == "heldout":
            return 2.0 * torch.sigmoid(-values)
        return torch.exp(-values)

    def _regularizer(self, values: Tensor) -> Tensor:
        return torch.log1p(values**2) if self.form == "liebel" else values
