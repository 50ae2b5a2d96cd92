"""The classification family: an `ImageFamily` of this package's data, models, task and parity."""

from __future__ import annotations

from qatkd.tasks.classification.data import labels, load_data
from qatkd.tasks.classification.models import MODELS, TORCHVISION_PREFIX, build_model
from qatkd.tasks.classification.parity import compare
from qatkd.tasks.classification.task import ClassificationTask
from qatkd.tasks.family import FAMILIES
from qatkd.tasks.image import ImageFamily


def check_model_name(name: str) -> None:
    """Fail early on a model name that is neither registered nor a torchvision model."""
    if not name.startswith(TORCHVISION_PREFIX):
        MODELS.get(name)


CLASSIFICATION = FAMILIES.register("classification")(
    ImageFamily(
        "classification",
        load_data,
        build_model,
        check_model_name,
        ClassificationTask,
        compare,
        labels=labels,
    )
)
