"""The detection family: an `ImageFamily` of this package's data, detectors, task and parity,
whose teachers also give their named features when the KD's feature term is on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from qatkd.config import Config
from qatkd.errors import QatkdError
from qatkd.tasks.detection.data import load_detection_data
from qatkd.tasks.detection.models import DETECTORS, build_detector
from qatkd.tasks.detection.parity import compare_detections
from qatkd.tasks.detection.task import DetectionTask
from qatkd.tasks.family import FAMILIES
from qatkd.tasks.image import ImageData, ImageFamily
from qatkd.train.task import Task, TeacherOutputs


def check_model_name(name: str) -> None:
    DETECTORS.get(name)


@dataclass(frozen=True)
class DetectionFamily(ImageFamily):
    """`ImageFamily`, with live teachers that return `kd.features` for the feature term (the
    teacher-logit cache holds logits only)."""

    def check(self, config: Config) -> None:
        super().check(config)
        if config.teachers and config.kd.cache and config.kd.feature_names:
            raise QatkdError(
                "kd.cache=true holds teacher logits only, and the feature term "
                "(kd.feature_weight > 0) reads live teacher features: set kd.cache=false or "
                "kd.feature_weight=0"
            )

    def teacher_outputs(
        self, config: Config, data: ImageData, task: Task, device: torch.device
    ) -> tuple[TeacherOutputs, Dataset]:
        """Live teachers with their features when the feature term is on; otherwise as any
        image family's."""
        features = config.kd.feature_names
        if not features:
            return super().teacher_outputs(config, data, task, device)
        ensemble = self.ensemble(config, data, device, features)
        return (lambda batch: ensemble.with_features(task.inputs(batch))), data.train


DETECTION = FAMILIES.register("detection")(
    DetectionFamily(
        "detection",
        load_detection_data,
        build_detector,
        check_model_name,
        DetectionTask,
        compare_detections,
    )
)
