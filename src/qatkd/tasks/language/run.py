"""What `qatkd train / distill / ptq / eval` do for `task: language`.

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

from torch import nn
from torch.utils.data import DataLoader

from qatkd.balance import BalancerConfig, build_balancer
from qatkd.checkpoint import load_checkpoint
from qatkd.config import Config, apply_overrides, build_config
from qatkd.distill import TeacherEnsemble, file_sha256
from qatkd.errors import QatkdError
from qatkd.pipeline import create_run_dir, join_world, save_ptq_run
from qatkd.quant import QuantConfig, calibrate, prepare, quant_summary
from qatkd.tasks.language.data import TextData, check_text_files, load_text_data
from qatkd.tasks.language.source import cache_root, load_pretrained, model_folder
from qatkd.tasks.language.task import CausalLM, LanguageTask, reference_top1
from qatkd.train import fit
from qatkd.train.distributed import World

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
        if config.data.name != "text":
            raise QatkdError(
                f"task language reads text: set data.name=text, not {config.data.name}"
            )
        check_text_files(config.data)
        self.folder = model_folder(config.model.name, config.model.path)
        self.hf, self.tokenizer = load_pretrained(self.folder)
        self.hf.requires_grad_(False)
        self.reference = CausalLM(self.hf)
        key = ",".join(file_sha256(p) for p in sorted(self.folder.glob("*.safetensors")))
        key = key or str(self.folder)
        cache = cache_root() / "text"
        self.data: TextData = load_text_data(config.data, self.tokenizer, self.hf, cache, key)
        self.reference_top1 = reference_top1(self.reference, self.data.test, cache, key)


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
    calibrated when `config.quant` is set (its `quant` replaced by `language_quant`)."""
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
    return student


def _with_language_quant(config: Config) -> Config:
    if config.quant is None:
        return config
    return config.model_copy(update={"quant": language_quant(config.quant)})


def _fit(
    config: Config,
    run_dir: Path,
    loaded: Loaded,
    student: nn.Module,
    meta: dict[str, Any],
    world: World,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    teachers = [_teacher(name, config, loaded) for name in config.teachers]
    balancer_config = config.balancer if config.teachers else BalancerConfig(name="ts_only")
    balancer = build_balancer(balancer_config, num_teachers=len(config.teachers))
    task = LanguageTask(config.kd, config.balancer.per_teacher, loaded.reference_top1)
    outputs = None
    if teachers:
        ensemble = TeacherEnsemble(teachers, names=config.teachers).to(world.device)
        outputs = lambda batch: ensemble(task.inputs(batch))  # noqa: E731
    if config.train.gradient_checkpointing:
        student.hf.gradient_checkpointing_enable()
    if world.is_main and config.quant is not None and resume is None:
        print(quant_summary(student))
    return fit(
        student,
        task,
        loaded.data.train,
        loaded.data.test,
        config,
        run_dir,
        meta,
        balancer,
        outputs,
        resume,
        world,
    )


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


def _start(config: Config, command: str) -> tuple[Path, Loaded, World]:
    world = join_world(config)
    loaded = Loaded(config)
    return create_run_dir(config, command, world), loaded, world


def train(config: Config) -> tuple[Path, dict[str, Any]]:
    """Fine-tune on the training text only: plain QAT (next-token cross-entropy) with `quant`."""
    if config.teachers:
        raise QatkdError(
            "train learns from the text only; to learn from teachers use 'qatkd distill'"
        )
    config = _with_language_quant(config)
    run_dir, loaded, world = _start(config, "train")
    student = build_student(config, loaded)
    return run_dir, _fit(config, run_dir, loaded, student, _meta(config, loaded), world)


def distill(config: Config) -> tuple[Path, dict[str, Any]]:
    """QAT student trained on the text and the teachers (token-level KD), balanced by
    `config.balancer`; `teachers` are model names or folders, e.g. teachers=[smollm2-135m]."""
    build_balancer(config.balancer, num_teachers=len(config.teachers))
    config = _with_language_quant(config)
    run_dir, loaded, world = _start(config, "distill")
    student = build_student(config, loaded)
    return run_dir, _fit(config, run_dir, loaded, student, _meta(config, loaded), world)


def _restore(config: Config, loaded: Loaded) -> nn.Module:
    """The student's structure for a checkpoint of `config` (weights come from the checkpoint)."""
    student = build_student(config.model_copy(update={"quant": None}), loaded)
    if config.quant is not None:
        prepare(student, config.quant)
    return student


def resume(run_dir: Path, state: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Continue an interrupted language run from its last checkpoint."""
    config = build_config(state["config"])
    world = join_world(config)
    loaded = Loaded(config)
    student = _restore(config, loaded)
    return run_dir, _fit(config, run_dir, loaded, student, state["meta"], world, resume=state)


def ptq(config: Config) -> tuple[Path, dict[str, Any]]:
    """Post-training quantization of the pretrained model: with `quant.method=minmax`, RTN
    (round to nearest with each group's max |w| as the range)."""
    if config.quant is None:
        raise QatkdError("ptq needs a bit-width: set quant.bits=W4A16 (or another)")
    config = _with_language_quant(config)
    run_dir, loaded, _ = _start(config, "ptq")
    student = build_student(config, loaded)
    print(quant_summary(student))
    metrics = _evaluate(student, loaded)
    return run_dir, save_ptq_run(run_dir, _meta(config, loaded), config, student, metrics)


def _evaluate(model: nn.Module, loaded: Loaded) -> dict[str, float]:
    task = LanguageTask(reference=loaded.reference_top1)
    return task.evaluate(model, DataLoader(loaded.data.test, task.eval_batch_size))


def evaluate_pretrained(config: Config) -> dict[str, float]:
    """Perplexity of the pretrained model itself (the FP teacher row of a benchmark)."""
    join_world(config)
    loaded = Loaded(config)
    return _evaluate(loaded.reference, loaded)


def evaluate(state: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Perplexity (and agreement with the pretrained model) of a language checkpoint; `data.*`
    overrides pick other evaluation text."""
    return _evaluate(*load_student(state, overrides))


def load_student(
    state: dict[str, Any], overrides: list[str] | None = None
) -> tuple[nn.Module, Loaded]:
    """The student stored in a language checkpoint, in eval mode, and its pretrained source."""
    loaded = Loaded(build_config(apply_overrides(state["config"], overrides or [])))
    student = _restore(build_config(state["config"]), loaded)
    student.load_state_dict(state["model"])
    return student.eval(), loaded


def export(state: dict[str, Any], out: Path) -> dict[str, Any]:
    """`qatkd export` of a language checkpoint (see `qatkd.tasks.language.export`)."""
    from qatkd.tasks.language.export import export_language  # it builds on this module

    return export_language(state, out)
