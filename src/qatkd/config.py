"""The validated run configuration: YAML file + dotted `key=value` overrides -> `Config`.

Every section rejects unknown keys, so a typo fails before any work starts, with the closest valid
key in the message. The resolved config is saved as `config.yaml` in each run folder.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qatkd.balance import BalancerConfig
from qatkd.device import DEVICE_PATTERN
from qatkd.distill import KDConfig
from qatkd.errors import QatkdError, first_line
from qatkd.quant import QuantConfig
from qatkd.quant.config import saved_quant
from qatkd.registry import closest


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """The data keys of every task family; a family's config adds its own (and the choices of
    `data.name`) in a subclass (`register_family`)."""

    name: str = Field("fashion-mnist", description="dataset; the task family lists its choices")
    root: str | None = Field(None, description="dataset folder or file; default: where it installs")
    train_limit: int | None = Field(
        None, gt=0, description="use only the first N training samples (language: blocks)"
    )
    test_limit: int | None = Field(
        None, gt=0, description="use only the first N test samples (language: windows)"
    )
    augment: bool = Field(True, description="train-time augmentation (crop + flip)")
    val_split: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of the training set held out for validation (seeded; stratified by "
        "class where there are labels): best.pt is chosen on it; 0 turns it off (best.pt then "
        "chosen on the test set)",
    )
    val_seed: int = Field(
        0,
        ge=0,
        description="draws the validation split: it belongs to the data, so teachers, model.init "
        "and students of one dataset share one held-out set; seed varies initialisation, order "
        "and augmentation only",
    )


class ModelConfig(Section):
    name: str = Field(
        "resnet20",
        description="the model: classification resnet8/20/32/56, resnet20_w2 (twice as wide), "
        "resnet8_w0_5 / resnet8_w0_25 (half / a quarter as wide), vgg8, tv:<torchvision name>; "
        "detection det_s, det_m, det_res; language smollm2-135m (or model.path)",
    )
    init: str | None = Field(
        None, description="FP32 checkpoint to start from (QAT, distillation, PTQ)"
    )
    path: str | None = Field(None, description="language: a local Hugging Face model folder")


class TrainConfig(Section):
    epochs: int = Field(5, gt=0, description="passes over the training set")
    batch_size: int = Field(128, gt=0, description="samples per step (per process under torchrun)")
    lr: float = Field(
        0.1,
        gt=0,
        description="peak learning rate: linear warm-up, then cosine decay to 0; with model.init "
        "set the task family's fine-tuning default applies unless given",
    )
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd (Nesterov momentum) or adamw"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(
        5e-4, ge=0, description="weight decay on conv and linear weights only"
    )
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up before the cosine decay")
    log_every: int = Field(50, gt=0, description="steps between rows of steps.csv")
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: all cores")
    device: str = Field(
        "auto", description="auto (CUDA when available), cpu, cuda (the local rank's GPU), cuda:N"
    )
    bf16: bool = Field(
        False,
        description="bfloat16 autocast for the forward passes (float16 + loss scaling on GPUs "
        "without bfloat16)",
    )
    gradient_checkpointing: bool = Field(
        False, description="language: recompute activations in backward (less memory)"
    )
    save_every_min: float = Field(
        10,
        ge=0,
        description="also write last.pt inside an epoch every N minutes (wall clock), so a kill "
        "loses at most that; 0 = only at epoch ends",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN/inf loss stops the run (last.pt stays good) or skips the step (the "
        "run stops anyway once the weights are non-finite)",
    )
    tensorboard: bool = Field(
        False,
        description="also write TensorBoard event files into the run folder (rank 0): the rows "
        "of steps.csv and log.csv as steps/<column> and epochs/<column> scalars at the global "
        "step (losses, balancer weights, learning rate, val/test metrics, gradient conflict); "
        "needs pip install 'qatkd[tensorboard]'",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value


class DiagConfig(Section):
    every: int = Field(0, ge=0, description="gradient-conflict diagnostic every N steps; 0 = off")


class Config(Section):
    """The sections every run has. Each task family validates with its own subclass (its `task`
    value and `data` section), registered with `register_family`."""

    task: str = Field(
        "classification",
        description="task family: classification, detection or language; each owns its data.* "
        "keys and defaults",
    )
    seed: int = Field(0, description="seeds initialisation, data order and augmentation")
    out: str | None = Field(None, description="run folder; default runs/<command>-<model>-<time>")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    quant: QuantConfig | None = Field(
        None, description="null = full precision; setting any quant.* key quantizes"
    )
    teachers: list[str] = Field(
        default_factory=list,
        description="teacher checkpoints for distill (any architectures of the task family; "
        "language: model folders)",
    )
    kd: KDConfig = KDConfig()
    balancer: BalancerConfig = BalancerConfig()
    diag: DiagConfig = DiagConfig()


@dataclass(frozen=True)
class FamilyConfig:
    """How a task family's configuration is validated: its `Config` subclass, the defaults that
    differ from the base ones, and those of a run that fine-tunes a trained model (`model.init`
    given: QAT, distillation, PTQ). Keys a config gives explicitly win over both."""

    config_type: type[Config]
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    fine_tune: dict[str, dict[str, Any]] = field(default_factory=dict)
    quant: dict[str, Any] = field(default_factory=dict)
    """Defaults of the `quant.*` keys a quantizing config leaves unset: the family's `resolve`
    applies them (after `quant.format` has set its own), and the reference shows them."""


FAMILY_CONFIGS: dict[str, FamilyConfig] = {}
"""Task name -> its configuration, filled by the task families as they are imported
(`qatkd.tasks`, which `import qatkd` loads)."""


def register_family(task: str, family_config: FamilyConfig) -> None:
    if task in FAMILY_CONFIGS:
        raise ValueError(f"task family '{task}' registers its configuration twice")
    FAMILY_CONFIGS[task] = family_config


def family_config(task: str) -> FamilyConfig:
    if task not in FAMILY_CONFIGS:
        names = sorted(FAMILY_CONFIGS)
        raise QatkdError(
            f"config key 'task' = {task!r}: unknown task family{closest(str(task), names)}; "
            f"choose one of: {', '.join(names)}"
        )
    return FAMILY_CONFIGS[task]


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `QuantConfig | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, for 'did you mean' hints and `--help`."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        sub = _section_type(info.annotation)
        keys.append(prefix + name)
        if sub is not None:
            keys.extend(config_keys(sub, f"{prefix}{name}."))
    return keys


def _format_validation_error(error: ValidationError, config_type: type[Config]) -> str:
    messages = []
    for err in error.errors():
        key = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
        if err["type"] == "extra_forbidden":
            messages.append(f"unknown config key '{key}'{closest(key, config_keys(config_type))}")
        else:
            reason = err["msg"].removeprefix("Value error, ")
            messages.append(f"config key '{key}' = {err['input']!r}: {reason}")
    return "; ".join(messages)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.05` -> ("train.lr", 0.05); values are parsed as YAML (lists, null, numbers)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise QatkdError(
            f"cannot read override '{text}': write it as key=value, e.g. train.lr=0.05"
        )
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise QatkdError(f"cannot parse the value of override '{text}' as YAML") from e
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise QatkdError(
                f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys, `_set_dotted`'s inverse: {"train": {"lr": 0.1}} ->
    {"train.lr": 0.1}; an empty section or mapping stays one key with the value {}."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= dotted(value, f"{prefix}{name}.")
        else:
            flat[prefix + name] = value
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise QatkdError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise QatkdError(f"config file {path} is not valid YAML: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise QatkdError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}"
        )
    return data


def _merged(raw: dict[str, Any], defaults: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`raw` on top of `defaults`, section by section."""
    merged = dict(raw)
    for section, values in defaults.items():
        given = raw.get(section)
        if given is None or isinstance(given, dict):
            merged[section] = {**values, **(given or {})}
    return merged


def build_config(raw: dict[str, Any]) -> Config:
    """The validated config of `raw` (sections of key: value) for its task family: the family's
    defaults, then its fine-tuning defaults when `model.init` is given, under `raw`."""
    family = family_config(raw.get("task", "classification"))
    model = raw.get("model")
    fine_tuning = isinstance(model, dict) and model.get("init") is not None
    defaults = _merged(family.fine_tune, family.defaults) if fine_tuning else family.defaults
    try:
        return family.config_type.model_validate(_merged(raw, defaults))
    except ValidationError as e:
        raise QatkdError(_format_validation_error(e, family.config_type)) from e


def saved_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A configuration as a checkpoint or config.yaml saved it, ready for `build_config`: the
    data keys its task family does not own are dropped (qatkd saved every family's data keys
    before each family had its own configuration); a quant section gets the keys it was saved
    without as qatkd then did (`saved_quant`)."""
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("quant"), dict):
        raw["quant"] = saved_quant(raw["quant"])
    data_type = family_config(raw.get("task", "classification")).config_type
    known = data_type.model_fields["data"].annotation.model_fields
    if isinstance(raw.get("data"), dict):
        raw["data"] = {k: v for k, v in raw["data"].items() if k in known}
    return raw


def checkpoint_task(state: dict[str, Any]) -> str:
    """The task family a checkpoint belongs to (checkpoints before the field: classification)."""
    return state.get("config", {}).get("task") or state.get("meta", {}).get(
        "task", "classification"
    )


def checkpoint_config(state: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """The configuration a checkpoint (`state`) was made with, `overrides` (`key=value`) applied."""
    raw = saved_config({**state["config"], "task": checkpoint_task(state)})
    return build_config(apply_overrides(raw, overrides or []))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`raw` with each `key=value` override set (in place, and returned)."""
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of a run: defaults, then the YAML file, then command-line overrides."""
    return build_config(apply_overrides(read_yaml(path) if path else {}, overrides or []))


def config_to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
