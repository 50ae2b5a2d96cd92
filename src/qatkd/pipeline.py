"""What each command does, wired from the parts: config -> data + models -> quantize -> engine ->
checkpoint -> export. Family-agnostic: everything task-specific is the `TaskFamily`'s
(`qatkd.tasks`), found by the config's `task`.

The CLI parses arguments and prints; these functions do the work and return what they measured,
so scripts and benchmarks call them directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatkd.balance import BalancerConfig, build_balancer
from qatkd.checkpoint import checkpoint_path, content_sha256, load_checkpoint, save_checkpoint
from qatkd.config import (
    Config,
    ModelConfig,
    apply_overrides,
    build_config,
    checkpoint_config,
    checkpoint_task,
    config_to_dict,
    load_config,
    read_yaml,
    save_config,
    saved_config,
)
from qatkd.errors import QatkdError
from qatkd.progress import report
from qatkd.quant import quant_summary
from qatkd.tasks import Source, TaskFamily, task_family
from qatkd.train import evaluate_splits, fit
from qatkd.train.distributed import World, broadcast, init_world


def new_run_dir(config: Config, command: str) -> Path:
    """The run folder; refuses to write over a folder that already holds a run."""
    if config.out:
        run_dir = Path(config.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{command}-{config.model.name.replace(':', '_')}-{stamp}"
    if run_dir.exists() and not run_dir.is_dir():
        raise QatkdError(f"out={run_dir} is a file: name a folder for the run")
    if (run_dir / "last.pt").exists() or (run_dir / "metrics.json").exists():
        raise QatkdError(
            f"run folder {run_dir} already holds a run: resume it with --resume {run_dir} "
            "or choose another out="
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def join_world(config: Config) -> World:
    """This process's place among the workers and its device, seeded and threaded as
    configured."""
    world = init_world(config.train.device)
    torch.manual_seed(config.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    return world


INPUTS = "inputs.json"
"""A run folder's record of the content of every model it started or learned from."""


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


def create_run_dir(config: Config, command: str, world: World) -> Path:
    """The new run folder with its config.yaml and inputs.json, made by rank 0 and announced to
    every rank (an error there, such as a folder that already holds a run, is raised on every
    rank)."""
    run_dir, error = None, None
    if world.is_main:
        try:
            run_dir = new_run_dir(config, command)
            save_config(config, run_dir / "config.yaml")
            inputs = json.dumps(input_digests(config), indent=2)
            (run_dir / INPUTS).write_text(inputs + "\n")
        except QatkdError as e:
            error = str(e)
    run_dir, error = broadcast(world, (run_dir, error))
    if error is not None:
        raise QatkdError(error)
    return run_dir


def _start(config: Config, command: str) -> tuple[Config, TaskFamily, Path, Source, World]:
    """Checks, process group, data, run folder: everything before the student is built."""
    family = task_family(config.task)
    config = family.resolve(config)
    family.check(config)
    world = join_world(config)
    source = family.load(config, training=command != "ptq")
    return config, family, create_run_dir(config, command, world), source, world


def _fit_run(
    config: Config,
    family: TaskFamily,
    run_dir: Path,
    source: Source,
    model: nn.Module,
    meta: dict[str, Any],
    world: World,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Labels only when there are no teachers (train), else the configured balancer (distill)."""
    balancer_config = config.balancer if config.teachers else BalancerConfig(name="ts_only")
    balancer = build_balancer(balancer_config, num_teachers=len(config.teachers))
    task = family.make_task(config, source)
    outputs, train_set = None, source.train
    if config.teachers:
        outputs, train_set = family.teacher_outputs(config, source, task, world.device)
    if world.is_main and config.quant is not None and resume is None:
        report(quant_summary(model))
    independence = family.validation_independence(config, source)
    if world.is_main:
        for model_file, verdict in independence.items():
            if verdict != "independent":
                known = not verdict.startswith("unknown")
                report(
                    f"note: {model_file}: {verdict}"
                    + ("; validation is not independent of it" if known else "")
                )
    return fit(
        model,
        task,
        train_set,
        source.val,
        source.test,
        config,
        run_dir,
        meta,
        balancer,
        outputs,
        resume,
        world,
        {"validation_independence": independence},
    )


def train(config: Config) -> tuple[Path, dict[str, Any]]:
    """Train on labels only: an FP32 model, or plain QAT when `quant` is set."""
    if config.teachers:
        raise QatkdError(
            "train learns from labels only; to learn from teachers use 'qatkd distill'"
        )
    config, family, run_dir, source, world = _start(config, "train")
    model, meta = family.build_student(config, source)
    return run_dir, _fit_run(config, family, run_dir, source, model, meta, world)


def distill(config: Config) -> tuple[Path, dict[str, Any]]:
    """QAT (or FP32) student trained on labels and teachers, balanced by `config.balancer`."""
    build_balancer(config.balancer, num_teachers=len(config.teachers))  # fail before any work
    config, family, run_dir, source, world = _start(config, "distill")
    model, meta = family.build_student(config, source)
    return run_dir, _fit_run(config, family, run_dir, source, model, meta, world)


def resume(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Continue an interrupted train or distill run from its last checkpoint, exactly."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / "last.pt")
    if "optimizer" not in state:
        raise QatkdError(f"{run_dir} is not a train or distill run: there is nothing to resume")
    config = checkpoint_config(state)
    family = task_family(config.task)
    world = join_world(config)
    source = family.load(config)
    model = family.restore(state, source)
    return run_dir, _fit_run(
        config, family, run_dir, source, model, state["meta"], world, resume=state
    )


def _ptq_config(ckpt: str | Path | None, overrides: list[str], config_file: Any) -> Config:
    """Without `ckpt`: the config of the file and overrides (a family that quantizes its
    pretrained model). With it: the checkpoint's task, data and seed, then the file and the
    overrides, starting from the checkpoint (`model.init`). Either way calibration reads the
    data as it is (`data.augment=false`), whatever the checkpoint trained with."""
    config = _ptq_source_config(ckpt, overrides, config_file)
    return config.model_copy(update={"data": config.data.model_copy(update={"augment": False})})


def _ptq_source_config(ckpt: str | Path | None, overrides: list[str], config_file: Any) -> Config:
    if ckpt is None:
        config = load_config(config_file, overrides)
        if task_family(config.task).ptq_from_checkpoint:
            raise QatkdError(f"ptq of a {config.task} model needs its FP32 checkpoint: --ckpt PATH")
        return config
    state = load_checkpoint(ckpt)
    if state["meta"].get("quant"):
        raise QatkdError(
            f"{ckpt} is already quantized: ptq starts from a full-precision checkpoint"
        )
    saved = saved_config({**state["config"], "task": checkpoint_task(state)})
    raw = read_yaml(config_file) if config_file else {}
    raw = {"seed": saved["seed"], "task": saved["task"], "data": saved["data"], **raw}
    config = build_config(apply_overrides(raw, overrides))
    if not task_family(config.task).ptq_from_checkpoint:
        raise QatkdError(
            f"ptq of a {config.task} model quantizes the pretrained model: drop --ckpt"
        )
    model = ModelConfig(name=state["meta"]["model_name"], init=str(ckpt))
    return config.model_copy(update={"model": model})


def ptq(
    ckpt: str | Path | None, overrides: list[str], config_file: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Post-training quantization, no training: calibrate the quantizers of the model the task
    family starts from, an FP32 checkpoint (`ckpt`) or the pretrained model the config names
    (`TaskFamily.ptq_from_checkpoint`)."""
    config = _ptq_config(ckpt, overrides, config_file)
    if config.quant is None:
        raise QatkdError("ptq needs a bit-width: set quant.bits=W4A4 (or another)")
    config, family, run_dir, source, _ = _start(config, "ptq")
    model, meta = family.build_student(config, source)
    report(quant_summary(model))
    task = family.make_task(config, source)
    metrics = evaluate_splits(task, model.eval(), {"test": source.test})
    return run_dir, save_ptq_run(run_dir, meta, config, model, metrics)


def save_ptq_run(
    run_dir: Path, meta: dict[str, Any], config: Config, model: nn.Module, metrics: dict[str, Any]
) -> dict[str, Any]:
    """A PTQ run folder's last.pt (no optimizer: nothing to resume) and metrics.json."""
    checkpoint = {"meta": meta, "config": config_to_dict(config), "model": model.state_dict()}
    save_checkpoint({**checkpoint, "metrics": metrics}, run_dir / "last.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate(ckpt: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Test metrics of a checkpoint on the data it was trained on, `data.*` overrides applied."""
    for text in overrides or []:
        if not text.startswith("data."):
            raise QatkdError(f"eval takes only data.* overrides, not '{text}'")
    path = checkpoint_path(ckpt)
    state = load_checkpoint(path)
    config = checkpoint_config(state, overrides)
    family = task_family(config.task)
    source = family.load(config, training=False)
    model = family.restore(state, source)
    task = family.make_task(config, source)
    return evaluate_splits(task, model, {"test": source.test})


def export(
    ckpt_or_run_dir: str | Path, out_dir: str | Path | None = None, data_limit: int | None = None
) -> dict[str, Any]:
    """`qatkd export`: the checkpoint's deployable files, written beside it (or into `out_dir`)
    the way its task family exports; parity on the first `data_limit` test samples."""
    path = checkpoint_path(ckpt_or_run_dir)
    state = load_checkpoint(path)
    out = Path(out_dir) if out_dir is not None else path.parent
    return task_family(checkpoint_task(state)).export(state, path, out, data_limit)


def bench(
    run_dir: str | Path,
    threads: int = 2,
    batch_sizes: tuple[int, ...] = (1, 64),
    repeats: int = 20,
    data_limit: int | None = None,
) -> dict[str, Any]:
    """`qatkd bench`: latency, size and parity of the exported model against FP32 (bench.md)."""
    path = checkpoint_path(run_dir)
    state = load_checkpoint(path)
    family = task_family(checkpoint_task(state))
    return family.bench(state, path, threads, batch_sizes, repeats, data_limit)


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def command_config(command: str, overrides: list[str]) -> Config:
    """The resolved config that `qatkd <command> overrides` (train, distill or ptq) runs with:
    what its run folder's config.yaml holds."""
    config = load_config(overrides=overrides)
    if command == "ptq":
        from_checkpoint = task_family(config.task).ptq_from_checkpoint
        config = _ptq_config(config.model.init if from_checkpoint else None, overrides, None)
    return task_family(config.task).resolve(config)


def check_reusable(run_dir: Path, command: str, overrides: list[str]) -> None:
    """Refuse a run folder made with another resolved configuration (any key but `out`), or
    from other model files (`input_digests`): its metrics would be another experiment's,
    reported under this one's name."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    config = command_config(command, overrides)
    wanted = _dotted(config_to_dict(config))
    made = _dotted(read_yaml(saved))
    differ = [
        k
        for k in sorted(wanted.keys() | made.keys())
        if k != "out" and made.get(k) != wanted.get(k)
    ]
    if differ:
        first, more = differ[0], len(differ) - 1
        raise QatkdError(
            f"{run_dir} was made with other settings ({first}: {made.get(first)!r} there, "
            f"{wanted.get(first)!r} now{f', and {more} more' if more else ''}); delete the folder "
            "or choose another one"
        )
    inputs = run_dir / INPUTS
    recorded = json.loads(inputs.read_text()) if inputs.is_file() else {}
    for key, digest in input_digests(config).items():
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
        from_checkpoint = task_family(config.task).ptq_from_checkpoint
        return ptq(config.model.init if from_checkpoint else None, overrides)[1]
    return {"train": train, "distill": distill}[command](config)[1]
