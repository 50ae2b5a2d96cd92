"""Gradients of the loss terms over the student's parameters: the gradient-conflict diagnostic
(how strongly, and in which direction, L_TS and L_KD pull the student; the imbalance GoR is
meant to resolve, design §1.3) and the alignments GoR form `heldout` learns from."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from qatkd.balance.base import KDTerms

Gradient = list[Tensor | None]
"""One entry per parameter; None where the loss does not reach it."""


def gradient(loss: Tensor, params: Sequence[Tensor]) -> Gradient:
    """∇loss over `params`, keeping the graph (the step's own backward still runs after)."""
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def dot(a: Gradient, b: Gradient) -> Tensor:
    """⟨a, b⟩ in float64; a missing entry counts as zeros."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None:
            total = total.to(x.device) + (x.double() * y.double()).sum()
    return total


def cosine(a: Gradient, b: Gradient) -> Tensor:
    """cos(a, b); 0 when either is zero."""
    return dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt()).clamp_min(1e-30)


def grad_conflict(l_ts: Tensor, l_kd: KDTerms, params: Iterable[Tensor]) -> dict[str, float]:
    """Norms of ∇L_TS and ∇L_KD over `params`, their ratio ‖∇TS‖/‖∇KD‖ and their cosine.

    Per-teacher KD terms count as their sum. The graph is kept, so the training step's own
    backward still works afterwards. Costs two extra backward passes: sample it every N steps.
    """
    params = [p for p in params if p.requires_grad]
    if isinstance(l_kd, (list, tuple)):
        l_kd = torch.stack(list(l_kd)).sum()
    if l_kd is None:
        raise ValueError("grad_conflict needs a KD loss")
    g_ts, g_kd = gradient(l_ts, params), gradient(l_kd, params)
    norm_ts, norm_kd = dot(g_ts, g_ts).sqrt(), dot(g_kd, g_kd).sqrt()
    return {
        "grad_norm_ts": norm_ts.item(),
        "grad_norm_kd": norm_kd.item(),
        "grad_ratio": (norm_ts / norm_kd).item(),
        "grad_cosine": cosine(g_ts, g_kd).item(),
    }


def alignments(
    held: Gradient,
    terms: Sequence[Tensor],
    params: Sequence[Tensor],
    reduce: Callable[[Gradient], Gradient] = lambda g: g,
) -> Tensor:
    """cos(`held`, ∇term) for each loss term, float32: one extra backward per term, each
    gradient dropped once its cosine is known (memory: two model-sized copies at a time).
    `reduce` maps each term's gradient before the cosine (over processes: their mean)."""
    return torch.stack([cosine(held, reduce(gradient(term, params))) for term in terms]).float()
