"""The language task family: next-token cross-entropy, token-level KD, perplexity."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from qatkd.device import module_device
from qatkd.distill import KDConfig, build_kd_loss
from qatkd.progress import progress
from qatkd.tasks.language.data import IGNORE
from qatkd.train.task import TeacherOutputs

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


@torch.no_grad()
def reference_top1(model: nn.Module, windows: Dataset, cache_dir: Path, model_key: str) -> Tensor:
    """`model`'s top-1 next token at every position of the evaluation windows [N, T - 1], computed
    once per model and text and cached on disk: every run compares its student with it."""
    ids = windows.tensors[0]
    key = f"{model_key}:{tuple(ids.shape)}:".encode()
    digest = hashlib.sha256(key + ids.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir / f"reference-top1-{digest}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    model.eval()
    loader = DataLoader(ids, batch_size=LanguageTask.eval_batch_size)
    top1 = torch.cat(
        [model(batch)[:, :-1].argmax(-1) for batch in progress(loader, desc="reference")]
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    torch.save(top1, partial)
    partial.replace(path)
    return top1


class LanguageTask:
    """L_TS: next-token cross-entropy. L_KD: the `kd:` loss on every token's logits (forward KL
    with temperature by default; `kd.loss=reverse_kl` for KL(student || teacher)). Metric:
    perplexity on the evaluation windows (test) or the held-out training blocks (val) and, on the
    test windows, given the reference model's top-1 predictions on them (`reference_top1`), top-1
    next-token agreement."""

    main_metric = "ppl"
    maximize = False
    eval_batch_size = 8
    unit = "tok"

    def __init__(
        self,
        kd: KDConfig | None = None,
        per_teacher: bool = False,
        reference: Tensor | None = None,
    ) -> None:
        self.kd = build_kd_loss(kd or KDConfig(), per_teacher=per_teacher)
        self.reference = reference

    def inputs(self, batch: Batch) -> Tensor:
        return batch[0]

    def units(self, batch: Batch) -> int:
        return batch[0].numel()

    def task_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        nll, count = next_token_nll(outputs, batch[0])
        return nll / max(count, 1)

    def kd_loss(self, outputs: Tensor, teacher_outputs: list[Tensor]) -> Tensor | list[Tensor]:
        return self.kd(outputs, teacher_outputs)

    def kd_parts(
        self, student: nn.Module, teacher_outputs: TeacherOutputs, example: Batch
    ) -> nn.Module | None:
        """Logit KD has no trainable parts."""
        return None

    def batch_metrics(self, outputs: Tensor, batch: Batch) -> dict[str, float]:
        ids = batch[0]
        hits = (outputs[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()
        return {"train_acc": hits.item() * 100}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, loader: DataLoader, split: str = "test"
    ) -> dict[str, float]:
        """Perplexity exp(mean NLL) over the scored tokens; on the test windows, with the
        reference's predictions, the % of scored tokens where the model's top-1 next token
        equals the reference's (the loader must visit the windows in order)."""
        reference = self.reference if split == "test" else None
        was_training = model.training
        model.eval()
        nll_sum, count, agree, seen = 0.0, 0, 0, 0
        device = module_device(model)
        for ids, labels in progress(loader, desc="perplexity"):
            ids, labels = ids.to(device), labels.to(device)
            logits = model(ids)
            nll, n = next_token_nll(logits, labels)
            nll_sum, count = nll_sum + nll.item(), count + n
            if reference is not None:
                scored = labels[:, 1:] != IGNORE
                expected = reference[seen : seen + len(ids)].to(device)
                same = logits[:, :-1].argmax(-1) == expected
                agree += int((same & scored).sum())
            seen += len(ids)
        model.train(was_training)
        metrics = {self.main_metric: math.exp(nll_sum / max(count, 1)), "tokens": count}
        if reference is not None:
            metrics["teacher_agreement"] = 100.0 * agree / max(count, 1)
        return metrics
