"""The task-agnostic training engine: loop, optimizer groups, schedule, checkpoints, logs."""

from qatkd.train.engine import Task, fit

__all__ = ["Task", "fit"]
