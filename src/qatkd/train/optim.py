"""The optimizer and the learning-rate schedule of a run: which parameters decay, which rate each
group takes (the balancer's own, the KD loss's parts at the model's), warm-up then cosine."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qatkd.balance import LossBalancer
from qatkd.config import Config
from qatkd.quant import Quantizer


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: not on norms, biases or quantizer scales."""
    quantizer_params = {
        id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 and id(p) not in quantizer_params else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "name": "norms_biases_quantizers"},
    ]


def build_optimizer(
    model: nn.Module, balancer: LossBalancer, config: Config, kd_parts: nn.Module | None = None
) -> torch.optim.Optimizer:
    train = config.train
    groups = parameter_groups(model, train.weight_decay)
    groups += balancer.param_groups(config.balancer.lr, train.lr)
    if kd_parts is not None:  # at the model's rate and weight decay
        groups += [
            {**group, "name": f"kd_{group['name']}"}
            for group in parameter_groups(kd_parts, train.weight_decay)
            if group["params"]
        ]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=train.lr)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base rate, then cosine decay to zero: a factor per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
