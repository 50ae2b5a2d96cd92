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
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from qatkd.balance import LossBalancer, grad_conflict
from qatkd.checkpoint import first_nonfinite, save_checkpoint
from qatkd.config import Config, config_to_dict
from qatkd.device import device_name, loader_options, mixed_precision, to_device
from qatkd.errors import QatkdError
from qatkd.progress import progress, report
from qatkd.train.distributed import World, any_rank, barrier, gather
from qatkd.train.held_out import HeldOutPass, reserve_held_out
from qatkd.train.logs import RunLog
from qatkd.train.optim import build_optimizer, warmup_cosine
from qatkd.train.plots import REDRAW_SECONDS, plot_run
from qatkd.train.step import forward_losses, make_kd_parts, optimizer_step
from qatkd.train.stops import RunStopped, StopRequests
from qatkd.train.task import Task, TeacherOutputs


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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of process `rank`'s random draws (augmentation, dropout) in `epoch`: rank 0 draws
    what a single process draws, and another rank never what some epoch of rank 0 draws (within
    2**20 epochs, and 4,096 processes: the CPU generator keeps a seed's low 32 bits)."""
    return seed * 1_000_003 + epoch + (rank << 20)


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


def epoch_progress(
    batches: Iterator[Any], *, epoch: int, epochs: int, steps: int, done: int, world: World
) -> Any:
    """The bar of epoch `epoch` (counted from 0) of `steps` steps, from the `done` steps a
    resumed run skipped; drawn by the main process only (every process takes the same steps)."""
    return progress(
        batches,
        desc=f"epoch {epoch + 1}/{epochs}",
        total=steps,
        initial=done,
        disable=not world.is_main,
    )


def per_rank_batch_size(batch_size: int, world: World) -> int:
    """`train.batch_size` is the global batch: each of N processes takes 1/N of it."""
    if batch_size % world.size:
        raise QatkdError(
            f"train.batch_size={batch_size} does not split over {world.size} processes: "
            f"use a multiple of {world.size}"
        )
    return batch_size // world.size


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
            try:
                kd_parts.load_state_dict(resume["kd_parts"])
            except RuntimeError as e:  # saved by a qatkd whose parts differ (adapter biases)
                raise QatkdError(
                    f"{run_dir / 'last.pt'} holds a state of the KD loss's trainable parts that "
                    f"does not fit this run's ({' '.join(str(e).split())}): it cannot resume; "
                    "start it again"
                ) from e
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
    logger = RunLog(
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

    def check_weights(epoch: int) -> None:
        """Raise `QatkdError` if the student, the balancer or the KD parts hold a non-finite
        value on any rank: before every checkpoint, so that last.pt stays a good one, and after
        a skipped step, which cannot repair them."""
        parts = {"student": student, "balancer": balancer, "kd_parts": kd_parts}
        found = (
            f"{part}: {key}"
            for part, module in parts.items()
            if module is not None and (key := first_nonfinite(module.state_dict())) is not None
        )
        name = next(found, None)
        if any_rank(world, name is not None):
            where = f" ({name})" if name else ""
            raise QatkdError(
                f"the weights became non-finite{where} by step {step} (epoch {epoch + 1}); "
                f"{last_good(run_dir)}"
            )

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
        check_weights(epoch)
        position = {"batches": done, "sums": sums, "rng": gather(world, rng_states(device))}
        if world.is_main:
            logger.flush()
            save_checkpoint(checkpoint_state(epoch, position), run_dir / "last.pt")
        last_save = time.monotonic()
        if stop:
            if world.is_main:
                draw_curves()
            barrier(world)
            raise RunStopped(step, total_steps, stops.signum or signal.SIGTERM, str(run_dir))

    def draw_curves() -> None:
        """curves.png from the logs so far (`qatkd.train.plots`)."""
        nonlocal last_drawn
        plot_run(run_dir, f"{meta['model_name']} — {run_dir.name}")
        last_drawn = time.monotonic()

    def trained_seconds() -> float:
        """Seconds of training so far, the processes before a resume included."""
        return round(seconds_before + time.perf_counter() - started, 1)

    started, last_save = time.perf_counter(), time.monotonic()
    last_drawn = last_save
    with StopRequests() as stops, contextlib.closing(logger):
        if world.is_main:
            logger.start(resume)
        for epoch in range(start_epoch, train_cfg.epochs):
            model.train()
            balancer.train()
            sampler.set_epoch(epoch)
            torch.manual_seed(epoch_seed(config.seed, epoch, world.rank))
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
            bar = epoch_progress(
                batches,
                epoch=epoch,
                epochs=train_cfg.epochs,
                steps=steps_per_epoch,
                done=done,
                world=world,
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
                            f"{last_good(run_dir)}, or set train.on_nonfinite=skip"
                        )
                    report(f"warning: skipped step {step}: non-finite loss ({total.item()} here)")
                    check_weights(epoch)
                    with warnings.catch_warnings():  # the rate follows the step count, on purpose
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
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
            check_weights(epoch)
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
                run_ends = epoch + 1 == train_cfg.epochs or stops.signum is not None
                if run_ends or time.monotonic() - last_drawn >= REDRAW_SECONDS:
                    draw_curves()
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


def last_good(run_dir: Path) -> str:
    """What a run that became non-finite leaves to go on from (every checkpoint written is
    checked first: `check_weights`)."""
    if (run_dir / "last.pt").exists():
        return f"the last good checkpoint is {run_dir / 'last.pt'}: lower train.lr and resume"
    return "no checkpoint was written yet: lower train.lr and start again"


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
