"""The configuration of `task: detection`: its datasets and image size, its KD terms, and its
defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qatkd.config import Config, DataConfig, FamilyConfig, register_family
from qatkd.distill import KDConfig


class DetectionData(DataConfig):
    name: Literal["fashion-canvas", "yolo"] = Field(
        "fashion-canvas", description="fashion-canvas (generated) or yolo (a YOLO folder)"
    )
    image_size: int = Field(96, ge=16, description="YOLO images are resized to this")


class DetectionKDConfig(KDConfig):
    """The `kd:` section of a detection run: which dense-detector KD terms make L_KD (design
    §1.5). Their sum is one L_KD (one per teacher with `balancer.per_teacher`), so the balancer
    weighs it against L_TS as for any task."""

    form: Literal["dense", "legacy"] = Field(
        "dense",
        description="dense: the weighted sum of the cls, box and feature terms below (CrossKD, "
        "PKD); legacy: the KD before these terms (binary KL at every location, averaged over "
        "all of them, plus GIoU where a teacher's class probability exceeds 0.5), the "
        "benchmark's baseline; it ignores the *_weight keys",
    )
    cls_weight: float = Field(
        1.0,
        ge=0,
        description="class-score term: BCE between student and teacher sigmoid scores times "
        "|σ_S − σ_T|^kd.beta (quality focal loss, CrossKD), summed over locations and divided "
        "by the teacher's foreground mass (Σ of its top class score); 0 = off",
    )
    box_weight: float = Field(
        1.0,
        ge=0,
        description="box term: GIoU loss to the teacher's boxes at every location, weighted by "
        "the teacher's top class score, divided by the same mass; 0 = off",
    )
    feature_weight: float = Field(
        0.0,
        ge=0,
        description="feature term (PKD): MSE between per-channel standardised features "
        "kd.features of student and teacher (= 2(1 − Pearson r)), through a training-only 1×1 "
        "adapter where their widths differ; needs live teachers (kd.cache=false); 0 = off, the "
        "default (it cost validation mAP on the det_fashion canvases)",
    )
    features: list[str] = Field(
        default_factory=lambda: ["net.neck"],
        description="modules whose outputs the feature term matches, named as in the student's "
        "and every teacher's named_modules(); net.neck: the head's input in qatkd's detectors",
    )
    beta: float = Field(
        2.0, ge=0, description="exponent of |σ_S − σ_T| in the class-score term (QFL's β)"
    )

    @model_validator(mode="after")
    def _has_a_term(self) -> DetectionKDConfig:
        if self.form == "dense" and not (self.cls_weight or self.box_weight or self.feature_weight):
            raise ValueError(
                "every dense KD term is off: set kd.cls_weight, kd.box_weight or "
                "kd.feature_weight above 0, or distill with balancer.name=ts_only"
            )
        if self.feature_weight and not self.features:
            raise ValueError("kd.feature_weight > 0 needs kd.features (module names)")
        return self

    @property
    def feature_names(self) -> list[str]:
        """The modules the feature term reads; none when the term is off."""
        return self.features if self.form == "dense" and self.feature_weight else []


class DetectionConfig(Config):
    task: Literal["detection"] = "detection"
    data: DetectionData = DetectionData()
    kd: DetectionKDConfig = DetectionKDConfig()


DEFAULTS = {
    "model": {"name": "det_s"},
    "train": {"lr": 0.01, "batch_size": 32, "epochs": 10},
    "kd": {"temperature": 1.0},
}
FINE_TUNE = {"train": {"lr": 0.005, "warmup_epochs": 0.0}}
"""From a trained FP32 detector: the QAT rate that benchmarks/det_fashion.py picks on validation
(its QAT recipe grid, det_fashion.md), no warm-up."""

register_family("detection", FamilyConfig(DetectionConfig, DEFAULTS, FINE_TUNE))
