"""The language task family: next-token cross-entropy, token-level KD, perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from qatkd.distill import KDConfig, build_kd_loss
from qatkd.tasks.language.data import IGNORE

Batch = tuple[Tensor, ...]
"""(token ids [B, T],) for training; (token ids, labels with IGNORE for context) for evaluation."""


class CausalLM(nn.Module):
    """A Hugging Face causal LM as a plain module, token ids [B, T] -> logits [B, T, V], so the
    engine, the KD losses and `qatkd.quant.prepare` see an ordinary network."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, ids: Tensor) -> Tensor:
        return self.hf(input_ids=ids, use_cache=False).logits


def next_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed negative log-likelihood of each labelled token given the tokens before it, and how
    many tokens were scored (labels equal to IGNORE are not)."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll, int((targets != IGNORE).sum())


class LanguageTask:
    """L_TS: next-token cross-entropy. L_KD: the `kd:` loss on every token's logits (forward KL
    with temperature by default; `kd.loss=reverse_kl` for KL(student || teacher)). Metric:
    perplexity on the evaluation windows and, with a teacher, top-1 next-token agreement."""

    main_metric = "eval_ppl"
    maximize = False
    eval_batch_size = 8
    unit = "tok"

    def __init__(
        self,
        kd: KDConfig | None = None,
        per_teacher: bool = False,
        teacher: nn.Module | None = None,
    ) -> None:
        self.kd = build_kd_loss(kd or KDConfig(), per_teacher=per_teacher)
        self.teacher = teacher
        self._teacher_top1: dict[int, list[Tensor]] = {}

    def inputs(self, batch: Batch) -> Tensor:
        return batch[0]

    def units(self, batch: Batch) -> int:
        return batch[0].numel()

    def task_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        nll, count = next_token_nll(outputs, batch[0])
        return nll / max(count, 1)

    def kd_loss(self, outputs: Tensor, teacher_outputs: list[Tensor]) -> Tensor | list[Tensor]:
        return self.kd(outputs, teacher_outputs)

    def batch_metrics(self, outputs: Tensor, batch: Batch) -> dict[str, float]:
        ids = batch[0]
        hits = (outputs[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()
        return {"train_acc": hits.item() * 100}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Perplexity exp(mean NLL) over the scored tokens; with a teacher, the % of scored
        tokens where the student's top-1 next token equals the teacher's."""
        was_training = model.training
        model.eval()
        nll_sum, count, agree = 0.0, 0, 0
        # the teacher's predictions on an evaluation set are computed once per task
        teacher_top1 = self._teacher_top1.setdefault(id(loader.dataset), [])
        for i, (ids, labels) in enumerate(tqdm(loader, desc="perplexity", leave=False)):
            logits = model(ids)
            nll, n = next_token_nll(logits, labels)
            nll_sum, count = nll_sum + nll.item(), count + n
            if self.teacher is not None:
                if i == len(teacher_top1):
                    teacher_top1.append(self.teacher(ids)[:, :-1].argmax(-1))
                scored = labels[:, 1:] != IGNORE
                same = logits[:, :-1].argmax(-1) == teacher_top1[i]
                agree += int((same & scored).sum())
        model.train(was_training)
        metrics = {self.main_metric: math.exp(nll_sum / max(count, 1)), "eval_tokens": count}
        if self.teacher is not None:
            metrics["teacher_agreement"] = 100.0 * agree / max(count, 1)
        return metrics
