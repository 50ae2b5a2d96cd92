"""Image classification: datasets, models, task loss and metrics."""

from qatkd.tasks.classification.data import ImageData, load_data
from qatkd.tasks.classification.models import MODELS, Classifier, build_model, model_meta
from qatkd.tasks.classification.task import ClassificationTask

__all__ = [
    "MODELS",
    "ClassificationTask",
    "Classifier",
    "ImageData",
    "build_model",
    "load_data",
    "model_meta",
]
