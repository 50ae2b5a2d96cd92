"""Loss balancers (fixed baselines and GoR) and the gradient-conflict diagnostic."""

from qatkd.balance.balancers import KENDALL_BOUND, Fixed, GoR
from qatkd.balance.base import LossBalancer
from qatkd.balance.config import BALANCERS, BalancerConfig, build_balancer
from qatkd.balance.diagnostics import alignments, grad_conflict, gradient

__all__ = [
    "BALANCERS",
    "KENDALL_BOUND",
    "BalancerConfig",
    "Fixed",
    "GoR",
    "LossBalancer",
    "alignments",
    "build_balancer",
    "grad_conflict",
    "gradient",
]
