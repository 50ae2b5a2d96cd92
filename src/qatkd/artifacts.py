"""Run artifacts read back: the model a checkpoint holds and the data it was trained on, for any
task family. Below the pipeline, so export scripts and benchmarks use it without the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qatkd.checkpoint import checkpoint_path, load_checkpoint
from qatkd.config import checkpoint_config, checkpoint_task
from qatkd.tasks import Source, task_family


def load_model(
    path: str | Path, state: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model stored in a checkpoint (or run folder), in eval mode, and the checkpoint itself
    (`state`: the checkpoint when already loaded)."""
    state = state if state is not None else load_checkpoint(checkpoint_path(path))
    return task_family(checkpoint_task(state)).restore(state), state


def checkpoint_source(state: dict[str, Any], overrides: list[str] | None = None) -> Source:
    """The data a checkpoint was trained on, without augmentation, `data.*` overrides applied."""
    config = checkpoint_config(state, [*(overrides or []), "data.augment=false"])
    return task_family(config.task).load(config, training=False)
