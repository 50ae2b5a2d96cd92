"""A run's logs: CSV files that survive a resume (rows past the checkpoint are dropped before
appending again), and `RunLog`, the steps.csv / log.csv (and TensorBoard) of the training loop."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from qatkd.balance import LossBalancer
from qatkd.config import Config
from qatkd.train.task import Task
from qatkd.train.tensorboard import ScalarLog


class CsvLog:
    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields

    def start(self, keep_while: tuple[str, int] | None) -> None:
        """Start a fresh log, or (on resume) keep only rows whose `key` <= `limit`."""
        rows: list[dict[str, str]] = []
        if keep_while is not None and self.path.is_file():
            key, limit = keep_while
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get(key) and int(r[key]) <= limit]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}
            )


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a log as floats (empty cells dropped), for plotting."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


DIAG_KEYS = ["grad_norm_ts", "grad_norm_kd", "grad_ratio", "grad_cosine"]


class RunLog:
    """steps.csv (every `log_every` steps) and log.csv (every epoch), written by rank 0, and with
    `train.tensorboard` the same rows as scalars (`ScalarLog`): `steps/<column>` and
    `epochs/<column>`, both at the row's global step."""

    def __init__(
        self,
        run_dir: Path,
        config: Config,
        task: Task,
        balancer: LossBalancer,
        splits: list[str],
    ) -> None:
        diag = DIAG_KEYS if config.diag.every else []
        weights = [*balancer.weights(), *balancer.measured()]
        step_fields = ["step", "epoch", "lr", "loss", "l_ts", "l_kd", *weights, *diag]
        self.steps = CsvLog(run_dir / "steps.csv", step_fields)
        evaluated = [f"{split}_{task.main_metric}" for split in splits]
        epoch_fields = ["epoch", "step", "lr", "train_loss", "train_acc", *evaluated]
        self.epochs = CsvLog(run_dir / "log.csv", [*epoch_fields, "seconds"])
        self.run_dir, self.tensorboard = run_dir, config.train.tensorboard
        self.board: ScalarLog | None = None

    def start(self, resume: dict[str, Any] | None) -> None:
        self.steps.start(("step", resume["step"]) if resume else None)
        self.epochs.start(("epoch", resume["epoch"]) if resume else None)
        if self.tensorboard:
            self.board = ScalarLog(self.run_dir, keep_until=resume["step"] if resume else 0)

    def step(self, row: dict[str, Any]) -> None:
        self._append(self.steps, "steps", row)

    def epoch(self, row: dict[str, Any]) -> None:
        """A row of log.csv, flushed at once: it comes after the epoch's checkpoint."""
        self._append(self.epochs, "epochs", row)
        self.flush()

    def _append(self, log: CsvLog, section: str, row: dict[str, Any]) -> None:
        log.append(row)
        if self.board is not None:  # the CSV's columns only: the same figures in both
            self.board.add(section, {k: row.get(k) for k in log.fields}, row["step"])

    def flush(self) -> None:
        """Before each checkpoint: a run killed after it loses no event its resume keeps."""
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
