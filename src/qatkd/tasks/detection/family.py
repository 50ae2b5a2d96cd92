"""The detection family: an `ImageFamily` of this package's data, detectors, task and parity."""

from __future__ import annotations

from qatkd.tasks.detection.data import load_detection_data
from qatkd.tasks.detection.models import DETECTORS, build_detector
from qatkd.tasks.detection.parity import compare_detections
from qatkd.tasks.detection.task import DetectionTask
from qatkd.tasks.family import FAMILIES
from qatkd.tasks.image import ImageFamily


def check_model_name(name: str) -> None:
    DETECTORS.get(name)


DETECTION = FAMILIES.register("detection")(
    ImageFamily(
        "detection",
        load_detection_data,
        build_detector,
        check_model_name,
        DetectionTask,
        compare_detections,
    )
)
