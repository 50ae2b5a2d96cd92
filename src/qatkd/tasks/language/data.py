"""Text for the language task family: training blocks and sliding-window evaluation.

Training text is the user's files (`data.train_files`) or, by default, text sampled from the
teacher itself (data-free distillation, as in LLM-QAT): continuations of a fixed set of prompts,
cached on disk. Either is tokenised and packed into blocks of `data.block_size` tokens.

Evaluation text is the user's files (`data.eval_files`) or, by default, the GNU General Public
License v3 as Debian installs it (/usr/share/common-licenses/GPL-3, package base-files):
human-written English (Free Software Foundation, 2007; "everyone is permitted to copy and
distribute verbatim copies"), about 8k tokens, which the prompts and the sampled text do not
contain. Perplexity uses sliding windows of `block_size` tokens moved by `block_size // 2`:
every token is scored once, each with at least half a window of context (except the first).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from qatkd.errors import QatkdError
from qatkd.progress import progress
from qatkd.train.validation import split_indices

DEFAULT_EVAL_TEXT = Path("/usr/share/common-licenses/GPL-3")
LARGE_EVAL_TEXT = Path("/usr/share/doc/debian-policy/policy.txt.gz")
"""The Debian Policy Manual (Debian package debian-policy, GPL-2+): about 70k words of
human-written technical English, for perplexity differences that the GPL-3's 7.7k tokens would
leave in the noise; the benchmarks' full mode evaluates on it."""
IGNORE = -100
"""Label of a token that is context only (not scored), as in `torch.nn.functional.cross_entropy`."""

PROMPTS = (
    "The history of the city begins",
    "In this tutorial we will learn how to",
    "Scientists have recently discovered that",
    "The best way to prepare for an interview is",
    "Once upon a time, in a small village,",
    "Here is a short explanation of how computers store numbers:",
    "The main causes of the industrial revolution were",
    "When planning a garden, the first thing to consider is",
    "A good recipe for bread needs",
    "The following letter was written to the editor of a newspaper:",
    "In mathematics, a prime number is",
    "The weather in the mountains can change quickly, so",
    "Photosynthesis is the process by which",
    "To write clean code, programmers should",
    "The museum's new exhibition shows",
    "My favourite book is about",
    "Climate change affects farmers because",
    "The rules of chess are simple:",
    "A healthy breakfast usually includes",
    "The company announced today that",
    "Learning a second language helps",
    "The ocean covers most of the Earth and",
    "During the meeting, the team decided",
    "Music has always been important to people because",
)


def read_text(paths: Sequence[str]) -> str:
    """The files' text joined by blank lines (`.gz` files decompressed, as Debian ships its
    documentation); a missing, unreadable or empty file is an error."""
    parts = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise QatkdError(f"text file not found: {path}")
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        except (gzip.BadGzipFile, EOFError) as e:
            raise QatkdError(f"text file {path} is not gzip data ({e})") from None
        except UnicodeDecodeError as e:
            raise QatkdError(
                f"text file {path} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        if not text.strip():
            raise QatkdError(f"text file {path} is empty: give it some text or leave it out")
        parts.append(text)
    return "\n\n".join(parts)


def check_text_files(data: Any) -> None:
    """Fail on a missing, unreadable or empty text file before any model is loaded."""
    read_text([*data.train_files, *data.eval_files])


def tokenize(tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """One long stream of token ids: the texts, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(ids: Tensor, block_size: int, what: str) -> TensorDataset:
    """Consecutive, non-overlapping blocks of `block_size` tokens (the tail is dropped)."""
    n = len(ids) // block_size
    if n == 0:
        raise QatkdError(
            f"{what} has {len(ids)} tokens, fewer than one block of data.block_size={block_size}"
        )
    return TensorDataset(ids[: n * block_size].view(n, block_size))


def sliding_windows(ids: Tensor, length: int, stride: int, what: str) -> TensorDataset:
    """(windows [N, length], labels [N, length]) for perplexity: windows start every `stride`
    tokens (the last one ends at the text's end); in each, only tokens not scored by an earlier
    window carry a label, the rest are context (IGNORE)."""
    if len(ids) < length:
        raise QatkdError(
            f"{what} has {len(ids)} tokens, fewer than one window of data.block_size={length}"
        )
    starts = list(range(0, len(ids) - length + 1, stride))
    if starts[-1] != len(ids) - length:
        starts.append(len(ids) - length)
    windows, labels, scored_until = [], [], 0
    for start in starts:
        window = ids[start : start + length]
        label = window.clone()
        label[: max(scored_until - start, 0)] = IGNORE
        scored_until = start + length
        windows.append(window)
        labels.append(label)
    return TensorDataset(torch.stack(windows), torch.stack(labels))


def load_train_text(
    data: Any, tokenizer: Any, model: nn.Module, cache_dir: Path, model_key: str
) -> tuple[TensorDataset, Dataset | None, str]:
    """The training blocks of `data` (module doc), the validation blocks (`data.val_split`,
    drawn by `data.val_seed`; None when 0) and where the text came from. `model`, the
    full-precision model the student starts from, samples the default training text (cached
    under `cache_dir`, keyed by `model_key` and the settings).

    Generated text is held out by prompt: every sample of a held-out prompt is validation text
    and no training sample shares its prompt. The user's text is held out by blocks."""
    block = data.block_size
    val: Dataset | None = None
    if data.train_files:
        source = ", ".join(data.train_files)
        train = pack_blocks(tokenize(tokenizer, [read_text(data.train_files)]), block, source)
        if data.val_split:
            train, val = hold_out_blocks(train, data.val_split, data.val_seed)
    else:
        texts = generated_text(
            model, tokenizer, data.generate_samples, block, 0, cache_dir, model_key
        )
        source = f"{len(texts)} samples generated by the model the student starts from"
        held = held_out_prompts(len(texts), data.val_split, data.val_seed)
        prompt = [i % len(PROMPTS) for i in range(len(texts))]
        kept = [t for t, p in zip(texts, prompt, strict=True) if p not in held]
        train = pack_blocks(tokenize(tokenizer, kept), block, "the training text")
        if held:
            ids = pack_blocks(
                tokenize(tokenizer, [t for t, p in zip(texts, prompt, strict=True) if p in held]),
                block,
                "the held-out prompts' text (raise data.generate_samples)",
            ).tensors[0]
            val = TensorDataset(ids, ids)
    if data.train_limit and data.train_limit < len(train):
        train = TensorDataset(train.tensors[0][: data.train_limit])
    return train, val, source


def held_out_prompts(samples: int, share: float, seed: int) -> set[int]:
    """The PROMPTS whose generated samples are validation text: `share` of the prompts that
    `samples` samples use (at least one when `share` > 0), drawn with `seed`."""
    if not share:
        return set()
    return set(split_indices(min(samples, len(PROMPTS)), share, seed)[1])


def hold_out_blocks(train: TensorDataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """(training blocks, validation blocks): `share` of the training text's blocks held out
    (`data.val_split`), each validation block scored on every token, as an evaluation window
    (ids, labels) is."""
    kept, held = split_indices(len(train), share, seed)
    ids = train.tensors[0]
    return TensorDataset(ids[kept]), TensorDataset(ids[held], ids[held])


def load_eval_text(data: Any, tokenizer: Any) -> tuple[Dataset, str]:
    """The evaluation windows of `data` (module doc) and the files they came from."""
    eval_files = data.eval_files or [str(DEFAULT_EVAL_TEXT)]
    if not data.eval_files and not DEFAULT_EVAL_TEXT.is_file():
        raise QatkdError(
            f"the default evaluation text {DEFAULT_EVAL_TEXT} is missing (Debian package "
            "base-files): set data.eval_files to one or more UTF-8 text files"
        )
    eval_ids = tokenize(tokenizer, [read_text(eval_files)])
    test = sliding_windows(eval_ids, data.block_size, data.block_size // 2, "the evaluation text")
    if data.test_limit and data.test_limit < len(test):
        test = TensorDataset(*(t[: data.test_limit] for t in test.tensors))
    return test, ", ".join(eval_files)


@torch.inference_mode()
def generated_text(
    model: nn.Module,
    tokenizer: Any,
    samples: int,
    tokens: int,
    seed: int,
    cache_dir: Path,
    model_key: str,
    batch_size: int = 16,
) -> list[str]:
    """`samples` continuations of PROMPTS (in turn), `tokens` new tokens each, sampled with
    top-p 0.95 at temperature 1; cached as JSON keyed by everything that changes them. Each batch
    draws its own seed from `seed` and is saved to a partial file as it is done, so a stopped
    generation resumes at its next batch with the text an uninterrupted one would have made."""
    key = json.dumps([model_key, samples, tokens, seed, PROMPTS], sort_keys=True)
    path = cache_dir / f"generated-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())["texts"]
    partial = path.with_suffix(".partial.json")
    texts: list[str] = json.loads(partial.read_text())["texts"] if partial.is_file() else []
    generator = torch.Generator().manual_seed(seed)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        for first in progress(range(0, samples, batch_size), desc="generating training text"):
            batch_seed = int(torch.randint(2**31, (1,), generator=generator))
            if first < len(texts):  # done before a stop
                continue
            prompts = [
                PROMPTS[i % len(PROMPTS)] for i in range(first, min(first + batch_size, samples))
            ]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True)
            torch.manual_seed(batch_seed)
            out = model.generate(
                **encoded,
                max_new_tokens=tokens,
                do_sample=True,
                top_p=0.95,
                temperature=1.0,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
            _write_json(partial, {"key": json.loads(key), "texts": texts})
    finally:
        tokenizer.padding_side = previous_side
    _write_json(path, {"key": json.loads(key), "texts": texts})
    partial.unlink()
    return texts


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """`path` replaced at once: a reader never sees half a file."""
    temporary = path.with_suffix(f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(content))
    temporary.replace(path)
