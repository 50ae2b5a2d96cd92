"""Detection KD (design §1.5): what a dense one-stage teacher knows, taught where it knows it.

Almost every location of a dense detector is background, so a KD loss averaged over all
locations is mostly the student copying the teacher's "nothing here". `kd.form=dense` (the
default) builds L_KD from the dense-detector KD of the literature (`DenseKD`):

- class scores, as CrossKD (Wang et al., CVPR 2024) distils a GFL head: quality focal loss (Li et
  al., GFL, NeurIPS 2020) with the teacher's sigmoid scores as soft targets,
  BCE(σ_S, σ_T)·|σ_S − σ_T|^β summed over locations and classes. The modulation silences the
  locations where the two agree (mostly background), while a student's false positive where the
  teacher sees nothing still costs.
- boxes: GIoU loss between the student's and the teacher's decoded boxes at every location,
  weighted by the teacher's top class score (soft: no threshold decides where a box counts).
- Both are divided by the teacher's foreground mass M = max(1, Σ over locations of its top class
  score). CrossKD divides by the ground truth's positive mass (Σ centerness at the positives);
  here L_KD is a function of student and teacher alone (the engine gives it no labels), and the
  teacher's score mass is its own estimate of how many locations hold an object. Background
  locations (score ≈ 0) add ≈ 0 to both sums, where a mean over locations would shrink the loss
  as the share of background grows; the floor of 1 keeps an empty image from dividing by ≈ 0.
- features (PKD, Cao et al., NeurIPS 2022; off unless `kd.feature_weight` > 0: on the
  det_fashion canvases it cost validation mAP): the named features `kd.features` of student and
  teacher, each standardised per channel over N·H·W and compared by MSE (= 2(1 − Pearson r),
  averaged over channels), through a 1×1 conv adapter on the student side where the widths
  differ. Features of a teacher of another architecture differ in scale and width; standardised,
  only their pattern counts. The adapters are the KD loss's own parameters (`DenseKD.parts`):
  trained with the student and kept in its checkpoints, but never part of the student, so no
  export or parity check ever sees them.

`kd.temperature` softens both class scores, σ(z/τ) (1 by default for detection, as in CrossKD).
The weighted sum of the terms is one L_KD, or one per teacher (`per_teacher`). Several teachers
otherwise: the mean of their scores, boxes averaged with their top scores as weights, the mean of
their feature terms. `kd.form=legacy` is the KD before these terms (`LegacyKD`), kept as the
benchmark's baseline row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from qatkd.distill import FeatureHooks, TeacherOutput
from qatkd.errors import QatkdError
from qatkd.tasks.detection.boxes import decode, locations, split
from qatkd.tasks.detection.config import DetectionKDConfig
from qatkd.train.task import TeacherOutputs

CONFIDENT = 0.5
"""The legacy KD's box threshold on the teacher's top class probability."""
STANDARDISE_EPS = 1e-5
"""Added to each channel's variance before dividing (PKD's normalisation)."""


def logits_of(teacher_output: Tensor | TeacherOutput) -> Tensor:
    """A teacher's dense output, whether it came with features or not."""
    return teacher_output.logits if isinstance(teacher_output, TeacherOutput) else teacher_output


@dataclass(frozen=True)
class Targets:
    """Per location of one teacher (or of the teachers combined): softened class scores
    [B, HW, K], decoded boxes [B, HW, 4] and the top class score at τ = 1 [B, HW]."""

    scores: Tensor
    boxes: Tensor
    confidence: Tensor


def teacher_targets(outputs: Tensor, temperature: float) -> Targets:
    logits, box_values, _ = split(outputs.float())
    points = locations(*outputs.shape[-2:], device=outputs.device)
    return Targets(
        (logits / temperature).sigmoid(), decode(box_values, points), logits.sigmoid().amax(-1)
    )


def combined_targets(targets: Sequence[Targets]) -> Targets:
    """Mean scores and confidence; each location's box averaged with the teachers' confidences
    as weights (a teacher that sees nothing there does not move it)."""
    confidences = torch.stack([t.confidence for t in targets])
    weights = confidences / confidences.sum(0).clamp_min(1e-6)
    boxes = (torch.stack([t.boxes for t in targets]) * weights[..., None]).sum(0)
    scores = torch.stack([t.scores for t in targets]).mean(0)
    return Targets(scores, boxes, confidences.mean(0))


def foreground_mass(confidence: Tensor) -> Tensor:
    """max(1, Σ of the teacher's top class score over every location of the batch)."""
    return confidence.sum().clamp_min(1.0)


def quality_focal_kd(
    student_logits: Tensor, teacher_scores: Tensor, beta: float, temperature: float = 1.0
) -> Tensor:
    """Σ over locations and classes of BCE(σ(z_S/τ), p_T)·|σ(z_S/τ) − p_T|^β (QFL with the
    teacher's scores as targets), not normalised; zero where the student's scores equal the
    teacher's."""
    z = student_logits.float() / temperature
    bce = F.binary_cross_entropy_with_logits(z, teacher_scores, reduction="none")
    return (bce * (z.sigmoid() - teacher_scores).abs().pow(beta)).sum()


def weighted_box_kd(student_boxes: Tensor, teacher_boxes: Tensor, weight: Tensor) -> Tensor:
    """Σ over locations of weight·GIoU loss between the student's and the teacher's boxes, not
    normalised."""
    giou = generalized_box_iou_loss(student_boxes.reshape(-1, 4), teacher_boxes.reshape(-1, 4))
    return (giou * weight.reshape(-1)).sum()


def standardised(features: Tensor) -> Tensor:
    """Each channel of [N, C, H, W] to zero mean and unit variance over N·H·W."""
    dims = [0, *range(2, features.ndim)]
    x = features.float()
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    return (x - mean) / (var + STANDARDISE_EPS).sqrt()


def pkd_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """PKD: MSE between the per-channel standardised features, 2(1 − r) for Pearson's r of each
    channel, averaged over channels; blind to each channel's scale and shift."""
    return F.mse_loss(standardised(student_features), standardised(teacher_features))


class FeatureAdapters(nn.Module):
    """For each teacher and named feature, a 1×1 conv from the student's width to the teacher's,
    or an identity where they are equal. No bias: `pkd_loss` standardises each channel, which
    removes any shift, so a bias would get no gradient (rounding noise moved it, or not, by CPU)."""

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[Sequence[int]]):
        super().__init__()
        self.adapters = nn.ModuleList(
            nn.ModuleList(
                nn.Conv2d(s, t, 1, bias=False) if s != t else nn.Identity()
                for s, t in zip(student_widths, widths, strict=True)
            )
            for widths in teacher_widths
        )

    def forward(self, features: Sequence[Tensor], teacher: int) -> list[Tensor]:
        """The student's `features` mapped to the widths of teacher `teacher`."""
        return [adapt(f) for adapt, f in zip(self.adapters[teacher], features, strict=True)]


class DenseKD:
    """The class-score, box and feature terms of the module doc, weighted by `config`."""

    def __init__(self, config: DetectionKDConfig, per_teacher: bool = False) -> None:
        self.config = config
        self.per_teacher = per_teacher
        self.names = config.feature_names
        self.hooks: FeatureHooks | None = None
        self.adapters: FeatureAdapters | None = None

    @torch.no_grad()
    def parts(
        self, student: nn.Module, teacher_outputs: TeacherOutputs, batch: Any, inputs: Tensor
    ) -> nn.Module | None:
        """Hooks `student` at `kd.features` and makes the adapters for its widths and the
        teachers' (one forward of each on `batch`, the student in eval mode so its BatchNorm
        statistics and quantizer ranges stay as they are); None without the feature term."""
        if not self.names:
            return None
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks = FeatureHooks(student, self.names, "the student")
        was_training = student.training
        student.eval()
        student(inputs)
        student.train(was_training)
        ours = [self.hooks.outputs[name] for name in self.names]
        widths = []
        for i, output in enumerate(teacher_outputs(batch)):
            theirs = self._teacher_features(output, i)
            for name, mine, other in zip(self.names, ours, theirs, strict=True):
                if mine.ndim != 4 or mine.shape[2:] != other.shape[2:]:
                    raise QatkdError(
                        f"feature '{name}' is {tuple(mine.shape[1:])} in the student and "
                        f"{tuple(other.shape[1:])} in teacher {i}: the feature term needs "
                        "[C, H, W] maps of the same H and W (choose other kd.features)"
                    )
            widths.append([f.shape[1] for f in theirs])
        self.adapters = FeatureAdapters([f.shape[1] for f in ours], widths)
        return self.adapters

    def _teacher_features(self, output: Any, index: int) -> list[Tensor]:
        if not isinstance(output, TeacherOutput):
            raise QatkdError(
                "the feature term (kd.feature_weight > 0) needs the teachers' features: "
                "run them live (kd.cache=false)"
            )
        return [output.features[name] for name in self.names]

    def _feature_terms(self, teacher_outputs: Sequence[Any]) -> list[Tensor]:
        """Per teacher, the mean PKD loss over the named features."""
        if self.hooks is None or self.adapters is None:
            raise RuntimeError("the feature term needs parts(student, ...) before training")
        ours = [self.hooks.outputs[name] for name in self.names]
        terms = []
        for i, output in enumerate(teacher_outputs):
            pairs = zip(self.adapters(ours, i), self._teacher_features(output, i), strict=True)
            terms.append(torch.stack([pkd_loss(s, t) for s, t in pairs]).mean())
        return terms

    def _output_terms(self, outputs: Tensor, targets: Targets) -> Tensor:
        """The weighted class-score and box terms, divided by the teacher's foreground mass."""
        config = self.config
        logits, box_values, _ = split(outputs.float())
        mass = foreground_mass(targets.confidence)
        total = outputs.new_zeros((), dtype=torch.float32)
        if config.cls_weight:
            cls = quality_focal_kd(logits, targets.scores, config.beta, config.temperature)
            total = total + config.cls_weight * cls / mass
        if config.box_weight:
            boxes = decode(box_values, locations(*outputs.shape[-2:], device=outputs.device))
            box = weighted_box_kd(boxes, targets.boxes, targets.confidence)
            total = total + config.box_weight * box / mass
        return total

    def __call__(self, outputs: Tensor, teacher_outputs: list[Any]) -> Tensor | list[Tensor]:
        targets = [teacher_targets(logits_of(t), self.config.temperature) for t in teacher_outputs]
        features = self._feature_terms(teacher_outputs) if self.names else None
        weight = self.config.feature_weight
        if self.per_teacher:
            terms = [self._output_terms(outputs, t) for t in targets]
            if features is not None:
                terms = [term + weight * f for term, f in zip(terms, features, strict=True)]
            return terms
        total = self._output_terms(outputs, combined_targets(targets))
        if features is not None:
            total = total + weight * torch.stack(features).mean()
        return total


def binary_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """Σ over classes of KL(Bernoulli(p_T) || Bernoulli(sigmoid(z_S / τ))), mean over locations,
    times τ²; zero when the student's softened probabilities equal the teacher's."""
    eps = 1e-6
    p = teacher_probs.clamp(eps, 1 - eps)
    z = student_logits / temperature
    log_q, log_not_q = F.logsigmoid(z), F.logsigmoid(-z)
    kl = p * (p.log() - log_q) + (1 - p) * ((1 - p).log() - log_not_q)
    return kl.sum(-1).mean() * temperature**2


class LegacyKD:
    """`kd.form=legacy`: binary KL between the softened class probabilities at every location,
    averaged over all of them, plus a GIoU loss towards the teachers' boxes where their top class
    probability exceeds 0.5, weighted by it. Several teachers: the mean of their probabilities,
    boxes averaged with their confidences as weights."""

    def __init__(self, config: DetectionKDConfig, per_teacher: bool = False) -> None:
        self.temperature = config.temperature
        self.per_teacher = per_teacher

    def parts(
        self, student: nn.Module, teacher_outputs: TeacherOutputs, batch: Any, inputs: Tensor
    ) -> nn.Module | None:
        """No trainable parts."""
        return None

    def _distance(self, outputs: Tensor, targets: Targets) -> Tensor:
        logits, box_values, _ = split(outputs)
        class_term = binary_kl(logits, targets.scores, self.temperature)
        confidence = targets.confidence
        weight = torch.where(confidence > CONFIDENT, confidence, torch.zeros_like(confidence))
        if weight.sum() == 0:
            return class_term
        student_boxes = decode(box_values, locations(*outputs.shape[-2:], device=outputs.device))
        return class_term + weighted_box_kd(student_boxes, targets.boxes, weight) / weight.sum()

    def __call__(self, outputs: Tensor, teacher_outputs: list[Any]) -> Tensor | list[Tensor]:
        targets = [teacher_targets(logits_of(t), self.temperature) for t in teacher_outputs]
        if self.per_teacher:
            return [self._distance(outputs, t) for t in targets]
        return self._distance(outputs, combined_targets(targets))


def detection_kd(config: DetectionKDConfig, per_teacher: bool = False) -> DenseKD | LegacyKD:
    """The KD loss `kd.form` names."""
    return (LegacyKD if config.form == "legacy" else DenseKD)(config, per_teacher)
