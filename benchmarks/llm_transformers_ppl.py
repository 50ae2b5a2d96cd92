"""Perplexity of a Hugging Face causal-LM folder with `transformers` and `torch` only (no qatkd):
the check that an exported student (`qatkd export RUN_DIR` writes RUN_DIR/hf) reproduces the
perplexity qatkd reported.

    python benchmarks/llm_transformers_ppl.py RUN_DIR/hf [TEXT_FILE ...] [--block-size 128]
                                              [--windows N]

Same protocol as qatkd: the files' text joined by blank lines, tokenised without special tokens,
one end-of-text token appended; windows of `block-size` tokens every `block-size // 2` tokens (the
last one ending at the text's end); each token scored once, by the first window that holds it
with the tokens before it. Prints JSON {"eval_ppl", "eval_tokens"}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def perplexity(
    folder: str, texts: list[str], block_size: int, windows: int | None = None
) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([*ids, tokenizer.eos_token_id])
    stride = block_size // 2
    starts = list(range(0, len(ids) - block_size + 1, stride))
    if starts[-1] != len(ids) - block_size:
        starts.append(len(ids) - block_size)
    starts = starts[:windows]
    nll, count, scored_until = 0.0, 0, 0
    with torch.no_grad():
        for start in starts:
            window = ids[start : start + block_size]
            first_new = max(scored_until - start, 1)  # first position scored in this window
            logits = model(input_ids=window[None]).logits[0]
            nll += F.cross_entropy(
                logits[first_new - 1 : -1].float(), window[first_new:], reduction="sum"
            ).item()
            count += block_size - first_new
            scored_until = start + block_size
    return {"eval_ppl": math.exp(nll / count), "eval_tokens": count}


def read(path: Path) -> str:
    """A UTF-8 text file, gzipped or not (Debian ships long documents as .gz)."""
    raw = path.read_bytes()
    return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="Hugging Face model folder (e.g. RUN_DIR/hf)")
    parser.add_argument("texts", nargs="*", default=[DEFAULT_TEXT], help="evaluation text files")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--windows", type=int, help="score only the first N windows")
    args = parser.parse_args()
    texts = [read(Path(path)) for path in args.texts]
    print(json.dumps(perplexity(args.folder, texts, args.block_size, args.windows)))


if __name__ == "__main__":
    main()
