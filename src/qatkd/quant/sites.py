"""Quantizers on module boundaries: a `QuantAct` on what a module returns, or on what it reads,
for a tensor that no quantized layer reads directly (an operand of a residual add, of a
squeeze-excite product or of a concatenation: `quant.placement` decides which).

`prepare` cannot put a module between two function calls of a forward it does not own, but every
module call is a boundary: a forward hook quantizes the module's output, a forward pre-hook its
first input. The model's code runs unchanged, in training as in eval. The QuantAct is a child of
the module it quantizes (`quant_output` / `quant_input`), so it saves, loads and moves with the
model, and the hook holds it by reference (a deep copy copies both as one). A container cannot
hold one, since its forward runs its children: a plain `nn.Sequential` passes its boundary to its
last (or first) child, and a ModuleList, a ModuleDict or a Sequential with a forward of its own
has none. torch.fx sees an ordinary QuantAct node after the module
(`quant.tensors.LeafTracer`), which the exporter writes as a QuantizeLinear.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from qatkd.quant.modules import QuantAct

Side = Literal["output", "input"]


class OutputSite:
    """Forward hook: the module's output, quantized."""

    def __init__(self, act: QuantAct) -> None:
        self.act = act

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return self.act(output)


class InputSite:
    """Forward pre-hook: the module's first input, quantized."""

    def __init__(self, act: QuantAct) -> None:
        self.act = act

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.act(args[0]), *args[1:])


def carrier(model: nn.Module, path: str, side: Side) -> str | None:
    """The path of the module that can hold the quantizer of the `side` of `model`'s submodule
    `path` (module doc), or None."""
    module = model.get_submodule(path)
    while type(module).forward is nn.Sequential.forward and len(module):
        index = len(module) - 1 if side == "output" else 0
        path, module = f"{path}.{index}", module[index]
    if isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        return None
    return path


def attach(model: nn.Module, path: str, side: Side, act: QuantAct) -> None:
    """Quantize the output (or first input) of `model`'s submodule `path`, a `carrier`, with
    `act`."""
    module = model.get_submodule(path)
    module.add_module(f"quant_{side}", act)
    if side == "output":
        module.register_forward_hook(OutputSite(act))
    else:
        module.register_forward_pre_hook(InputSite(act))


def output_sites(module: nn.Module) -> list[OutputSite]:
    return [h for h in module._forward_hooks.values() if isinstance(h, OutputSite)]


def input_sites(module: nn.Module) -> list[InputSite]:
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, InputSite)]


def detach_all(model: nn.Module) -> None:
    """Take every site hook off `model`'s modules (a traced copy, whose graph holds them as
    nodes: calling the modules must not quantize twice)."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, OutputSite | InputSite)]:
                del hooks[key]
