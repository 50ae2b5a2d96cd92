"""Gradient-conflict diagnostic: how strongly, and in which direction, L_TS and L_KD pull the
student's parameters. This is the imbalance GoR is meant to resolve (design §1.3)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from qatkd.balance.base import KDTerms


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
    g_ts = torch.autograd.grad(l_ts, params, retain_graph=True, allow_unused=True)
    g_kd = torch.autograd.grad(l_kd, params, retain_graph=True, allow_unused=True)
    dot = norm_ts2 = norm_kd2 = torch.zeros((), dtype=torch.float64, device=l_ts.device)
    for a, b in zip(g_ts, g_kd, strict=True):
        if a is not None:
            norm_ts2 = norm_ts2 + a.double().pow(2).sum()
        if b is not None:
            norm_kd2 = norm_kd2 + b.double().pow(2).sum()
        if a is not None and b is not None:
            dot = dot + (a.double() * b.double()).sum()
    norm_ts, norm_kd = norm_ts2.sqrt(), norm_kd2.sqrt()
    return {
        "grad_norm_ts": norm_ts.item(),
        "grad_norm_kd": norm_kd.item(),
        "grad_ratio": (norm_ts / norm_kd).item(),
        "grad_cosine": (dot / (norm_ts * norm_kd).clamp_min(1e-30)).item(),
    }
