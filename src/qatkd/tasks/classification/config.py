"""The configuration of `task: classification`: its datasets, and fine-tuning defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qatkd.config import Config, DataConfig, FamilyConfig, register_family


class ClassificationData(DataConfig):
    name: Literal["fashion-mnist", "cifar10", "cifar100", "imagefolder", "npz"] = Field(
        "fashion-mnist", description="fashion-mnist, cifar10, cifar100, imagefolder or npz"
    )


class ClassificationConfig(Config):
    task: Literal["classification"] = "classification"
    data: ClassificationData = ClassificationData()


FINE_TUNE = {"train": {"lr": 0.01, "warmup_epochs": 0.0}}
"""From a trained FP32 model (QAT, distillation): a tenth of the from-scratch rate, no warm-up
(the recipe of configs/qat_w4a4.yaml and benchmarks/cls_fashion.py; at lr 0.1 with a warm-up
epoch a 1-epoch W4A4 distill fell to 17 % test accuracy)."""

register_family("classification", FamilyConfig(ClassificationConfig, fine_tune=FINE_TUNE))
