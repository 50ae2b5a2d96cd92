"""A frozen ensemble of full-precision teachers of any architectures (design §1.4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from qatkd.distill.features import FeatureHooks
from qatkd.errors import QatkdError


class TeacherOutput(NamedTuple):
    """One teacher's logits and its named intermediate features."""

    logits: Tensor
    features: dict[str, Tensor]


class TeacherEnsemble(nn.Module):
    """Runs every teacher on the same input and returns one logits tensor per teacher
    (`forward`), or the logits with the named intermediate `features` of each teacher
    (`with_features`: module names, read by forward hooks; a name a teacher lacks is a
    `QatkdError` that lists the names it has).

    Teachers are frozen and always in eval mode: their BatchNorm statistics and dropout must not
    change while the student trains, even when the engine calls `.train()` on everything it holds.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        names: Sequence[str] | None = None,
        features: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not teachers:
            raise QatkdError("the teacher ensemble is empty: set teachers=[...]")
        if names is not None and len(names) != len(teachers):
            raise ValueError(f"{len(names)} names for {len(teachers)} teachers")
        self.teachers = nn.ModuleList(teachers)
        self.labels = [
            f"teacher {i}" + (f" ({names[i]})" if names is not None else "")
            for i in range(len(teachers))
        ]
        self.teachers.requires_grad_(False)
        self.eval()
        self.hooks = [
            FeatureHooks(teacher, features, label)
            for teacher, label in zip(self.teachers, self.labels, strict=True)
        ]

    def train(self, mode: bool = True) -> TeacherEnsemble:
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        with torch.inference_mode():
            logits = [teacher(x) for teacher in self.teachers]
        # Inference tensors cannot be saved for the student's backward; clones made outside the
        # mode are ordinary tensors (without grad) that the KD loss may save.
        return [t.clone() for t in logits]

    def with_features(self, x: Tensor) -> list[TeacherOutput]:
        """Each teacher's logits and the features named at construction, from one forward."""
        with torch.inference_mode():
            logits = [teacher(x) for teacher in self.teachers]
            features = [dict(hooks.outputs) for hooks in self.hooks]
        return [
            TeacherOutput(t.clone(), {name: f.clone() for name, f in named.items()})
            for t, named in zip(logits, features, strict=True)
        ]

    def check_num_classes(self, num_classes: int, example: Tensor) -> None:
        """Fails early, naming the teacher, when a teacher's output width differs from the
        student's; `example` is any valid input batch (one sample is enough)."""
        for label, logits in zip(self.labels, self(example), strict=True):
            if logits.shape[-1] != num_classes:
                raise QatkdError(
                    f"{label} outputs {logits.shape[-1]} classes but the student has "
                    f"{num_classes}: use teachers trained on the student's dataset"
                )
