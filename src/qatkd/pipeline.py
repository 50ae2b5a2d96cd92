"""What each command does, wired from the parts: config -> data + models -> quantize -> engine.

The CLI parses arguments and prints; these functions do the work and return what they measured,
so scripts and benchmarks call them directly.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qatkd.balance import BalancerConfig, build_balancer
from qatkd.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from qatkd.config import (
    Config,
    ModelConfig,
    apply_overrides,
    build_config,
    config_to_dict,
    load_config,
    read_yaml,
    save_config,
)
from qatkd.distill import TeacherEnsemble, TeacherLogitCache, file_sha256
from qatkd.errors import QatkdError
from qatkd.quant import QuantConfig, calibrate, prepare, quant_summary
from qatkd.tasks import ImageFamily, image_family
from qatkd.tasks.classification import ImageData, model_meta
from qatkd.tasks.classification.data import WithIndex
from qatkd.tasks.classification.task import predict_all
from qatkd.train import fit
from qatkd.train.distributed import World, broadcast, init_world
from qatkd.train.engine import Task, TeacherOutputs

CALIBRATION_SAMPLES = 512


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


def family_of(task: str) -> ImageFamily:
    """The image family that this module runs for `task` (classification, detection)."""
    family = image_family(task)
    if family is None:
        raise QatkdError(f"task {task} is not an image task")
    return family


def data_meta(config: Config, data: ImageData) -> dict[str, Any]:
    return model_meta(
        config.model.name,
        data.in_channels,
        data.image_size,
        data.class_names,
        data.mean,
        data.std,
        config.task,
    )


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    model = family_of(meta.get("task", "classification")).build_model(
        meta["model_name"], meta["in_channels"], len(meta["class_names"]), meta["mean"], meta["std"]
    )
    if meta.get("quant"):
        prepare(model, QuantConfig(**meta["quant"]))
    return model


def load_model(
    path: str | Path, state: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model stored in a checkpoint, in eval mode, and the checkpoint itself (`state`: the
    checkpoint when already loaded)."""
    state = state if state is not None else load_checkpoint(path)
    model = model_from_meta(state["meta"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise QatkdError(
            f"checkpoint {path} does not fit model '{state['meta']['model_name']}': "
            f"{str(e).splitlines()[0]}"
        ) from e
    return model.eval(), state


def _check_matches_data(
    meta: dict[str, Any], data: ImageData, what: str, path: str, task: str
) -> None:
    """A checkpoint used with `data` (a teacher, `model.init`, the model under eval or ptq) must
    be of the same task family, classes and input shape: a one-line error names the file."""
    family = meta.get("task", "classification")
    if family != task:
        raise QatkdError(f"{what} {path} is a {family} model, but this run's task is {task}")
    if len(meta["class_names"]) != data.num_classes or meta["in_channels"] != data.in_channels:
        raise QatkdError(
            f"{what} {path} was trained for {len(meta['class_names'])} classes and "
            f"{meta['in_channels']} input channels, but data '{data.name}' has "
            f"{data.num_classes} classes and {data.in_channels} channels"
        )
    if meta["image_size"] != data.image_size:
        raise QatkdError(
            f"{what} {path} was trained on {meta['image_size']}x{meta['image_size']} images, "
            f"but data '{data.name}' has {data.image_size}x{data.image_size}"
        )


def build_student(config: Config, data: ImageData) -> tuple[nn.Module, dict[str, Any]]:
    """The student: built by name, loaded from `model.init` if set, quantized if `quant` is set."""
    meta = data_meta(config, data)
    build = family_of(config.task).build_model
    model = build(config.model.name, data.in_channels, data.num_classes, data.mean, data.std)
    if config.model.init:
        init_state = load_checkpoint(config.model.init)
        init_meta = init_state["meta"]
        _check_matches_data(init_meta, data, "model.init", config.model.init, config.task)
        if init_meta.get("quant"):
            raise QatkdError(
                f"model.init={config.model.init} is quantized: "
                "start from a full-precision checkpoint"
            )
        if init_meta["model_name"] != config.model.name:
            raise QatkdError(
                f"model.init={config.model.init} holds a '{init_meta['model_name']}', "
                f"but model.name is '{config.model.name}'"
            )
        model.load_state_dict(load_model(config.model.init, init_state)[0].state_dict())
    if config.quant is not None:
        prepare(model, config.quant)
        calibrate(model, calibration_batches(data, config), CALIBRATION_SAMPLES)
        meta["quant"] = config.quant.model_dump(mode="json")
    return model, meta


def calibration_batches(data: ImageData, config: Config) -> DataLoader:
    """A few hundred training images in a seeded order, to initialise the quantizers."""
    return DataLoader(
        data.train,
        batch_size=128,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )


def load_teachers(config: Config, data: ImageData) -> TeacherEnsemble:
    teachers = []
    for path in config.teachers:
        state = load_checkpoint(path)
        _check_matches_data(state["meta"], data, "teacher", path, config.task)
        teachers.append(load_model(path, state)[0])
    return TeacherEnsemble(teachers, names=config.teachers)


def preflight(config: Config) -> None:
    """Fail on a wrong model name or a missing file before any data is loaded or work done."""
    if config.train.gradient_checkpointing:
        raise QatkdError("train.gradient_checkpointing is for language models (task=language)")
    family_of(config.task).check_model_name(config.model.name)
    for what, path in [("model.init", config.model.init)] + [
        ("teacher", t) for t in config.teachers
    ]:
        if path is not None and not checkpoint_path(path).is_file():
            raise QatkdError(f"{what} checkpoint not found: {path}")


def join_world(config: Config) -> World:
    """This process's place among the workers, seeded and threaded as configured."""
    world = init_world(config.train.device)
    torch.manual_seed(config.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    return world


def create_run_dir(config: Config, command: str, world: World) -> Path:
    """The new run folder with its config.yaml, made by rank 0 and announced to every rank (an
    error there, such as a folder that already holds a run, is raised on every rank)."""
    run_dir, error = None, None
    if world.is_main:
        try:
            run_dir = new_run_dir(config, command)
            save_config(config, run_dir / "config.yaml")
        except QatkdError as e:
            error = str(e)
    run_dir, error = broadcast(world, (run_dir, error))
    if error is not None:
        raise QatkdError(error)
    return run_dir


def _start(config: Config, command: str) -> tuple[Path, ImageData, World]:
    preflight(config)
    world = join_world(config)
    data = family_of(config.task).load_data(config.data)
    return create_run_dir(config, command, world), data, world


def task_family(task: str) -> ModuleType:
    """The run functions (train, distill, ptq, evaluate, resume, export) of a task family that is
    not an image family (which this module runs itself): `qatkd.tasks.<task>.run`."""
    return importlib.import_module(f"qatkd.tasks.{task}.run")


def teacher_outputs(
    config: Config, data: ImageData, task: Task, device: torch.device
) -> tuple[TeacherOutputs, Dataset]:
    """How the engine gets the teachers' logits for a batch (on `device`), and the training set
    to use.

    Live: the frozen ensemble runs on every batch. With `kd.cache=true` (non-augmented data only)
    each teacher's logits for every training image are computed once, stored on disk keyed by the
    teacher file's hash and the data, and looked up by sample index."""
    ensemble = load_teachers(config, data).to(device)
    if not config.kd.cache:
        return (lambda batch: ensemble(task.inputs(batch))), data.train
    if config.data.augment:
        raise QatkdError(
            "kd.cache=true needs data.augment=false: augmented images change every epoch"
        )
    data_key = config.data.model_dump(mode="json")
    logits = []
    for path, teacher in zip(config.teachers, ensemble.teachers, strict=True):
        cache = TeacherLogitCache(
            config.kd.cache_dir,
            {"teacher": file_sha256(checkpoint_path(path)), "data": data_key, "transform": "none"},
        )
        logits.append(cache.get(lambda t=teacher: predict_all(t, data.train)).to(device))
    return (lambda batch: [t[batch[-1]] for t in logits]), WithIndex(data.train)


def _fit_run(
    config: Config,
    run_dir: Path,
    data: ImageData,
    model: nn.Module,
    meta: dict[str, Any],
    world: World,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Labels only when there are no teachers (train), else the configured balancer (distill)."""
    balancer_config = config.balancer if config.teachers else BalancerConfig(name="ts_only")
    balancer = build_balancer(balancer_config, num_teachers=len(config.teachers))
    task = family_of(config.task).make_task(
        data.num_classes, config.kd, config.balancer.per_teacher
    )
    outputs, train_set = (None, data.train)
    if config.teachers:
        outputs, train_set = teacher_outputs(config, data, task, world.device)
    if world.is_main and config.quant is not None and resume is None:
        print(quant_summary(model))
    return fit(
        model, task, train_set, data.test, config, run_dir, meta, balancer, outputs, resume, world
    )


def train(config: Config) -> tuple[Path, dict[str, Any]]:
    """Train on labels only: an FP32 model, or plain QAT when `quant` is set."""
    if image_family(config.task) is None:
        return task_family(config.task).train(config)
    if config.teachers:
        raise QatkdError(
            "train learns from labels only; to learn from teachers use 'qatkd distill'"
        )
    run_dir, data, world = _start(config, "train")
    model, meta = build_student(config, data)
    return run_dir, _fit_run(config, run_dir, data, model, meta, world)


def distill(config: Config) -> tuple[Path, dict[str, Any]]:
    """QAT (or FP32) student trained on labels and teachers, balanced by `config.balancer`."""
    if image_family(config.task) is None:
        return task_family(config.task).distill(config)
    build_balancer(config.balancer, num_teachers=len(config.teachers))  # fail before any work
    run_dir, data, world = _start(config, "distill")
    model, meta = build_student(config, data)
    return run_dir, _fit_run(config, run_dir, data, model, meta, world)


def resume(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Continue an interrupted train or distill run from its last checkpoint, exactly."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / "last.pt")
    if "optimizer" not in state:
        raise QatkdError(f"{run_dir} is not a train or distill run: there is nothing to resume")
    config = build_config(state["config"])
    if image_family(config.task) is None:
        return task_family(config.task).resume(run_dir, state)
    world = join_world(config)
    data = family_of(config.task).load_data(config.data)
    model = model_from_meta(state["meta"])
    return run_dir, _fit_run(config, run_dir, data, model, state["meta"], world, resume=state)


def ptq(
    ckpt: str | Path | None, overrides: list[str], config_file: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Post-training quantization: calibrate an FP32 checkpoint's quantizers, no training.

    The data and seed default to the checkpoint's own; `config_file` and `overrides` change them
    and set `quant.*`. Without `ckpt`, a task family that starts from a pretrained model
    (language) quantizes the model its config names."""
    if ckpt is None:
        config = load_config(config_file, overrides)
        if image_family(config.task) is not None:
            raise QatkdError(f"ptq of a {config.task} model needs its FP32 checkpoint: --ckpt PATH")
        return task_family(config.task).ptq(config)
    float_model, state = load_model(ckpt)
    if state["meta"].get("quant"):
        raise QatkdError(
            f"{ckpt} is already quantized: ptq starts from a full-precision checkpoint"
        )
    raw = read_yaml(config_file) if config_file else {}
    saved = state["config"]
    raw = {"task": saved.get("task", "classification"), "data": saved["data"], **raw}
    raw = {"seed": saved["seed"], **raw}
    config = build_config(apply_overrides(raw, overrides))
    if config.quant is None:
        raise QatkdError("ptq needs a bit-width: set quant.bits=W4A4 (or another)")
    config = config.model_copy(
        update={"model": ModelConfig(name=state["meta"]["model_name"], init=str(ckpt))}
    )
    run_dir, data, _ = _start(config, "ptq")
    _check_matches_data(state["meta"], data, "checkpoint", str(ckpt), config.task)
    model = prepare(float_model, config.quant)
    calibrate(model, calibration_batches(data, config), CALIBRATION_SAMPLES)
    print(quant_summary(model))
    task = family_of(config.task).make_task(data.num_classes, None, False)
    metrics = task.evaluate(model, DataLoader(data.test, batch_size=task.eval_batch_size))
    meta = {**state["meta"], "quant": config.quant.model_dump(mode="json")}
    return run_dir, save_ptq_run(run_dir, meta, config, model, metrics)


def save_ptq_run(
    run_dir: Path, meta: dict[str, Any], config: Config, model: nn.Module, metrics: dict[str, Any]
) -> dict[str, Any]:
    """A PTQ run folder's last.pt (no optimizer: nothing to resume) and metrics.json."""
    checkpoint = {"meta": meta, "config": config_to_dict(config), "model": model.state_dict()}
    save_checkpoint({**checkpoint, "metrics": metrics}, run_dir / "last.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def checkpoint_data(state: dict[str, Any], overrides: list[str]) -> ImageData:
    """The data a checkpoint was trained on, without augmentation, `data.*` overrides applied."""
    config = build_config(apply_overrides(state["config"], overrides))
    return family_of(config.task).load_data(config.data.model_copy(update={"augment": False}))


def evaluate(ckpt: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Test metrics of a checkpoint on the data it was trained on, `data.*` overrides applied."""
    for text in overrides or []:
        if not text.startswith("data."):
            raise QatkdError(f"eval takes only data.* overrides, not '{text}'")
    state = load_checkpoint(checkpoint_path(ckpt))
    task_name = state["config"].get("task", "classification")
    if image_family(task_name) is None:
        return task_family(task_name).evaluate(state, overrides or [])
    model, state = load_model(ckpt, state)
    data = checkpoint_data(state, overrides or [])
    _check_matches_data(state["meta"], data, "checkpoint", str(ckpt), task_name)
    task = family_of(task_name).make_task(data.num_classes, None, False)
    return task.evaluate(model, DataLoader(data.test, batch_size=task.eval_batch_size))


def run_or_reuse(run_dir: Path, command: str, overrides: list[str]) -> dict[str, Any]:
    """The metrics of `qatkd <command> overrides out=run_dir` (train, distill or ptq), reusing a
    finished run folder and resuming an interrupted one: what a script that runs many stages
    (the demo, the benchmarks) needs to survive being stopped and started again."""
    if (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "last.pt").is_file() and command != "ptq":
        return resume(run_dir)[1]
    overrides = [*overrides, f"out={run_dir}"]
    if command == "ptq":
        config = load_config(overrides=overrides)
        ckpt = config.model.init if image_family(config.task) is not None else None
        return ptq(ckpt, overrides)[1]
    return {"train": train, "distill": distill}[command](load_config(overrides=overrides))[1]
