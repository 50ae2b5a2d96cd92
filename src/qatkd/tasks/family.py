"""The `TaskFamily` protocol: everything task-specific, behind one interface the pipeline calls.

A family (classification, detection, language, or a new one) is a registered object that owns its
data, its models and checkpoints, its teachers, its losses and metrics (the `Task` it makes for
the engine), its calibration data and its export. `qatkd.pipeline` only calls these methods and
names no family, so adding a family is one new package that registers itself here.

`import qatkd` registers every built-in family's configuration (light modules); the family itself
loads on first use (`BUILT_IN`). Within a family, the slow libraries that only evaluation or
export use (torchmetrics, which loads transformers; onnx) are imported where used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qatkd.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from qatkd.config import Config
    from qatkd.train.task import Task, TeacherOutputs


class Source(Protocol):
    """What a family loaded for a run: the train, validation (held out from the training data
    by `data.val_split`; None when 0 or not training) and test splits, and whatever its models
    need (image statistics and class names, a tokenizer and a pretrained model, ...)."""

    train: Dataset
    val: Dataset | None
    test: Dataset


class TaskFamily(Protocol):
    """A task family. `ptq_from_checkpoint`: whether `qatkd ptq` quantizes an FP32 checkpoint
    (`--ckpt`) or the pretrained model the config names."""

    name: str
    ptq_from_checkpoint: bool

    def resolve(self, config: Config) -> Config:
        """The config with the family's own rules applied (defaults that depend on other keys)."""
        ...

    def check(self, config: Config) -> None:
        """Fail, before any data is loaded, on a wrong model name, a missing file, or a setting
        that a later stage of this family (export, bench, the runtimes) would refuse."""
        ...

    def preflight(self, config: Config, source: Source) -> None:
        """Fail, before any run folder is made, on teachers or a `model.init` that do not fit
        the loaded data (family, classes, input size; vocabulary)."""
        ...

    def load(self, config: Config, training: bool = True) -> Source:
        """The data (and pretrained parts) a run of `config` needs; without `training` (ptq,
        eval, export) the training split may be left unloaded (None)."""
        ...

    def build_student(self, config: Config, source: Source) -> tuple[nn.Module, dict[str, Any]]:
        """The student and its checkpoint `meta`: built by name or from `model.init` / the
        pretrained model, quantized and calibrated when `config.quant` is set."""
        ...

    def restore(self, state: dict[str, Any], source: Source | None = None) -> nn.Module:
        """The model a checkpoint holds, with its weights, in eval mode. `source`: the loaded
        data of the checkpoint's config, for families whose models need it."""
        ...

    def make_task(self, config: Config, source: Source) -> Task:
        """The losses and metrics the engine trains and evaluates with."""
        ...

    def validation_independence(self, config: Config, source: Source) -> dict[str, str]:
        """Whether each teacher and `model.init` trained on this run's validation samples:
        `{"teacher PATH": "independent" | "N of M validation samples in its training data" |
        "unknown (why)"}`; empty where the family's teachers have no such record."""
        ...

    def teacher_outputs(
        self, config: Config, source: Source, task: Task, device: torch.device
    ) -> tuple[TeacherOutputs, Dataset]:
        """The teachers' outputs for a training batch (on `device`) and the training set to
        use with them."""
        ...

    def export(
        self, state: dict[str, Any], path: Path, out: Path, data_limit: int | None
    ) -> dict[str, Any]:
        """Write the deployable files of the checkpoint `state` (read from `path`) into `out`."""
        ...

    def bench(
        self,
        state: dict[str, Any],
        path: Path,
        threads: int,
        batch_sizes: tuple[int, ...],
        repeats: int,
        data_limit: int | None,
    ) -> dict[str, Any]:
        """Latency, size and parity of the exported model against FP32, in one process."""
        ...


FAMILIES: Registry[TaskFamily] = Registry("task family")
BUILT_IN = {
    "classification": "qatkd.tasks.classification.family",
    "detection": "qatkd.tasks.detection.family",
    "language": "qatkd.tasks.language.family",
}
"""The modules that register the built-in families, imported on first use: a family's models,
data code and libraries load only for runs of that family."""


def task_family(name: str) -> TaskFamily:
    """The registered family called `name`, loading a built-in one on first use."""
    if name not in FAMILIES and name in BUILT_IN:
        importlib.import_module(BUILT_IN[name])
    return FAMILIES.get(name)
