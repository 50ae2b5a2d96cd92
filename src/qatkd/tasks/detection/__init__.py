"""Object detection: generated canvases of Fashion-MNIST items or YOLO folders, compact FCOS-style
detectors, focal / GIoU / centerness losses, dense-output KD and mAP."""

from qatkd.tasks.detection import config  # noqa: F401  (registers the configuration)
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

__all__ = ["DETECTION", "DETECTORS", "DetectionTask", "build_detector", "load_detection_data"]
