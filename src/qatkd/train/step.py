"""One training step, shared by the engine's loop and the step timing: the KD loss's trainable
parts, the forward pass with its task and KD losses balanced, and the update."""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from qatkd.balance import LossBalancer
from qatkd.config import Config
from qatkd.device import mixed_precision, to_device
from qatkd.train.distributed import World, average_gradients
from qatkd.train.held_out import HeldOutPass, reserve_held_out
from qatkd.train.optim import build_optimizer
from qatkd.train.task import Task, TeacherOutputs


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
