"""The configuration of `task: detection`: its datasets and image size, and its defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qatkd.config import Config, DataConfig, FamilyConfig, register_family


class DetectionData(DataConfig):
    name: Literal["fashion-canvas", "yolo"] = Field(
        "fashion-canvas", description="fashion-canvas (generated) or yolo (a YOLO folder)"
    )
    image_size: int = Field(96, ge=16, description="YOLO images are resized to this")


class DetectionConfig(Config):
    task: Literal["detection"] = "detection"
    data: DetectionData = DetectionData()


DEFAULTS = {
    "model": {"name": "det_s"},
    "train": {"lr": 0.01, "batch_size": 32, "epochs": 10},
    "kd": {"temperature": 1.0},
}
FINE_TUNE = {"train": {"lr": 0.005, "warmup_epochs": 0.0}}
"""From a trained FP32 detector: the QAT rate that benchmarks/det_fashion.py picks on validation
(its QAT recipe grid, det_fashion.md), no warm-up."""

register_family("detection", FamilyConfig(DetectionConfig, DEFAULTS, FINE_TUNE))
