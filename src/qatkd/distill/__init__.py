"""Knowledge distillation: KD losses, the teacher ensemble, named features (hooks) and the
teacher-logit cache."""

from qatkd.distill.cache import TeacherLogitCache
from qatkd.distill.ensemble import TeacherEnsemble, TeacherOutput
from qatkd.distill.features import FeatureHooks, named_module
from qatkd.distill.losses import (
    KD_LOSSES,
    KDConfig,
    KDLoss,
    KLLoss,
    MSELoss,
    build_kd_loss,
    kd_kl,
    kd_mse,
    kd_reverse_kl,
    soften,
)

__all__ = [
    "KD_LOSSES",
    "FeatureHooks",
    "KDConfig",
    "KDLoss",
    "KLLoss",
    "MSELoss",
    "TeacherEnsemble",
    "TeacherLogitCache",
    "TeacherOutput",
    "build_kd_loss",
    "kd_kl",
    "kd_mse",
    "kd_reverse_kl",
    "named_module",
    "soften",
]
