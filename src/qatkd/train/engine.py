"""The training loop shared by every task family and every method.

Each step: student outputs -> task loss (labels) and, with teachers, KD loss -> the balancer
combines them -> backward. The engine knows nothing of images, boxes or tokens: the `Task` does.
A KD loss may have trainable parts of its own (feature adapters, `Task.kd_parts`): they train with
the student, in the same optimizer, and are saved in its checkpoints under `kd_parts`, but they
are no part of the student (`model`), so nothing that exports or evaluates it sees them.
Determinism: every epoch reseeds the shuffling and augmentation RNGs from (seed, epoch), and a
checkpoint written inside an epoch (on a stop signal, or every `train.save_every_min` minutes)
records how many batches of the epoch were done, the epoch's running sums and every rank's RNG
state, so a resumed run continues exactly as the uninterrupted run would have (on the CPU; GPU
loader workers draw their own seeds).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from qatkd.balance import LossBalancer, grad_conflict
from qatkd.checkpoint import save_checkpoint
from qatkd.config import Config, config_to_dict
from qatkd.device import device_name, loader_options, mixed_precision, to_device
from qatkd.errors import QatkdError
from qatkd.progress import progress, report
from qatkd.quant import Quantizer
from qatkd.train.distributed import World, any_rank, average_gradients, barrier, gather
from qatkd.train.held_out import HeldOutPass, reserve_held_out
from qatkd.train.logs import CsvLog
from qatkd.train.plots import plot_run
from qatkd.train.stops import RunStopped, StopRequests
from qatkd.train.task import Task, TeacherOutputs
from qatkd.train.tensorboard import ScalarLog

DIAG_KEYS = ["grad_norm_ts", "grad_norm_kd", "grad_ratio", "grad_cosine"]


def evaluate_splits(
    task: Task, model: nn.Module, splits: dict[str, Dataset | None]
) -> dict[str, float]:
    """`task`'s metrics on each split that is there, prefixed by its name (val_acc, test_acc)."""
    metrics = {}
    for split, dataset in splits.items():
        if dataset is not None:
            loader = DataLoader(dataset, task.eval_batch_size)
            evaluated = task.evaluate(model, loader, split=split)
            metrics |= {f"{split}_{k}": v for k, v in evaluated.items()}
    return metrics


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: not on norms, biases or quantizer scales."""
    quantizer_params = {
        id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 and id(p) not in quantizer_params else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "name": "norms_biases_quantizers"},
    ]


def build_optimizer(
    model: nn.Module, balancer: LossBalancer, config: Config, kd_parts: nn.Module | None = None
) -> torch.optim.Optimizer:
    train = config.train
    groups = parameter_groups(model, train.weight_decay)
    groups += balancer.param_groups(config.balancer.lr, train.lr)
    if kd_parts is not None:  # at the model's rate and weight decay
        groups += [
            {**group, "name": f"kd_{group['name']}"}
            for group in parameter_groups(kd_parts, train.weight_decay)
            if group["params"]
        ]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=train.lr)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base rate, then cosine decay to zero: a factor per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class SkipFirst(Sampler):
    """A sampler without its first `count` indices: a run resumed inside an epoch draws the
    epoch's remaining batches without loading the ones it already trained on."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.count = sampler, 0

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.sampler), self.count, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.count  # type: ignore[arg-type]


def rng_states(device: torch.device) -> dict[str, Any]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def make_kd_parts(
    task: Task,
    model: nn.Module,
    train_set: Dataset,
    balancer: LossBalancer,
    teacher_outputs: TeacherOutputs | None,
    seed: int,
) -> nn.Module | None:
    """`task.kd_parts` for a run that uses its teachers, on the model's device, shown the first
    training sample. The global RNG is left as it was, and the parts are initialised from `seed`
    alone, so every process of a run starts with the same ones."""
    if teacher_outputs is None or not balancer.needs_teacher:
        return None
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        example = to_device(default_collate([train_set[0]]), device)
        parts = task.kd_parts(model, teacher_outputs, example)
    return None if parts is None else parts.to(device)


def forward_losses(
    model: nn.Module,
    task: Task,
    batch: Any,
    balancer: LossBalancer,
    teacher_outputs: TeacherOutputs | None,
    precision: Any,
    held_out: HeldOutPass | None = None,
    step: int = 0,
) -> tuple[Any, torch.Tensor, Any, torch.Tensor]:
    """(outputs, L_TS, L_KD or None, the balanced total) of one batch, autocast as configured;
    with `held_out`, the balancer first takes the alignments measured on this step (if due;
    `step`: the steps done before this one)."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, precision.dtype, enabled=precision.enabled):
        outputs = model(task.inputs(batch))
        l_ts = task.task_loss(outputs, batch)
        l_kd = None
        if teacher_outputs is not None and balancer.needs_teacher:
            l_kd = task.kd_loss(outputs, teacher_outputs(batch))
    if held_out is not None:
        held_out.observe(balancer, l_ts, l_kd, step)
    return outputs, l_ts, l_kd, balancer(l_ts, l_kd)


def optimizer_step(
    total: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    world: World,
    balancer: LossBalancer,
    kd_parts: nn.Module | None = None,
) -> None:
    """Backward and one update of the model, the balancer and the KD loss's parts (their
    gradients averaged over the ranks; DDP averages the model's)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    average_gradients(world, balancer)
    if kd_parts is not None:
        average_gradients(world, kd_parts)
    scaler.step(optimizer)
    scaler.update()


def time_steps(
    model: nn.Module,
    task: Task,
    train_set: Dataset,
    config: Config,
    balancer: LossBalancer,
    teacher_outputs: TeacherOutputs | None,
    steps: int = 3,
) -> float:
    """Seconds per training step of this run on this machine, one process: the mean of `steps`
    real steps (forward, losses, backward, update) after a warm-up step. A balancer's
    held-out pass, which runs every `balancer.every` steps, is timed on every step and counted
    at its share. It trains `model`."""
    device = next(model.parameters()).device
    balancer.to(device)
    train_set, held = reserve_held_out(train_set, config, balancer)
    loader = DataLoader(train_set, batch_size=config.train.batch_size, shuffle=True)
    kd_parts = make_kd_parts(task, model, train_set, balancer, teacher_outputs, config.seed)
    optimizer = build_optimizer(model, balancer, config, kd_parts)
    precision = mixed_precision(device, config.train.bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    held_out = None
    if held is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        world = World(device=device)
        batch_size = config.train.batch_size
        held_out = HeldOutPass(held, model, task, params, config, batch_size, world, precision)
    model.train()
    balancer.train()
    timed: list[float] = []
    passes: list[float] = []

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for batch in itertools.islice(itertools.cycle(loader), steps + 1):
        started = now()
        batch = to_device(batch, device)
        _, l_ts, l_kd, total = forward_losses(
            model, task, batch, balancer, teacher_outputs, precision
        )
        if held_out is not None:
            before = now()
            held_out.observe(balancer, l_ts, l_kd, step=0)  # due: timed on every step
            passes.append(now() - before)
        optimizer_step(total, optimizer, scaler, World(), balancer, kd_parts)
        timed.append(now() - started)
    per_step = sum(timed[1:]) / steps
    if held_out is not None:
        per_step += sum(passes[1:]) / steps * (1 / config.balancer.every - 1)
    return per_step


def per_rank_batch_size(batch_size: int, world: World) -> int:
    """`train.batch_size` is the global batch: each of N processes takes 1/N of it."""
    if batch_size % world.size:
        raise QatkdError(
            f"train.batch_size={batch_size} does not split over {world.size} processes: "
            f"use a multiple of {world.size}"
        )
    return batch_size // world.size


class _StepLogger:
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


def fit(
    model: nn.Module,
    task: Task,
    train_set: Dataset,
    val_set: Dataset | None,
    test_set: Dataset,
    config: Config,
    run_dir: Path,
    meta: dict[str, Any],
    balancer: LossBalancer,
    teacher_outputs: TeacherOutputs | None = None,
    resume: dict[str, Any] | None = None,
    world: World | None = None,
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` for `config.train.epochs`, checkpointing every epoch; returns final metrics.

    Every epoch evaluates the validation and the test set (`val_*`, `test_*` metrics); `best.pt`
    is the epoch with the best validation `main_metric`, or, without a validation set, the best
    test one (`selected_on` in metrics.json says which).

    Training runs on `world.device` (model, balancer and batches go there; `teacher_outputs`
    must answer there). Under torchrun (`world.size > 1`) the model runs in
    DistributedDataParallel, each process takes its share of every global batch, and the
    balancer's gradients are averaged too. `facts`, known before training (whether validation
    is independent of the teachers), go into metrics.json as they are. A balancer that learns
    from held-out data takes `balancer.held_out` of `train_set` for it (`qatkd.train.held_out`);
    the student trains on the rest."""
    world = world or World()
    train_cfg = config.train
    device = world.device
    model.to(device)
    balancer.to(device)
    train_set, held = reserve_held_out(train_set, config, balancer)
    sampler = DistributedSampler(
        train_set, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed
    )
    batch_size = per_rank_batch_size(train_cfg.batch_size, world)
    remaining = SkipFirst(sampler)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=remaining,
        drop_last=len(train_set) > train_cfg.batch_size,
        **loader_options(device),
    )
    steps_per_epoch = len(loader)
    kd_parts = make_kd_parts(task, model, train_set, balancer, teacher_outputs, config.seed)
    optimizer = build_optimizer(model, balancer, config, kd_parts)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(
            steps_per_epoch * train_cfg.epochs, round(train_cfg.warmup_epochs * steps_per_epoch)
        ),
    )
    precision = mixed_precision(device, train_cfg.bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    sign = 1.0 if task.maximize else -1.0  # best is tracked as sign * main_metric
    splits = {"val": val_set, "test": test_set}
    selected_on = "test" if val_set is None else "val"
    start_epoch, step, best, best_epoch = 0, 0, -math.inf, 0
    last_metrics: dict[str, float] = {}
    best_metrics: dict[str, float] = {}
    position = None  # where inside `start_epoch` a mid-epoch checkpoint stopped
    seconds_before = 0.0  # trained before a resume (checkpoints before it did not say: 0)
    eval_seconds = 0.0  # of train_seconds, the epoch-end evaluations
    if resume is not None:
        model.load_state_dict(resume["model"])
        balancer.load_state_dict(resume["balancer"])
        if kd_parts is not None:
            if resume.get("kd_parts") is None:
                raise QatkdError(
                    f"{run_dir / 'last.pt'} holds no state of the KD loss's trainable parts "
                    "(feature adapters), which this run has: it cannot resume exactly; "
                    "start it again"
                )
            kd_parts.load_state_dict(resume["kd_parts"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch, step, best = resume["epoch"], resume["step"], resume["best"]
        last_metrics = dict(resume["metrics"])
        best_epoch, best_metrics = resume.get("best_epoch", 0), resume.get("best_metrics", {})
        position = resume.get("position")
        seconds_before = resume.get("train_seconds", 0.0)
        eval_seconds = resume.get("eval_seconds", 0.0)
    student = model
    if world.distributed:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    logger = _StepLogger(
        run_dir, config, task, balancer, [s for s, d in splits.items() if d is not None]
    )
    student_params = [p for p in student.parameters() if p.requires_grad]
    held_out = None
    if held is not None:
        held_out = HeldOutPass(
            held, student, task, student_params, config, batch_size, world, precision
        )
    total_steps = steps_per_epoch * train_cfg.epochs

    def checkpoint_state(epochs_done: int, position: dict[str, Any] | None) -> dict[str, Any]:
        """Everything a resume needs; `position`: the place inside epoch `epochs_done + 1`."""
        return {
            "meta": meta,
            "config": config_to_dict(config),
            "model": student.state_dict(),
            "balancer": balancer.state_dict(),
            "kd_parts": None if kd_parts is None else kd_parts.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epochs_done,
            "step": step,
            "best": best,
            "best_epoch": best_epoch,
            "best_metrics": best_metrics,
            "metrics": last_metrics,
            "position": position,
            "train_seconds": trained_seconds(),
            "eval_seconds": eval_seconds,
        }

    def stop_or_save(epoch: int, done: int, sums: list[float], stops: StopRequests) -> None:
        """After a step: on a stop signal (any rank's) or when `train.save_every_min` has
        passed, every rank's RNG state is gathered and rank 0 writes last.pt at this position;
        a stop then ends the run with `RunStopped`."""
        nonlocal last_save
        stop = any_rank(world, stops.signum is not None)
        minutes = train_cfg.save_every_min
        due = bool(minutes) and time.monotonic() - last_save >= 60 * minutes
        if not (stop or any_rank(world, due and world.is_main)):
            return
        position = {"batches": done, "sums": sums, "rng": gather(world, rng_states(device))}
        if world.is_main:
            logger.flush()
            save_checkpoint(checkpoint_state(epoch, position), run_dir / "last.pt")
        last_save = time.monotonic()
        if stop:
            barrier(world)
            raise RunStopped(step, total_steps, stops.signum or signal.SIGTERM, str(run_dir))

    def trained_seconds() -> float:
        """Seconds of training so far, the processes before a resume included."""
        return round(seconds_before + time.perf_counter() - started, 1)

    started, last_save = time.perf_counter(), time.monotonic()
    with StopRequests() as stops, contextlib.closing(logger):
        if world.is_main:
            logger.start(resume)
        for epoch in range(start_epoch, train_cfg.epochs):
            model.train()
            balancer.train()
            sampler.set_epoch(epoch)
            torch.manual_seed(epoch_seed(config.seed, epoch) + world.rank)
            done, sums, rng = 0, [0.0, 0.0, 0, 0], None  # sums: loss, acc, samples, units
            if position is not None:  # resumed inside this epoch
                if len(position["rng"]) != world.size:
                    raise QatkdError(
                        f"{run_dir / 'last.pt'} stopped inside an epoch of a run of "
                        f"{len(position['rng'])} processes: resume it with as many"
                    )
                done, sums = position["batches"], list(position["sums"])
                rng, position = position["rng"][world.rank], None
            remaining.count = done * batch_size
            batches = iter(loader)  # draws the loader's seed: restore the RNG after it
            if rng is not None:
                set_rng_states(rng, device)
            epoch_start = time.perf_counter()
            bar = progress(
                batches,
                desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
                total=steps_per_epoch,
                initial=done,
                disable=not world.is_main,
            )
            units_before = sums[3]
            for batch in bar:
                done += 1
                batch = to_device(batch, device)
                outputs, l_ts, l_kd, total = forward_losses(
                    model, task, batch, balancer, teacher_outputs, precision, held_out, step
                )
                diag = {}
                if config.diag.every and l_kd is not None and step % config.diag.every == 0:
                    diag = grad_conflict(l_ts, l_kd, student_params)
                step += 1
                if any_rank(world, not bool(torch.isfinite(total))):
                    if train_cfg.on_nonfinite == "stop":
                        raise QatkdError(
                            f"the loss became non-finite at step {step} (epoch {epoch + 1}; "
                            f"{total.item()} on this process); "
                            f"the last good checkpoint is {run_dir / 'last.pt'}: "
                            "lower train.lr and resume, or set train.on_nonfinite=skip"
                        )
                    report(f"warning: skipped step {step}: non-finite loss ({total.item()} here)")
                    schedule.step()
                    stop_or_save(epoch, done, sums, stops)
                    continue
                optimizer_step(total, optimizer, scaler, world, balancer, kd_parts)
                schedule.step()
                n = len(task.inputs(batch))
                sums[0] += total.item() * n
                sums[1] += task.batch_metrics(outputs, batch)["train_acc"] * n
                sums[2] += n
                sums[3] += task.units(batch)
                elapsed = time.perf_counter() - epoch_start
                rate = (sums[3] - units_before) * world.size / elapsed
                bar.set_postfix(
                    {"loss": f"{sums[0] / sums[2]:.3f}", "acc": f"{sums[1] / sums[2]:.1f}"}
                    | {f"{task.unit}_s": f"{rate:.0f}"},
                    refresh=False,
                )
                if world.is_main and (step % train_cfg.log_every == 0 or diag):
                    kd_sum = sum(l_kd) if isinstance(l_kd, list) else l_kd
                    logger.step(
                        {
                            "step": step,
                            "epoch": epoch + 1,
                            "lr": schedule.get_last_lr()[0],
                            "loss": total.item(),
                            "l_ts": l_ts.item(),
                            "l_kd": None if kd_sum is None else kd_sum.item(),
                            **balancer.weights(),
                            **balancer.measured(),
                            **diag,
                        }
                    )
                stop_or_save(epoch, done, sums, stops)
            bar.close()
            loss_sum, acc_sum, seen, _ = sums
            if seen == 0:
                raise QatkdError(f"every step of epoch {epoch + 1} had a non-finite loss")
            if world.is_main:
                last_metrics = {"train_loss": loss_sum / seen, "train_acc": acc_sum / seen}
                evaluation_start = time.perf_counter()
                last_metrics |= evaluate_splits(task, student, splits)
                eval_seconds += time.perf_counter() - evaluation_start
                score = sign * last_metrics[f"{selected_on}_{task.main_metric}"]
                is_best = score > best
                if is_best:
                    best, best_epoch, best_metrics = score, epoch + 1, dict(last_metrics)
                state = checkpoint_state(epoch + 1, None)
                logger.flush()
                save_checkpoint(state, run_dir / "last.pt")
                if is_best:
                    save_checkpoint(state, run_dir / "best.pt")
                seconds = time.perf_counter() - epoch_start
                lr = schedule.get_last_lr()[0]
                logger.epoch(
                    {"epoch": epoch + 1, "step": step, "lr": lr, **last_metrics, "seconds": seconds}
                )
                plot_run(run_dir, f"{meta.get('model_name', 'model')} — {run_dir.name}")
                _print_epoch(epoch, train_cfg.epochs, last_metrics, task.main_metric, balancer)
            last_save = time.monotonic()
            barrier(world)
            if any_rank(world, stops.signum is not None) and epoch + 1 < train_cfg.epochs:
                raise RunStopped(step, total_steps, stops.signum or signal.SIGTERM, str(run_dir))
    evaluated = {k: v for k, v in best_metrics.items() if k.startswith(("val_", "test_"))}
    metrics = {
        **last_metrics,
        "selected_on": selected_on,
        "best_epoch": best_epoch,
        **{f"best_{k}": v for k, v in evaluated.items()},
        "epochs": train_cfg.epochs,
        "steps": step,
        "train_seconds": trained_seconds(),
        "eval_seconds": round(eval_seconds, 1),
        "device": device_name(device),
        **{f"final_{k}": v for k, v in (balancer.weights() | balancer.measured()).items()},
        **(facts or {}),
    }
    if world.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _print_epoch(
    epoch: int, epochs: int, metrics: dict[str, float], main_metric: str, balancer: LossBalancer
) -> None:
    weights = ""
    if balancer.needs_teacher:
        weights = "  " + " ".join(f"{k}={v:.3g}" for k, v in balancer.weights().items())
    evaluated = "  ".join(
        f"{key} {metrics[key]:.2f}"
        for key in (f"val_{main_metric}", f"test_{main_metric}")
        if key in metrics
    )
    report(
        f"epoch {epoch + 1}/{epochs}  loss {metrics['train_loss']:.4f}  "
        f"train_acc {metrics['train_acc']:.2f}  {evaluated}{weights}"
    )
