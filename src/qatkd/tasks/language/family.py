"""The language task family: what `qatkd train / distill / ptq / eval / export` do for
`task: language`.

The teacher is the pretrained model (`model.name` / `model.path`); the student is a copy whose
decoder Linear layers are weight-quantized per group (activations stay float: `W4A16` etc.). The
embeddings and the LM head are not quantized by default and are the teacher's own tensors, shared
and frozen: the student trains its decoder layers and quantizer scales, and memory holds one copy
of the 28M-parameter embedding.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qatkd.checkpoint import load_checkpoint
from qatkd.config import Config, build_config
from qatkd.distill import TeacherEnsemble, file_sha256
from qatkd.errors import QatkdError
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.tasks.family import FAMILIES
from qatkd.tasks.language.data import TextData, check_text_files, load_text_data
from qatkd.tasks.language.export import export_language
from qatkd.tasks.language.source import cache_root, load_pretrained, model_folder
from qatkd.tasks.language.task import CausalLM, LanguageTask, reference_top1
from qatkd.train.engine import Task, TeacherOutputs

CALIBRATION_BLOCKS = 8
LANGUAGE_QUANT_DEFAULTS = {
    "method": "minmax",
    "first_last_bits": None,
    "skip": ["*lm_head"],
    "group_size": 64,
}
"""Quantization defaults for language models where the config does not set the key: min-max
scales (each group's max |w|, following the weights: QAT starts exactly at RTN; LSQ's init,
made for CNNs, clips the outlier weights of an LLM and started SmolLM2's QAT at twice RTN's
perplexity), no 8-bit first/last exception, the LM head (tied to the embedding) stays float,
groups of 64 inputs."""


def language_quant(config: QuantConfig) -> QuantConfig:
    """`config` with the language defaults for the keys it does not set; activations must stay
    float (weight-only quantization)."""
    if config.act_bits != 16:
        raise QatkdError(
            f"quant.bits={config.bits}: language models are quantized weight-only; "
            f"use W{config.weight_bits}A16"
        )
    unset = {k: v for k, v in LANGUAGE_QUANT_DEFAULTS.items() if k not in config.model_fields_set}
    return config.model_copy(update=unset)


class Loaded:
    """The pretrained model (teacher and agreement reference), its tokenizer, the text, and the
    reference's top-1 predictions on the evaluation windows (cached)."""

    def __init__(self, config: Config) -> None:
        self.folder = model_folder(config.model.name, config.model.path)
        self.hf, self.tokenizer = load_pretrained(self.folder)
        self.hf.requires_grad_(False)
        self.reference = CausalLM(self.hf)
        key = ",".join(file_sha256(p) for p in sorted(self.folder.glob("*.safetensors")))
        key = key or str(self.folder)
        cache = cache_root() / "text"
        self.data: TextData = load_text_data(config.data, self.tokenizer, self.hf, cache, key)
        self.reference_top1 = reference_top1(self.reference, self.data.test, cache, key)

    @property
    def train(self) -> Dataset:
        return self.data.train

    @property
    def test(self) -> Dataset:
        return self.data.test


def _meta(config: Config, loaded: Loaded) -> dict[str, Any]:
    return {
        "task": "language",
        "model_name": config.model.name,
        "model_path": config.model.path,
        "train_text": loaded.data.train_source,
        "eval_text": loaded.data.eval_source,
        "quant": None if config.quant is None else config.quant.model_dump(mode="json"),
    }


def build_student(config: Config, loaded: Loaded) -> nn.Module:
    """A trainable copy of the teacher sharing its (frozen) embedding and LM head, quantized and
    calibrated when `config.quant` is set."""
    hf = copy.deepcopy(loaded.hf)
    hf.requires_grad_(True)
    source_embed = loaded.hf.get_input_embeddings()
    hf.get_input_embeddings().weight = source_embed.weight
    hf.get_output_embeddings().weight = loaded.hf.get_output_embeddings().weight
    student = CausalLM(hf)
    if config.quant is not None:
        prepare(student, config.quant)
        batches = DataLoader(loaded.data.train, batch_size=4)
        calibrate(student, ([ids] for (ids,) in batches), CALIBRATION_BLOCKS)
    if config.train.gradient_checkpointing:
        student.hf.gradient_checkpointing_enable()
    return student


def _teacher(name: str, config: Config, loaded: Loaded) -> nn.Module:
    """A teacher named by a model name or a Hugging Face folder; the student's own source is
    the model already loaded."""
    source = config.model.path or config.model.name
    if name == source or (Path(name).is_dir() and Path(name).resolve() == loaded.folder.resolve()):
        return loaded.reference
    if Path(name).is_file():
        family = load_checkpoint(name)["meta"].get("task", "classification")
        raise QatkdError(
            f"teacher {name} is a {family} checkpoint; language teachers are model names or "
            f"Hugging Face folders, e.g. teachers=[{source}]"
        )
    is_folder = Path(name).is_dir()
    folder = model_folder("" if is_folder else name, name if is_folder else None)
    teacher = load_pretrained(folder)[0]
    vocab, own = teacher.config.vocab_size, loaded.hf.config.vocab_size
    if vocab != own:
        raise QatkdError(
            f"teacher {name} predicts over {vocab} tokens, but the student's vocabulary has "
            f"{own}: use a teacher with the student's tokenizer"
        )
    return CausalLM(teacher)


class LanguageFamily:
    """The `TaskFamily` of causal language models (module doc)."""

    name = "language"
    ptq_from_checkpoint = False

    def resolve(self, config: Config) -> Config:
        """Weight-only quantization with the language defaults (`language_quant`)."""
        if config.quant is None:
            return config
        return config.model_copy(update={"quant": language_quant(config.quant)})

    def check(self, config: Config) -> None:
        if config.data.name != "text":
            raise QatkdError(
                f"task language reads text: set data.name=text, not {config.data.name}"
            )
        check_text_files(config.data)

    def load(self, config: Config) -> Loaded:
        return Loaded(config)

    def build_student(self, config: Config, source: Loaded) -> tuple[nn.Module, dict[str, Any]]:
        return build_student(config, source), _meta(config, source)

    def restore(self, state: dict[str, Any], source: Loaded | None = None) -> nn.Module:
        config = build_config(state["config"])
        source = source or Loaded(config)
        student = build_student(config.model_copy(update={"quant": None}), source)
        if config.quant is not None:
            prepare(student, config.quant)
        student.load_state_dict(state["model"])
        return student.eval()

    def make_task(self, config: Config, source: Loaded) -> Task:
        return LanguageTask(config.kd, config.balancer.per_teacher, source.reference_top1)

    def teacher_outputs(
        self, config: Config, source: Loaded, task: Task, device: torch.device
    ) -> tuple[TeacherOutputs, Dataset]:
        teachers = [_teacher(name, config, source) for name in config.teachers]
        ensemble = TeacherEnsemble(teachers, names=config.teachers).to(device)
        return (lambda batch: ensemble(task.inputs(batch))), source.train

    def export(
        self,
        state: dict[str, Any],
        path: Path,
        out: Path,
        data_limit: int | None,
        transformers_folder: bool = True,
    ) -> dict[str, Any]:
        """Packed weights and, with `transformers_folder`, a rebuilt `transformers` folder
        (`qatkd.tasks.language.export`); `data_limit` has no use here (no parity run)."""
        source = Loaded(build_config(state["config"]))
        student = self.restore(state, source)
        hf, tokenizer = source.hf, source.tokenizer
        return export_language(state, student, hf, tokenizer, out, transformers_folder)

    def bench(self, state: dict[str, Any], path: Path, *args: Any) -> dict[str, Any]:
        raise QatkdError(
            f"qatkd bench times ONNX models of image tasks; {path} is a language model "
            "(its export writes packed weights and a transformers folder)"
        )


LANGUAGE = FAMILIES.register("language")(LanguageFamily())


def evaluate_pretrained(config: Config) -> dict[str, float]:
    """Perplexity of the pretrained model itself (the FP teacher row of a benchmark)."""
    torch.manual_seed(config.seed)
    source = Loaded(config)
    task = LanguageTask(reference=source.reference_top1)
    return task.evaluate(source.reference, DataLoader(source.test, task.eval_batch_size))
