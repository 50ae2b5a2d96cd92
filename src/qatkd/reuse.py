"""Reusing finished runs: `run_or_reuse` returns a finished run folder's metrics, resumes an
interrupted one and otherwise runs the command, refusing a folder made with another resolved
configuration, from other model files or from other data (`check_reusable`).

What a script that runs many stages (the demo, the benchmarks) needs to survive being stopped and
started again; no command reuses a run by itself, so this sits above `qatkd.pipeline`, apart
from what the commands do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qatkd.config import Config, config_to_dict, dotted, load_config, read_yaml
from qatkd.errors import QatkdError
from qatkd.pipeline import distill, load_data, ptq, ptq_config, resume, train
from qatkd.quant.config import BEFORE_KEYS
from qatkd.run_dirs import INPUTS, run_inputs
from qatkd.tasks import task_family


def _ptq_checkpoint(config: Config) -> str | None:
    """What `qatkd ptq` quantizes for `config`: its `model.init`, or None for a family that
    quantizes its pretrained model."""
    return config.model.init if task_family(config.task).ptq_from_checkpoint else None


def command_config(command: str, overrides: list[str]) -> Config:
    """The resolved config that `qatkd <command> overrides` (train, distill or ptq) runs with:
    what its run folder's config.yaml holds."""
    config = load_config(overrides=overrides)
    if command == "ptq":
        config = ptq_config(_ptq_checkpoint(config), overrides, None)
    return task_family(config.task).resolve(config)


KEYS_WITH_OLD_BEHAVIOUR: dict[str, Any] = {
    "quant.asymmetric": False,  # symmetric grids, all there were before the key
    "quant.init_samples": 128,  # read only with quant.init=gptq, which came with it
    **{f"quant.{key}": value for key, value in BEFORE_KEYS.items()},
}
"""Config keys added after runs were made whose value here is what qatkd did before the key
existed: a saved config.yaml without one (but with its section) is read as holding this value.
Any other key missing from a saved config refuses the folder, as a new key's default need not
reproduce the older code. Add a key here only when that is so."""


def _saved_config(saved: Path) -> dict[str, Any]:
    """A run folder's config.yaml, dotted, with the keys of `KEYS_WITH_OLD_BEHAVIOUR` that an
    earlier qatkd did not write."""
    made = dotted(read_yaml(saved))
    for key, value in KEYS_WITH_OLD_BEHAVIOUR.items():
        section = key.rsplit(".", 1)[0] + "."
        if key not in made and any(k.startswith(section) for k in made):
            made[key] = value
    return made


def check_reusable(run_dir: Path, command: str, overrides: list[str]) -> None:
    """Refuse a run folder made with another resolved configuration (any key but `out`), from
    other model files (`input_digests`) or from other data (`data_digest`: the data is loaded
    and hashed, as the run itself does): its metrics would be another experiment's, reported
    under this one's name."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    config = command_config(command, overrides)
    wanted = dotted(config_to_dict(config))
    made = _saved_config(saved)
    differ = [
        k
        for k in sorted(wanted.keys() | made.keys())
        if k != "out" and made.get(k) != wanted.get(k)
    ]
    if differ:
        first, more = differ[0], len(differ) - 1
        there = (
            f"{made[first]!r} there"
            if first in made
            else "not in its config.yaml, which an earlier qatkd wrote"
        )
        raise QatkdError(
            f"{run_dir} was made with other settings ({first}: {there}, "
            f"{wanted.get(first)!r} now{f', and {more} more' if more else ''}); delete the folder "
            "or choose another one"
        )
    inputs = run_dir / INPUTS
    recorded = json.loads(inputs.read_text()) if inputs.is_file() else {}
    for key, digest in run_inputs(config, load_data(config, command)).items():
        if recorded.get(key) != digest:
            raise QatkdError(
                f"{run_dir} was not made from the current {key} (its content differs, or the "
                "folder has no record of it); delete the folder or choose another one"
            )


def run_or_reuse(run_dir: Path, command: str, overrides: list[str]) -> dict[str, Any]:
    """The metrics of `qatkd <command> overrides out=run_dir` (train, distill or ptq), reusing a
    finished run folder and resuming an interrupted one: what a script that runs many stages
    (the demo, the benchmarks) needs to survive being stopped and started again. A folder made
    with another configuration or from other model files is refused (`check_reusable`)."""
    overrides = [*overrides, f"out={run_dir}"]
    check_reusable(run_dir, command, overrides)
    if (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "last.pt").is_file() and command != "ptq":
        return resume(run_dir)[1]
    config = command_config(command, overrides)
    if command == "ptq":
        return ptq(_ptq_checkpoint(config), overrides)[1]
    return {"train": train, "distill": distill}[command](config)[1]
