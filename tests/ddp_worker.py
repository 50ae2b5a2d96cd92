"""Run `qatkd distill <overrides>` through the real CLI, pipeline and engine, alone or as one
rank under torchrun, and save what this process trained to `<out>/rank<RANK>.pt`: the student's
and the balancer's state before and after training (rank 0 alone writes the run's checkpoints,
so the other ranks' states are seen nowhere else).

    python tests/ddp_worker.py OUT key=value ...
    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT key=value ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from qatkd import pipeline
from qatkd.cli import main


def run(out: Path, overrides: list[str]) -> int:
    trained: dict[str, Any] = {}
    fit = pipeline.fit

    def spy(model, task, train_set, val_set, test_set, config, run_dir, meta, balancer, *args):
        trained["initial"] = states(model, balancer)
        metrics = fit(
            model, task, train_set, val_set, test_set, config, run_dir, meta, balancer, *args
        )
        trained["final"] = states(model, balancer)
        return metrics

    pipeline.fit = spy
    try:
        code = main(["distill", *overrides])
    finally:
        pipeline.fit = fit
    if code == 0:
        rank = os.environ.get("RANK", "0")
        torch.save(trained, out / f"rank{rank}.pt")
    return code


def states(model: torch.nn.Module, balancer: torch.nn.Module) -> dict[str, dict]:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "balancer": {k: v.detach().clone() for k, v in balancer.state_dict().items()},
    }


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
