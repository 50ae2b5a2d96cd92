"""What the image task families (classification, detection) share: the data they load
(`ImageData`), the checkpoint description of an image model (`model_meta`), and `ImageFamily`,
the `TaskFamily` built from a family's own data loader, model builder, task and parity check.

An image checkpoint rebuilds its model from `meta` alone (name, channels, classes, normalisation);
teachers are checkpoints of the same family; export is the int8 ONNX of `qatkd.export`.

The validation split belongs to the data (`data.val_seed`), and a training checkpoint records how
it was drawn (`meta["held_out"]`, `qatkd.tasks.data_identity`), so a later run can tell whether a
teacher or its `model.init` trained on that run's validation images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from qatkd.checkpoint import checkpoint_path, file_sha256, load_checkpoint, refuse_nonfinite
from qatkd.config import Config, DataConfig, checkpoint_config
from qatkd.distill import KDConfig, TeacherEnsemble, TeacherLogitCache
from qatkd.errors import QatkdError, first_line
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.quant.config import saved_quant
from qatkd.quant.tensors import check_state_fits_shared_quantizers
from qatkd.tasks.data_identity import (
    Labels,
    content_digest,
    held_out_record,
    overlap,
    underlying,
)
from qatkd.tasks.teacher_cache import CachedTeacherOutputs, WithIndex, predict_rows
from qatkd.train.task import Task, TeacherOutputs
from qatkd.train.validation import split_indices

CALIBRATION_SAMPLES = 512
EXPORT_BATCH_SIZE = 256


@dataclass
class ImageData:
    """The train / validation / test splits plus what a model and an exporter need to know about
    the images. A loader returns train and test; `ImageFamily.load` holds out `val` (without
    augmentation) from the training set."""

    name: str
    train: Dataset
    test: Dataset
    class_names: list[str]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val: Dataset | None = None
    held_out: dict[str, Any] | None = None
    """With a validation split: what `meta["held_out"]` records (module doc)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def model_meta(
    name: str,
    in_channels: int,
    image_size: int,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    task: str = "classification",
) -> dict[str, Any]:
    """What a checkpoint records to rebuild its model without the dataset (any image family)."""
    return {
        "task": task,
        "model_name": name,
        "in_channels": in_channels,
        "image_size": image_size,
        "class_names": list(class_names),
        "mean": list(mean),
        "std": list(std),
    }


ModelBuilder = Callable[[str, int, int, Sequence[float], Sequence[float]], nn.Module]


@dataclass(frozen=True)
class ImageFamily:
    """A `TaskFamily` for images, made from the family's own parts: `load_data(DataConfig)`,
    `build_model(name, channels, classes, mean, std)`, `check_model_name`, `make_task_for(num
    classes, kd config, per_teacher)` and `parity(model, runner, batches, desc=, trained=)`;
    `labels(train set)`, where the family has one label per image, stratifies the validation
    split."""

    name: str
    load_data: Callable[[DataConfig], ImageData]
    build_model: ModelBuilder
    check_model_name: Callable[[str], None]
    make_task_for: Callable[[int, KDConfig | None, bool], Task]
    parity: Callable[..., dict[str, Any]]
    ptq_from_checkpoint: bool = True
    labels: Labels = None

    def resolve(self, config: Config) -> Config:
        if config.train.gradient_checkpointing:
            raise QatkdError("train.gradient_checkpointing is for language models (task=language)")
        return config

    def check(self, config: Config) -> None:
        self.check_model_name(config.model.name)
        named = [("model.init", config.model.init)] + [("teacher", t) for t in config.teachers]
        for what, path in named:
            if path is not None and not checkpoint_path(path).is_file():
                raise QatkdError(f"{what} checkpoint not found: {path}")
        if config.kd.cache and config.teachers and config.data.augment:
            raise QatkdError(
                "kd.cache=true needs data.augment=false: augmented images change every epoch"
            )
        quant = config.quant
        if quant is not None and quant.format is not None:
            raise QatkdError(
                f"quant.format={quant.format} is a GGUF grid for language models; {self.name} "
                "models export to int8 ONNX: drop quant.format"
            )
        if quant is not None and quant.group_size is not None:
            raise QatkdError(
                f"quant.group_size={quant.group_size}: per-group weight scales are for language "
                f"models; {self.name} models export to int8 ONNX with one scale per channel"
            )
        if quant is not None and quant.asymmetric:
            raise QatkdError(
                "quant.asymmetric gives the weight groups of language models offsets; "
                f"{self.name} models export to int8 ONNX with symmetric weights"
            )
        if quant is not None and quant.init == "gptq":
            raise QatkdError(
                "quant.init=gptq calibrates on a language model's training text; "
                f"{self.name} models start from quant.init=rtn or the method's own start"
            )

    def preflight(self, config: Config, data: ImageData) -> None:
        """Each teacher and `model.init` is a readable checkpoint of this family that fits the
        data (`check_fits`)."""
        named = [("model.init", config.model.init)] + [("teacher", t) for t in config.teachers]
        for what, path in named:
            if path is not None:
                self.check_fits(load_checkpoint(path)["meta"], data, what, path)

    def load(self, config: Config, training: bool = True) -> ImageData:
        """Image datasets load lazily: the training split costs nothing unless read. For
        training, `data.val_split` of the training images, drawn by `data.val_seed`, become
        the validation set, read without augmentation; `held_out` records them."""
        data = self.load_data(config.data)
        if not training:
            return data
        plain = self.load_data(config.data.model_copy(update={"augment": False}))
        held: list[int] = []
        if config.data.val_split:
            labels = None if self.labels is None else self.labels(plain.train)
            kept, held = split_indices(
                len(data.train), config.data.val_split, config.data.val_seed, labels
            )
            data.train, data.val = Subset(data.train, kept), Subset(plain.train, held)
        data.held_out = held_out_record(plain.train, held, config.data)
        return data

    def validation_independence(self, config: Config, data: ImageData) -> dict[str, str]:
        """For each teacher and `model.init` of a training run: "independent" when it trained
        on none of this run's validation samples, "N of M validation samples in its training
        data" when it did, "unknown (...)" when its checkpoint cannot tell (`overlap`)."""
        if data.val is None:
            return {}
        roles = [("model.init", config.model.init)] + [("teacher", t) for t in config.teachers]
        return {
            f"{role} {path}": overlap(
                load_checkpoint(path)["meta"].get("held_out"), data.held_out, data.val, self.labels
            )
            for role, path in roles
            if path is not None
        }

    def model_from_meta(self, meta: dict[str, Any]) -> nn.Module:
        """The network a checkpoint describes (quantized if it was), without its weights."""
        classes = len(meta["class_names"])
        model = self.build_model(
            meta["model_name"], meta["in_channels"], classes, meta["mean"], meta["std"]
        )
        if meta.get("quant"):
            prepare(model, QuantConfig(**saved_quant(meta["quant"])))
        return model

    def restore(
        self,
        state: dict[str, Any],
        source: ImageData | None = None,
        path: str = "checkpoint",
        what: str = "checkpoint",
    ) -> nn.Module:
        """With `source`, the checkpoint must also fit that data (`check_fits`; `what` names
        its role in the error: checkpoint, teacher, model.init)."""
        if source is not None:
            self.check_fits(state["meta"], source, what, path)
        model = self.model_from_meta(state["meta"])
        refuse_nonfinite(state["model"], f"{what} {path}")
        if state["meta"].get("quant"):
            check_state_fits_shared_quantizers(model, state["model"])
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise QatkdError(
                f"checkpoint {path} does not fit model '{state['meta']['model_name']}': "
                f"{first_line(e)}"
            ) from e
        return model.eval()

    def check_fits(self, meta: dict[str, Any], data: ImageData, what: str, path: str) -> None:
        """A checkpoint used with `data` (a teacher, `model.init`, the model under eval or ptq)
        must be of this family, classes and input shape: a one-line error names the file."""
        family = meta.get("task", "classification")
        if family != self.name:
            raise QatkdError(
                f"{what} {path} is a {family} model, but this run's task is {self.name}"
            )
        if len(meta["class_names"]) != data.num_classes or meta["in_channels"] != data.in_channels:
            raise QatkdError(
                f"{what} {path} was trained for {len(meta['class_names'])} classes and "
                f"{meta['in_channels']} input channels, but data '{data.name}' has "
                f"{data.num_classes} classes and {data.in_channels} channels"
            )
        if meta["image_size"] != data.image_size:
            raise QatkdError(
                f"{what} {path} was trained on {meta['image_size']}x{meta['image_size']} images, "
                f"but data '{data.name}' has {data.image_size}x{data.image_size}"
            )

    def build_student(self, config: Config, data: ImageData) -> tuple[nn.Module, dict[str, Any]]:
        meta = model_meta(
            config.model.name,
            data.in_channels,
            data.image_size,
            data.class_names,
            data.mean,
            data.std,
            self.name,
        )
        model = self.build_model(
            config.model.name, data.in_channels, data.num_classes, data.mean, data.std
        )
        if config.model.init:
            init = load_checkpoint(config.model.init)
            self.check_fits(init["meta"], data, "model.init", config.model.init)
            if init["meta"].get("quant"):
                raise QatkdError(
                    f"model.init={config.model.init} is quantized: "
                    "start from a full-precision checkpoint"
                )
            if init["meta"]["model_name"] != config.model.name:
                raise QatkdError(
                    f"model.init={config.model.init} holds a '{init['meta']['model_name']}', "
                    f"but model.name is '{config.model.name}'"
                )
            model.load_state_dict(self.restore(init, path=config.model.init).state_dict())
        if config.quant is not None:
            from qatkd.export import check_exportable  # slow import (onnx): see tasks/family.py

            check_exportable(model, input_shape(meta))  # refuse before training, not after
            prepare(model, config.quant)
            batches = DataLoader(
                data.train,
                batch_size=128,
                shuffle=True,
                generator=torch.Generator().manual_seed(config.seed),
            )
            calibrate(model, batches, CALIBRATION_SAMPLES)
            meta["quant"] = config.quant.model_dump(mode="json")
        if data.held_out is not None:
            meta["held_out"] = data.held_out
        return model, meta

    def make_task(self, config: Config, data: ImageData) -> Task:
        return self.make_task_for(data.num_classes, config.kd, config.balancer.per_teacher)

    def ensemble(
        self,
        config: Config,
        data: ImageData,
        device: torch.device,
        features: Sequence[str] = (),
    ) -> TeacherEnsemble:
        """The run's teachers, checked against `data`, frozen on `device`; `features`: the
        module names whose outputs `TeacherEnsemble.with_features` returns."""
        teachers = [
            self.restore(load_checkpoint(path), data, path, "teacher") for path in config.teachers
        ]
        return TeacherEnsemble(teachers, names=config.teachers, features=features).to(device)

    def teacher_outputs(
        self, config: Config, data: ImageData, task: Task, device: torch.device
    ) -> tuple[TeacherOutputs, Dataset]:
        """Live: the frozen ensemble runs on every batch. With `kd.cache=true` (non-augmented
        data only) each teacher's outputs for every training image are computed once and stored
        on disk by sample (`TeacherLogitCache`), keyed by the teacher file's and the data's
        content; the first batch is checked against the live teachers."""
        ensemble = self.ensemble(config, data, device)
        if not config.kd.cache:
            return (lambda batch: ensemble(task.inputs(batch))), data.train
        if config.data.augment:
            raise QatkdError(
                "kd.cache=true needs data.augment=false: augmented images change every epoch"
            )
        base, positions = underlying(data.train)
        key = {"data": content_digest(base)}
        tables, caches = [], []
        for path, teacher in zip(config.teachers, ensemble.teachers, strict=True):
            key["teacher"] = file_sha256(checkpoint_path(path))
            cache = TeacherLogitCache(config.kd.cache_dir, key, len(base))
            compute = partial(predict_rows, teacher, base)
            tables.append(cache.rows(torch.tensor(positions), compute).to(device))
            caches.append(cache.path)
        lookup = CachedTeacherOutputs(tables, ensemble, task, caches)
        return lookup, WithIndex(data.train)

    def _quantized(self, state: dict[str, Any], path: Path) -> nn.Module:
        if not state["meta"].get("quant"):
            raise QatkdError(
                f"{path} is not quantized: export needs a QAT/PTQ checkpoint "
                "(run qatkd ptq or qatkd distill with quant.bits)"
            )
        return self.restore(state, path=str(path))

    def _test_loader(self, state: dict[str, Any], data_limit: int | None) -> DataLoader:
        """The checkpoint's test split, its first `data_limit` samples if given."""
        limit = [] if data_limit is None else [f"data.test_limit={data_limit}"]
        config = checkpoint_config(state, ["data.augment=false", *limit])
        return DataLoader(self.load(config, training=False).test, batch_size=EXPORT_BATCH_SIZE)

    def export(
        self, state: dict[str, Any], path: Path, out: Path, data_limit: int | None
    ) -> dict[str, Any]:
        """The int8 ONNX, FP32 ONNX and qpack, with parity on the first `data_limit` test
        samples (all by default) against the aligned and the trained model."""
        from qatkd.export import export_onnx  # slow import (onnx): see tasks/family.py

        trained = self._quantized(state, path)
        loader = self._test_loader(state, data_limit)
        shape = input_shape(state["meta"])
        return export_onnx(trained, state["meta"], shape, out, loader, self.parity, path)

    def bench(
        self,
        state: dict[str, Any],
        path: Path,
        threads: int,
        batch_sizes: tuple[int, ...],
        repeats: int,
        data_limit: int | None,
    ) -> dict[str, Any]:
        """Exports first if the run folder has no export of this very checkpoint (by content)."""
        from qatkd.export import bench_exported  # slow import (onnx): see tasks/family.py

        out = path.parent
        made_from = exported_from(out)
        if made_from != file_sha256(path):
            if made_from is not None:
                print(f"re-exporting: {out / 'parity.json'} was made from another {path.name}")
            self.export(state, path, out, data_limit)
        return bench_exported(
            self._quantized(state, path),
            self.float_model(state),
            state["meta"],
            input_shape(state["meta"]),
            out,
            self._test_loader(state, data_limit),
            self.parity,
            threads,
            batch_sizes,
            repeats,
        )

    def float_model(self, state: dict[str, Any]) -> nn.Module:
        """The checkpoint's network without quantizers (its float weights), in eval mode: the
        FP32 PyTorch reference for speed."""
        model = self.model_from_meta({**state["meta"], "quant": None})
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in state["model"].items() if k in own})
        return model.eval()


def exported_from(out: Path) -> str | None:
    """The content hash of the checkpoint that the export in `out` was made from, or None when
    `out` holds no complete export (an export older than the hash counts as none)."""
    parity = out / "parity.json"
    if not (out / "model.int8.onnx").is_file() or not parity.is_file():
        return None
    try:
        return json.loads(parity.read_text()).get("checkpoint_sha256")
    except (json.JSONDecodeError, AttributeError):
        return None


def input_shape(meta: dict[str, Any]) -> list[int]:
    return [meta["in_channels"], meta["image_size"], meta["image_size"]]
