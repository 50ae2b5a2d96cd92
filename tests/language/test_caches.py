"""The language family's two disk caches, input by input: the generated training text
(`generated_text`, keyed by model, samples, tokens, seed and the prompts) and the reference
model's top-1 predictions (`reference_top1`, keyed by model and the evaluation windows) each miss
when any one of their inputs changes, and hit when none does. Stand-in models count their calls:
no language model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qatkd.tasks.language import data as language_data
from qatkd.tasks.language.data import generated_text
from qatkd.tasks.language.task import reference_top1


class CountingGenerator:
    """A causal LM's `generate`: random new tokens from the global RNG (which `generated_text`
    seeds), shifted by a number of its own (another model, other tokens), counted."""

    def __init__(self, shift: int) -> None:
        self.shift, self.calls = shift, 0

    def eval(self) -> CountingGenerator:
        return self

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        self.calls += 1
        new = torch.randint(3, 1000, (len(input_ids), max_new_tokens)) + self.shift
        return torch.cat([input_ids, new], dim=1)


class Tokenizer:
    padding_side = "right"
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, prompts: list[str], return_tensors: str, padding: bool) -> dict:
        return {"input_ids": torch.tensor([[len(p) % 1000] for p in prompts])}

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool) -> list[str]:
        return [" ".join(map(str, row.tolist())) for row in ids]


GENERATION = {"samples": 3, "tokens": 5, "seed": 0, "model_key": "model-a"}


def generate(cache: Path, **changes) -> tuple[list[str], int]:
    """The texts of `GENERATION` with `changes`, and how many times the model generated."""
    inputs = GENERATION | changes
    model = CountingGenerator(shift=sum(map(ord, inputs["model_key"])))
    texts = generated_text(
        model,
        Tokenizer(),
        inputs["samples"],
        inputs["tokens"],
        inputs["seed"],
        cache,
        inputs["model_key"],
    )
    return texts, model.calls


def test_generated_text_hits_the_cache_when_no_input_changes(tmp_path: Path):
    first, calls = generate(tmp_path)
    assert calls == 1 and len(first) == 3
    again, calls = generate(tmp_path)
    assert calls == 0 and again == first
    assert len(list(tmp_path.glob("generated-*.json"))) == 1


@pytest.mark.parametrize(
    "change",
    [{"model_key": "model-b"}, {"samples": 4}, {"tokens": 6}, {"seed": 1}],
    ids=["model", "samples", "tokens", "seed"],
)
def test_generated_text_misses_the_cache_when_one_input_changes(tmp_path: Path, change: dict):
    first, _ = generate(tmp_path)
    other, calls = generate(tmp_path, **change)
    assert calls == 1 and other != first
    assert len(list(tmp_path.glob("generated-*.json"))) == 2
    assert generate(tmp_path)[0] == first  # the first entry is still there, unchanged


def test_generated_text_misses_the_cache_when_the_prompts_change(tmp_path: Path, monkeypatch):
    generate(tmp_path)
    monkeypatch.setattr(language_data, "PROMPTS", ("Another prompt", *language_data.PROMPTS[1:]))
    _, calls = generate(tmp_path)
    assert calls == 1


class Stopped(Exception):
    """The process stopped mid-generation (a signal, a session's end)."""


def test_a_stopped_generation_resumes_at_its_next_batch_with_the_same_text(tmp_path: Path):
    """7 samples in batches of 2, stopped during the third batch: the next call generates only
    the last two batches, and the text is the one an uninterrupted generation makes."""
    shift = sum(map(ord, GENERATION["model_key"]))

    def texts(model: CountingGenerator, cache: Path) -> list[str]:
        return generated_text(model, Tokenizer(), 7, 5, 0, cache, "model-a", batch_size=2)

    uninterrupted = texts(CountingGenerator(shift), tmp_path / "whole")
    model = CountingGenerator(shift)
    made = model.generate

    def stop_at_third(input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        if model.calls == 2:
            raise Stopped
        return made(input_ids, max_new_tokens, **kwargs)

    model.generate, cache = stop_at_third, tmp_path / "stopped"
    with pytest.raises(Stopped):
        texts(model, cache)
    assert [p.name.endswith(".partial.json") for p in cache.iterdir()] == [True]
    model.generate, model.calls = made, 0
    assert texts(model, cache) == uninterrupted
    assert model.calls == 2
    assert [p.name.endswith(".partial.json") for p in cache.iterdir()] == [False]


class CountingLM(nn.Module):
    """Logits [B, T, V] from token ids, its forward passes counted."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 50)
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.embed(ids)


def windows(ids: torch.Tensor) -> TensorDataset:
    return TensorDataset(ids, ids.clone())


IDS = torch.arange(40).reshape(5, 8) % 50


def test_reference_top1_is_the_models_prediction_and_hits_the_cache(tmp_path: Path):
    model = CountingLM()
    top1 = reference_top1(model, windows(IDS), tmp_path, "model-a")
    assert model.calls == 1
    with torch.no_grad():
        assert torch.equal(top1, model(IDS)[:, :-1].argmax(-1))
    again = CountingLM(seed=1)  # other weights: a hit must not run it
    assert torch.equal(reference_top1(again, windows(IDS.clone()), tmp_path, "model-a"), top1)
    assert again.calls == 0
    assert len(list(tmp_path.glob("reference-top1-*.pt"))) == 1


def test_reference_top1_misses_the_cache_for_another_model(tmp_path: Path):
    top1 = reference_top1(CountingLM(), windows(IDS), tmp_path, "model-a")
    other = CountingLM(seed=1)
    got = reference_top1(other, windows(IDS), tmp_path, "model-b")
    assert other.calls == 1 and not torch.equal(got, top1)


@pytest.mark.parametrize("change", ["one token", "fewer windows"])
def test_reference_top1_misses_the_cache_for_other_windows(tmp_path: Path, change: str):
    reference_top1(CountingLM(), windows(IDS), tmp_path, "model-a")
    ids = IDS.clone()
    if change == "one token":
        ids[3, 5] += 1
    else:
        ids = ids[:4]
    model = CountingLM()
    got = reference_top1(model, windows(ids), tmp_path, "model-a")
    assert model.calls == 1
    with torch.no_grad():
        assert torch.equal(got, model(ids)[:, :-1].argmax(-1))
