"""Run folders: where a run writes (`out`, or runs/<command>-<model>-<time>), the checks that the
folder can be made and the disk holds the run's checkpoints, and the folder itself with its
config.yaml and inputs.json.

Apart from `qatkd.pipeline` (what each command does) so that what a run folder is, and what it
records of a run's inputs (`INPUTS`, which `qatkd.reuse` compares), lives in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from torch import nn

from qatkd.checkpoint import checkpoint_path, content_sha256
from qatkd.config import Config, save_config
from qatkd.errors import QatkdError
from qatkd.tasks.data_identity import content_digest, underlying
from qatkd.tasks.family import Source
from qatkd.train.distributed import World, broadcast


def run_folder(config: Config, command: str) -> Path:
    """`out`, or runs/<command>-<model>-<time> (the time the run starts, to the second)."""
    if config.out:
        return Path(config.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{command}-{config.model.name.replace(':', '_')}-{stamp}"


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists: where a run folder would be made."""
    return next((p for p in (path, *path.parents) if p.exists()), Path.cwd())


def check_out_folder(run_dir: Path) -> None:
    """The run folder can be made (or is a folder): its nearest existing ancestor is a folder
    this user may write in."""
    if run_dir.exists() and not run_dir.is_dir():
        raise QatkdError(f"out={run_dir} is a file: name a folder for the run")
    existing = nearest_existing(run_dir)
    if not existing.is_dir():
        raise QatkdError(f"out={run_dir} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QatkdError(f"out={run_dir} cannot be made: {existing} is not writable")


def checkpoint_bytes(model: nn.Module, command: str) -> int:
    """About what the run's checkpoints take at once: the model, its optimizer state (up to two
    tensors a parameter), for last.pt, best.pt and the temporary copy of an atomic write."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if command == "ptq":
        return weights  # no optimizer, one file
    return 3 * (3 * weights)


def check_free_disk(run_dir: Path, needed: int) -> None:
    existing = nearest_existing(run_dir)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise QatkdError(
            f"not enough free disk for the checkpoints of this run in {existing}: about "
            f"{needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"
        )


def new_run_dir(config: Config, command: str) -> Path:
    """The run folder; refuses to write over a folder that already holds a run."""
    run_dir = run_folder(config, command)
    if run_dir.exists() and not run_dir.is_dir():
        raise QatkdError(f"out={run_dir} is a file: name a folder for the run")
    if (run_dir / "last.pt").exists() or (run_dir / "metrics.json").exists():
        raise QatkdError(
            f"run folder {run_dir} already holds a run: resume it with --resume {run_dir} "
            "or choose another out="
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


INPUTS = "inputs.json"
"""A run folder's record of the content of every model it started or learned from, and of its
data (`DATA`)."""
DATA = "data"


def input_digests(config: Config) -> dict[str, str]:
    """The content hash of every model a run starts or learns from (`model.init`, `model.path`,
    each teacher), by config key and path: what reusing a finished run compares beside its
    configuration. A run folder stands for its last.pt; a name that is no file or folder (a
    built-in model) stands for itself."""
    named = [("model.init", config.model.init), ("model.path", config.model.path)]
    named += [("teacher", t) for t in config.teachers]
    digests = {}
    for role, value in named:
        if value is not None:
            path = checkpoint_path(value) if checkpoint_path(value).is_file() else Path(value)
            digests[f"{role} {value}"] = content_sha256(path) if path.exists() else "a name"
    return digests


def data_digest(source: Source) -> str:
    """sha256 of the data a run reads: the content (`content_digest`) of the dataset below each
    of its splits (training, validation, test). Which samples of it a split takes follows from
    the configuration, which reuse compares apart. So an npz or image rewritten under the same
    `data.root`, or other text in the same file, is other data."""
    digest = hashlib.sha256()
    for split in (source.train, source.val, source.test):
        if split is not None:
            digest.update(content_digest(underlying(split)[0]).encode())
    return digest.hexdigest()


def run_inputs(config: Config, source: Source) -> dict[str, str]:
    """What a run folder's inputs.json records and reuse compares: the digests of the model
    files (`input_digests`) and of the data (`data_digest`)."""
    return {**input_digests(config), DATA: data_digest(source)}


def create_run_dir(config: Config, command: str, world: World, source: Source) -> Path:
    """The new run folder with its config.yaml and inputs.json (`run_inputs`, computed before
    the folder is made: a file that cannot be read leaves no folder behind), made by rank 0 and
    announced to every rank (an error there, such as a folder that already holds a run, is
    raised on every rank)."""
    run_dir, error = None, None
    if world.is_main:
        try:
            inputs = json.dumps(run_inputs(config, source), indent=2)
            run_dir = new_run_dir(config, command)
            save_config(config, run_dir / "config.yaml")
            (run_dir / INPUTS).write_text(inputs + "\n")
        except QatkdError as e:
            error = str(e)
    run_dir, error = broadcast(world, (run_dir, error))
    if error is not None:
        raise QatkdError(error)
    return run_dir
