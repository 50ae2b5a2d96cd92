"""The task-agnostic training engine: loop, optimizer groups, schedule, checkpoints, logs."""

from qatkd.train.engine import evaluate_splits, fit
from qatkd.train.task import Task

__all__ = ["Task", "evaluate_splits", "fit"]
