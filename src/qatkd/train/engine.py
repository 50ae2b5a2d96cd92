"""The training loop shared by every task family and every method.

Each step: student outputs -> task loss (labels) and, with teachers, KD loss -> the balancer
combines them -> backward. The engine knows nothing of images, boxes or tokens: the `Task` does.
Determinism: every epoch reseeds the shuffling and augmentation RNGs from (seed, epoch), so a run
resumed from an epoch checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from qatkd.balance import LossBalancer, grad_conflict
from qatkd.checkpoint import save_checkpoint
from qatkd.config import Config, config_to_dict
from qatkd.distill import TeacherEnsemble
from qatkd.errors import QatkdError
from qatkd.quant import Quantizer
from qatkd.train.logs import CsvLog
from qatkd.train.plots import plot_run

EVAL_BATCH_SIZE = 512


class Task(Protocol):
    """What a task family gives the engine."""

    main_metric: str

    def inputs(self, batch: Any) -> torch.Tensor: ...

    def task_loss(self, outputs: Any, batch: Any) -> torch.Tensor: ...

    def kd_loss(
        self, outputs: Any, teacher_outputs: list[Any]
    ) -> torch.Tensor | list[torch.Tensor]: ...

    def batch_metrics(self, outputs: Any, batch: Any) -> dict[str, float]: ...

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]: ...


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
    model: nn.Module, balancer: LossBalancer, config: Config
) -> torch.optim.Optimizer:
    train = config.train
    groups = parameter_groups(model, train.weight_decay)
    groups += balancer.param_groups(config.balancer.lr, train.lr)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=train.lr)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Linear warm-up to the base rate, then cosine decay to zero: a factor per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def fit(
    model: nn.Module,
    task: Task,
    train_set: Dataset,
    test_set: Dataset,
    config: Config,
    run_dir: Path,
    meta: dict[str, Any],
    balancer: LossBalancer,
    teachers: TeacherEnsemble | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` for `config.train.epochs`, checkpointing every epoch; returns final metrics."""
    train_cfg = config.train
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    sampler_rng = torch.Generator()
    loader = DataLoader(
        train_set,
        batch_size=train_cfg.batch_size,
        sampler=RandomSampler(train_set, generator=sampler_rng),
        drop_last=len(train_set) > train_cfg.batch_size,
    )
    test_loader = DataLoader(test_set, batch_size=EVAL_BATCH_SIZE)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * train_cfg.epochs
    optimizer = build_optimizer(model, balancer, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(total_steps, round(train_cfg.warmup_epochs * steps_per_epoch)),
    )
    start_epoch, step, best = 0, 0, -math.inf
    if resume is not None:
        model.load_state_dict(resume["model"])
        balancer.load_state_dict(resume["balancer"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["scheduler"])
        start_epoch, step, best = resume["epoch"], resume["step"], resume["best"]

    weight_keys = list(balancer.weights())
    diag_keys = ["grad_norm_ts", "grad_norm_kd", "grad_ratio", "grad_cosine"]
    step_log = CsvLog(
        run_dir / "steps.csv",
        [
            "step",
            "epoch",
            "lr",
            "loss",
            "l_ts",
            "l_kd",
            *weight_keys,
            *(diag_keys if config.diag.every else []),
        ],
    )
    metric_keys = ["train_loss", "train_acc", task.main_metric]
    epoch_log = CsvLog(run_dir / "log.csv", ["epoch", "step", "lr", *metric_keys, "seconds"])
    step_log.start(("step", step) if resume else None)
    epoch_log.start(("epoch", start_epoch) if resume else None)

    student_params = [p for p in model.parameters() if p.requires_grad]
    last_metrics: dict[str, float] = dict(resume.get("metrics", {})) if resume else {}
    started = time.perf_counter()
    for epoch in range(start_epoch, train_cfg.epochs):
        model.train()
        balancer.train()
        sampler_rng.manual_seed(epoch_seed(config.seed, epoch))
        torch.manual_seed(epoch_seed(config.seed, epoch))
        epoch_start, loss_sum, train_acc_sum, seen = time.perf_counter(), 0.0, 0.0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
            leave=False,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for batch in bar:
            x = task.inputs(batch)
            outputs = model(x)
            l_ts = task.task_loss(outputs, batch)
            l_kd = None
            if teachers is not None and balancer.needs_teacher:
                l_kd = task.kd_loss(outputs, teachers(x))
            total = balancer(l_ts, l_kd)
            if not torch.isfinite(total):
                raise QatkdError(
                    f"the loss became {total.item()} at step {step} (epoch {epoch + 1}); "
                    f"the last good checkpoint is {run_dir / 'last.pt'}: lower train.lr and resume"
                )
            diag = {}
            if config.diag.every and l_kd is not None and step % config.diag.every == 0:
                diag = grad_conflict(l_ts, l_kd, student_params)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            step += 1
            n = len(x)
            seen += n
            loss_sum += total.item() * n
            batch_acc = task.batch_metrics(outputs, batch)["train_acc"]
            train_acc_sum += batch_acc * n
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{train_acc_sum / seen:.1f}",
                img_s=f"{seen / (time.perf_counter() - epoch_start):.0f}",
                refresh=False,
            )
            if step % train_cfg.log_every == 0 or diag:
                kd_value = sum(l_kd).item() if isinstance(l_kd, list) else l_kd
                step_log.append(
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "lr": schedule.get_last_lr()[0],
                        "loss": total.item(),
                        "l_ts": l_ts.item(),
                        "l_kd": kd_value.item() if isinstance(kd_value, torch.Tensor) else kd_value,
                        **balancer.weights(),
                        **diag,
                    }
                )
        bar.close()
        test_metrics = task.evaluate(model, test_loader)
        last_metrics = {
            "train_loss": loss_sum / seen,
            "train_acc": train_acc_sum / seen,
            **test_metrics,
        }
        is_best = test_metrics[task.main_metric] > best
        best = max(best, test_metrics[task.main_metric])
        state = {
            "meta": meta,
            "config": config_to_dict(config),
            "model": model.state_dict(),
            "balancer": balancer.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "epoch": epoch + 1,
            "step": step,
            "best": best,
            "metrics": last_metrics,
        }
        save_checkpoint(state, run_dir / "last.pt")
        if is_best:
            save_checkpoint(state, run_dir / "best.pt")
        epoch_log.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "lr": schedule.get_last_lr()[0],
                **last_metrics,
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        plot_run(run_dir, f"{meta.get('model_name', 'model')} — {run_dir.name}")
        weights = " ".join(
            f"{k}={v:.3g}" for k, v in balancer.weights().items() if balancer.needs_teacher
        )
        tqdm.write(
            f"epoch {epoch + 1}/{train_cfg.epochs}  loss {last_metrics['train_loss']:.4f}  "
            f"train_acc {last_metrics['train_acc']:.2f}  {task.main_metric} "
            f"{test_metrics[task.main_metric]:.2f}  {weights}".rstrip()
        )
    metrics = {
        **last_metrics,
        f"best_{task.main_metric}": best,
        "epochs": train_cfg.epochs,
        "steps": step,
        "train_seconds": round(time.perf_counter() - started, 1),
        **{f"final_{k}": v for k, v in balancer.weights().items()},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
