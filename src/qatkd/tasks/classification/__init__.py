"""Image classification: datasets, models, task loss and metrics."""

from qatkd.tasks import ImageFamily
from qatkd.tasks.classification.data import ImageData, load_data
from qatkd.tasks.classification.models import (
    MODELS,
    TORCHVISION_PREFIX,
    Classifier,
    build_model,
    model_meta,
)
from qatkd.tasks.classification.parity import compare
from qatkd.tasks.classification.task import ClassificationTask


def check_model_name(name: str) -> None:
    """Fail early on a model name that is neither registered nor a torchvision model."""
    if not name.startswith(TORCHVISION_PREFIX):
        MODELS.get(name)


IMAGE_FAMILY = ImageFamily(load_data, build_model, check_model_name, ClassificationTask, compare)

__all__ = [
    "IMAGE_FAMILY",
    "MODELS",
    "ClassificationTask",
    "Classifier",
    "ImageData",
    "build_model",
    "load_data",
    "model_meta",
]
