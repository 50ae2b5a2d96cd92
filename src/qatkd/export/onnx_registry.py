"""The registry of the ONNX graph builder's op handlers: which handler exports a module of a
given type, or a call to a given function or method (`qatkd.export.onnx_ops` registers them in
the table at its end).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

# The builder is typed Any here: naming `onnx_graph.GraphBuilder`, even for type checking only,
# would make the two modules import each other.
ModuleHandler = Callable[[Any, Any, str, str], str]
"""(builder, module, input tensor name, name hint) -> output tensor name."""
FunctionHandler = Callable[[Any, fx.Node, str], str]
"""(builder, fx node of a function or method call, name hint) -> output tensor name."""
Accepts = Callable[[Any, fx.Node], bool]
"""(builder, fx node) -> whether a handler takes it (its default: every input is a tensor)."""
MODULE_OPS: dict[type[nn.Module], tuple[ModuleHandler, bool]] = {}
FUNCTION_OPS: dict[Any, tuple[FunctionHandler, Accepts | None]] = {}


def module_op(
    *types: type[nn.Module], subclasses: bool = False
) -> Callable[[ModuleHandler], ModuleHandler]:
    """Register the handler of modules of exactly these types (`subclasses`: or of a subclass)."""

    def register(handler: ModuleHandler) -> ModuleHandler:
        for t in types:
            MODULE_OPS[t] = (handler, subclasses)
        return handler

    return register


def function_op(
    *targets: Any, accepts: Accepts | None = None
) -> Callable[[FunctionHandler], FunctionHandler]:
    """Register the handler of calls to these functions (or method names, e.g. "relu");
    `accepts` decides which calls it takes, instead of requiring every input to be a tensor
    (a reshape reads the batch size as a number)."""

    def register(handler: FunctionHandler) -> FunctionHandler:
        for t in targets:
            FUNCTION_OPS[t] = (handler, accepts)
        return handler

    return register


class Fallback(Exception):
    """Raised by a handler, before it emits anything, for a form it has no ONNX op for (an
    AdaptiveAvgPool2d to more than one pixel, a flatten of other dims than 1 to the last, ...):
    the builder exports that node in float with torch.onnx."""


def module_handler(m: nn.Module) -> ModuleHandler | None:
    """The handler of `m`'s exact type, else of the first registered type that also takes
    subclasses and `m` is an instance of; None where there is none."""
    exact = MODULE_OPS.get(type(m))
    if exact is not None:
        return exact[0]
    for t, (handler, subclasses) in MODULE_OPS.items():
        if subclasses and isinstance(m, t):
            return handler
    return None
