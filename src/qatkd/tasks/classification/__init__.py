"""Image classification: datasets, models, task loss and metrics."""

from qatkd.tasks.classification import config  # noqa: F401  (registers the configuration)
from qatkd.tasks.classification.data import load_data
from qatkd.tasks.classification.models import MODELS, TORCHVISION_PREFIX, Classifier, build_model
from qatkd.tasks.classification.parity import compare
from qatkd.tasks.classification.task import ClassificationTask
from qatkd.tasks.family import FAMILIES
from qatkd.tasks.image import ImageData, ImageFamily, model_meta


def check_model_name(name: str) -> None:
    """Fail early on a model name that is neither registered nor a torchvision model."""
    if not name.startswith(TORCHVISION_PREFIX):
        MODELS.get(name)


CLASSIFICATION = FAMILIES.register("classification")(
    ImageFamily(
        "classification", load_data, build_model, check_model_name, ClassificationTask, compare
    )
)

__all__ = [
    "CLASSIFICATION",
    "MODELS",
    "ClassificationTask",
    "Classifier",
    "ImageData",
    "build_model",
    "load_data",
    "model_meta",
]
