"""KD losses: the student matches its teachers' (softened) outputs (design §1.2).

Logits of any shape [..., C] are flattened to rows, so token-level logits [B, T, C] of a language
model count as B*T samples, exactly like a batch of images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from qatkd.registry import Registry


class KDConfig(BaseModel):
    """The `kd:` section of a run config."""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["kl", "reverse_kl", "mse"] = Field(
        "kl",
        description="kl: τ²·KL(teacher ‖ student) on softened outputs (Hinton); reverse_kl: "
        "τ²·KL(student ‖ teacher); mse: on logits",
    )
    temperature: float = Field(default=4.0, gt=0, description="softening temperature τ")
    cache: bool = Field(
        default=False,
        description="compute teacher logits once per training sample, stored by sample and keyed "
        "by teacher and data content (needs data.augment=false)",
    )
    cache_dir: str = Field(
        default=".cache/teacher_logits", description="folder of the teacher-logit cache"
    )


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def soften(logits: Tensor, temperature: float) -> Tensor:
    """Softened probabilities softmax(z/τ), in fp32 so low-precision teachers give exact targets."""
    return F.softmax(logits.float() / temperature, dim=-1)


def kd_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """τ²·KL(p_T || softmax(z_S/τ)), averaged over rows (Hinton et al., 2015).

    The teacher comes as probabilities, so the mean of an ensemble's softened outputs plugs in
    directly; τ² keeps the gradient scale independent of τ.
    """
    log_p_student = F.log_softmax(_rows(student_logits).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, _rows(teacher_probs), reduction="batchmean")
    return kl * temperature**2


def kd_reverse_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """τ²·KL(softmax(z_S/τ) || p_T), averaged over rows: mode-seeking, the student is not pushed
    to cover every token the teacher finds plausible (MiniLLM, Gu et al., 2024)."""
    log_p_student = F.log_softmax(_rows(student_logits).float() / temperature, dim=-1)
    log_p_teacher = _rows(teacher_probs).clamp_min(torch.finfo(torch.float32).tiny).log()
    kl = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(-1).mean()
    return kl * temperature**2


def kd_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared error between logits: KD without the temperature's smoothing."""
    return F.mse_loss(student_logits.float(), teacher_logits.float())


class KDLoss(ABC):
    """Distance from the student's logits to its teachers' targets.

    With `per_teacher=False` the teachers' targets are averaged into one target and one loss term
    comes back (the ensemble, GoR with two parameters); with `per_teacher=True` a list with one term
    per teacher comes back, for a balancer that weighs each teacher separately.
    """

    def __init__(self, temperature: float = 4.0, per_teacher: bool = False) -> None:
        self.temperature = temperature
        self.per_teacher = per_teacher

    @abstractmethod
    def target(self, teacher_logits: Tensor) -> Tensor:
        """One teacher's target, in the space where targets are averaged."""

    @abstractmethod
    def distance(self, student_logits: Tensor, target: Tensor) -> Tensor:
        """The scalar loss between the student's logits and a target."""

    def combined_target(self, teacher_logits: Sequence[Tensor]) -> Tensor:
        """The mean of the teachers' targets: what the student learns from in the default mode."""
        return torch.stack([self.target(t) for t in teacher_logits]).mean(dim=0)

    def __call__(
        self, student_logits: Tensor, teacher_logits: Sequence[Tensor]
    ) -> Tensor | list[Tensor]:
        if not teacher_logits:
            raise ValueError("KD needs the logits of at least one teacher")
        for i, logits in enumerate(teacher_logits):
            if logits.shape != student_logits.shape:
                raise ValueError(
                    f"teacher {i} logits have shape {tuple(logits.shape)}, "
                    f"the student's {tuple(student_logits.shape)}"
                )
        if self.per_teacher:
            return [self.distance(student_logits, self.target(t)) for t in teacher_logits]
        return self.distance(student_logits, self.combined_target(teacher_logits))


KD_LOSSES: Registry[type[KDLoss]] = Registry("KD loss")


@KD_LOSSES.register("kl")
class KLLoss(KDLoss):
    """Hinton KD; several teachers are combined by the mean of their softened probabilities."""

    def target(self, teacher_logits: Tensor) -> Tensor:
        return soften(teacher_logits, self.temperature)

    def distance(self, student_logits: Tensor, target: Tensor) -> Tensor:
        return kd_kl(student_logits, target, self.temperature)


@KD_LOSSES.register("reverse_kl")
class ReverseKLLoss(KLLoss):
    """KL(student || teacher) on softened outputs; an ensemble's target is the mean of the
    teachers' softened probabilities, as for `kl`."""

    def distance(self, student_logits: Tensor, target: Tensor) -> Tensor:
        return kd_reverse_kl(student_logits, target, self.temperature)


@KD_LOSSES.register("mse")
class MSELoss(KDLoss):
    """MSE on logits; several teachers are combined by the mean of their logits."""

    def target(self, teacher_logits: Tensor) -> Tensor:
        return teacher_logits.float()

    def distance(self, student_logits: Tensor, target: Tensor) -> Tensor:
        return kd_mse(student_logits, target)


def build_kd_loss(config: KDConfig, per_teacher: bool = False) -> KDLoss:
    """The KD loss named by the `kd:` config; `per_teacher` follows the balancer's."""
    return KD_LOSSES.get(config.loss)(config.temperature, per_teacher)
