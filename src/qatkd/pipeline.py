"""What each command does, wired from the parts: config -> data + models -> quantize -> engine ->
checkpoint -> export. Family-agnostic: everything task-specific is the `TaskFamily`'s
(`qatkd.tasks`), found by the config's `task`.

The CLI parses arguments and prints; these functions do the work and return what they measured,
so scripts and benchmarks call them directly.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from qatkd.balance import BalancerConfig, build_balancer
from qatkd.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
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
    saved_config,
)
from qatkd.errors import QatkdError
from qatkd.progress import report
from qatkd.quant import quant_summary
from qatkd.run_dirs import (
    check_free_disk,
    check_out_folder,
    checkpoint_bytes,
    create_run_dir,
    run_folder,
)
from qatkd.tasks import Source, TaskFamily, task_family
from qatkd.train import evaluate_splits, fit
from qatkd.train.distributed import World, init_world
from qatkd.train.held_out import reserve_held_out
from qatkd.train.step import time_steps
from qatkd.train.tensorboard import require_tensorboard


def join_world(config: Config) -> World:
    """This process's place among the workers and its device, seeded and threaded as
    configured."""
    world = init_world(config.train.device)
    torch.manual_seed(config.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    return world


@dataclass
class Started:
    """What a run has once everything that could refuse it has passed: the resolved config, its
    family, data, process group, the student (built, quantized, calibrated) and its run folder."""

    config: Config
    family: TaskFamily
    source: Source
    world: World
    model: nn.Module
    meta: dict[str, Any]
    run_dir: Path


def preflight(config: Config, command: str) -> tuple[Config, TaskFamily, Source, World]:
    """Every check that a later stage would fail on, before any folder is made: the family's
    rules on the config alone (`check`), the packages the config asks for, the run folder's
    place, the data, and the teachers and `model.init` against the data (`preflight`)."""
    family = task_family(config.task)
    config = family.resolve(config)
    family.check(config)
    if config.train.tensorboard and command != "ptq":  # ptq does not train: nothing to log
        require_tensorboard()
    config = config.model_copy(update={"out": str(run_folder(config, command))})
    check_out_folder(Path(config.out))
    world = join_world(config)
    source = load_data(config, command)
    family.preflight(config, source)
    return config, family, source, world


def load_data(config: Config, command: str) -> Source:
    """The data `command` reads (a PTQ trains nothing: no validation split is drawn from its
    training data, which a family may leave unloaded)."""
    return task_family(config.task).load(config, training=command != "ptq")


def _student(
    config: Config, command: str
) -> tuple[Config, TaskFamily, Source, World, nn.Module, dict[str, Any]]:
    """`preflight`, the student, and a check that the disk holds its checkpoints."""
    config, family, source, world = preflight(config, command)
    model, meta = family.build_student(config, source)
    check_free_disk(Path(config.out), checkpoint_bytes(model, command))
    return config, family, source, world, model, meta


def _start(config: Config, command: str) -> Started:
    """Everything that could refuse the run (`_student`), and only then the run folder."""
    config, family, source, world, model, meta = _student(config, command)
    run_dir = create_run_dir(config, command, world, source)
    return Started(config, family, source, world, model, meta, run_dir)


def check(config: Config, command: str = "train") -> dict[str, Any]:
    """`qatkd check`: everything `command` (train, distill or ptq) would check before it starts,
    then a few real training steps on real batches, without a run folder: the model, the
    data, the steps, the measured seconds a step, the whole run's estimated time and the peak
    memory, as facts (`check_lines` words them)."""
    if command == "distill":
        build_balancer(config.balancer, num_teachers=len(config.teachers))
    elif config.teachers:
        raise QatkdError(f"{command} takes no teachers; check --command distill")
    config, family, source, world, model, _ = _student(config, command)
    splits = {"train": source.train, "val": source.val, "test": source.test}
    facts: dict[str, Any] = {
        "model": config.model.path or config.model.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "quant": None if config.quant is None else config.quant.bits,
        "samples": {k: len(v) for k, v in splits.items() if v is not None},
    }
    if command == "ptq":
        return facts | {"steps": 0, "peak_memory_bytes": peak_memory(world.device)}
    # live teachers: a cache would be filled first, then read faster
    live = config.model_copy(update={"kd": config.kd.model_copy(update={"cache": False})})
    task, balancer, outputs, train_set = _training_parts(live, family, source, world)
    model.to(world.device)
    per_step = time_steps(model, task, train_set, config, balancer, outputs)
    student_set, held = reserve_held_out(train_set, config, balancer)
    if held is not None:  # the balancer's share is no part of the student's epochs
        facts["samples"] |= {"train": len(student_set), "balancer": len(held)}
    batch = config.train.batch_size
    drop_last = len(student_set) > batch
    per_epoch = len(student_set) // batch if drop_last else -(-len(student_set) // batch)
    steps = per_epoch * config.train.epochs
    evaluation = evaluation_seconds(task, model, [source.val, source.test])
    return facts | {
        "steps_per_epoch": per_epoch,
        "epochs": config.train.epochs,
        "steps": steps,
        "seconds_per_step": per_step,
        "evaluation_seconds_per_epoch": evaluation,
        "estimated_seconds": per_step * steps + evaluation * config.train.epochs,
        "peak_memory_bytes": peak_memory(world.device),
    }


def evaluation_seconds(task: Any, model: nn.Module, splits: list[Any]) -> float:
    """The time one epoch's evaluation of `splits` takes, from one timed batch of each."""
    seconds = 0.0
    for split in splits:
        if split is not None and len(split):
            count = min(len(split), task.eval_batch_size)
            started = time.perf_counter()
            evaluate_splits(task, model.eval(), {"x": Subset(split, range(count))})
            seconds += (time.perf_counter() - started) * len(split) / count
    return seconds


def peak_memory(device: torch.device) -> int:
    """This process's peak memory in bytes: resident on the CPU, allocated on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def check_lines(facts: dict[str, Any]) -> list[str]:
    """`check`'s facts, one line each, as `qatkd check` prints them."""
    samples = ", ".join(f"{n:,} {split}" for split, n in facts["samples"].items())
    quant = f", {facts['quant']}" if facts["quant"] else ", full precision"
    lines = [
        f"model: {facts['model']} ({facts['parameters']:,} parameters{quant})",
        f"samples: {samples}",
    ]
    if facts["steps"]:
        lines += [
            f"steps: {facts['steps_per_epoch']:,} an epoch x {facts['epochs']} epochs = "
            f"{facts['steps']:,}",
            f"seconds per step: {facts['seconds_per_step']:.3g} (3 real steps after a warm-up)",
            f"evaluation: about {facts['evaluation_seconds_per_epoch']:.3g} s an epoch",
            f"estimated time: {_duration(facts['estimated_seconds'])}",
        ]
    lines.append(f"peak memory: {facts['peak_memory_bytes'] / 2**30:.2f} GiB")
    return lines


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _training_parts(
    config: Config, family: TaskFamily, source: Source, world: World
) -> tuple[Any, Any, Any, Any]:
    """The task, the balancer (labels only without teachers), the teachers' outputs (None
    without teachers) and the training set they go with."""
    balancer_config = config.balancer if config.teachers else BalancerConfig(name="ts_only")
    balancer = build_balancer(balancer_config, num_teachers=len(config.teachers))
    task = family.make_task(config, source)
    outputs, train_set = None, source.train
    if config.teachers:
        outputs, train_set = family.teacher_outputs(config, source, task, world.device)
    return task, balancer, outputs, train_set


def _fit_run(run: Started, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Labels only when there are no teachers (train), else the configured balancer (distill)."""
    config, family, source, world, model = run.config, run.family, run.source, run.world, run.model
    task, balancer, outputs, train_set = _training_parts(config, family, source, world)
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
        run.run_dir,
        run.meta,
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
    run = _start(config, "train")
    return run.run_dir, _fit_run(run)


def distill(config: Config) -> tuple[Path, dict[str, Any]]:
    """QAT (or FP32) student trained on labels and teachers, balanced by `config.balancer`."""
    build_balancer(config.balancer, num_teachers=len(config.teachers))  # fail before any work
    run = _start(config, "distill")
    return run.run_dir, _fit_run(run)


def resume(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Continue an interrupted train or distill run from its last checkpoint, exactly."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / "last.pt")
    if "optimizer" not in state:
        raise QatkdError(f"{run_dir} is not a train or distill run: there is nothing to resume")
    config = checkpoint_config(state)
    if config.train.tensorboard:
        require_tensorboard()
    family = task_family(config.task)
    world = join_world(config)
    source = family.load(config)
    model = family.restore(state, source)
    run = Started(config, family, source, world, model, state["meta"], run_dir)
    return run_dir, _fit_run(run, resume=state)


def ptq_config(ckpt: str | Path | None, overrides: list[str], config_file: Any) -> Config:
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
    data = {**saved["data"], **raw.get("data", {})}  # the file's data keys over the checkpoint's
    raw = {"seed": saved["seed"], "task": saved["task"], **raw, "data": data}
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
    config = ptq_config(ckpt, overrides, config_file)
    if config.quant is None:
        raise QatkdError("ptq needs a bit-width: set quant.bits=W4A4 (or another)")
    run = _start(config, "ptq")
    report(quant_summary(run.model))
    task = run.family.make_task(run.config, run.source)
    metrics = evaluate_splits(task, run.model.eval(), {"test": run.source.test})
    return run.run_dir, save_ptq_run(run.run_dir, run.meta, run.config, run.model, metrics)


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
