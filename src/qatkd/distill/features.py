"""Named intermediate features of a model, read by forward hooks (feature KD: design §1.5).

A feature is the output of a submodule named as in `model.named_modules()` ("net.neck"). Hooks
leave the model itself unchanged: nothing of them is saved in a checkpoint or exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from qatkd.errors import QatkdError
from qatkd.registry import closest

SHOWN_NAMES = 40
"""At most this many module names in the error of a missing feature (a language model has
thousands)."""


def named_module(model: nn.Module, name: str, owner: str) -> nn.Module:
    """The submodule `name` of `model`, or a `QatkdError` naming `owner` (the student, teacher
    0 (PATH)) and listing the names it has."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    shown = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")
    raise QatkdError(
        f"{owner} has no module '{name}' to read a feature from (kd.features)"
        f"{closest(name, names)}; its modules: {shown}"
    )


class FeatureHooks:
    """Keeps the latest output of each named submodule of `model` in `outputs`, by name."""

    def __init__(self, model: nn.Module, names: Sequence[str], owner: str) -> None:
        self.outputs: dict[str, Tensor] = {}
        modules = [named_module(model, name, owner) for name in names]  # every name checked first
        self._handles = [
            module.register_forward_hook(self._keeper(name))
            for name, module in zip(names, modules, strict=True)
        ]

    def _keeper(self, name: str) -> Any:
        def keep(module: nn.Module, inputs: Any, output: Tensor) -> None:
            self.outputs[name] = output

        return keep

    def remove(self) -> None:
        """Takes the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.outputs = [], {}
