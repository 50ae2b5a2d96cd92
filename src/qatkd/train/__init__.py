"""The task-agnostic training engine: loop, optimizer groups, schedule, checkpoints, logs."""

from qatkd.train.engine import Task, evaluate_splits, fit

__all__ = ["Task", "evaluate_splits", "fit"]
