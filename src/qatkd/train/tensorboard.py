"""TensorBoard event files of a run (`train.tensorboard`): every row of steps.csv and log.csv
again as scalars, written straight into the run folder, so `tensorboard --logdir runs` shows
each run folder as one run. The CSV logs stay the record; these files are for looking.

Both logs share one x axis, the global step: a row of steps.csv at its step, a row of log.csv at
the step that ended its epoch. That keeps the epoch curves in line with the step curves, and lets
one `purge_step` drop, on resume, whatever was logged after the checkpoint in either log.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from qatkd.errors import QatkdError

INDEX_COLUMNS = ("step", "epoch")
"""Columns that place a row (its x axis), not figures of it: never logged as scalars."""


def require_tensorboard() -> None:
    """Refuse `train.tensorboard=true` without the tensorboard package, before a run starts."""
    try:
        importlib.import_module("tensorboard")
    except ImportError:
        raise QatkdError(
            "train.tensorboard=true needs the tensorboard package, which is not installed: "
            "pip install 'qatkd[tensorboard]'"
        ) from None


class ScalarLog:
    """One run's event file. `keep_until`: the last step kept from earlier writers in the same
    folder, as the CSV logs keep their rows (0 on a fresh start, the checkpoint's step on a
    resume); TensorBoard hides their events past it, so steps run again after a checkpoint do not
    show twice."""

    def __init__(self, run_dir: Path, keep_until: int) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=keep_until + 1)

    def add(self, section: str, row: dict[str, Any], step: int) -> None:
        """The numbers of `row` as `section/<column>` at `step`; empty (None), non-numeric and
        index columns are left out."""
        for column, value in row.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and column not in INDEX_COLUMNS:
                self.writer.add_scalar(f"{section}/{column}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
