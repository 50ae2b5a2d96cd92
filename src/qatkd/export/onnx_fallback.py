"""The float fallback: the nodes of the frozen fx graph that have no integer handler are exported
by torch.onnx itself, so that a model which traces also exports (coverage by construction).

A run of consecutive unhandled nodes (an *island*) becomes a small `fx.GraphModule` of its own,
which `torch.onnx.export` (the TorchScript exporter: milliseconds per island, no extra package)
turns into ONNX; the builder splices that graph in under fresh tensor names. Only tensors cross an
island's border: a shape, an int or a tuple that a later island reads is recomputed there from the
tensors it came from, and the parameters and buffers an island reads become its initializers with
their own dtype; an island that reads nothing else is its values, as initializers. An island's
inputs are the float tensors around it (a DequantizeLinear's output where the tensor is
quantized), so it runs in float between DQ and Q, exactly as the
fake-quantized PyTorch model computes it in float.

Dimensions that depend on the batch (found by running the graph at two batch sizes) are exported
as dynamic, so every shape op torch.onnx records (Shape, Gather, Concat) follows the batch.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, fx

from qatkd.errors import QatkdError

EXAMPLE_BATCH = 2
"""The batch at which islands are traced; a second run at batch 1 tells which dims follow it."""


@dataclass(frozen=True)
class Examples:
    """Every node's value at `EXAMPLE_BATCH` and, for tensors, its dims that change with the
    batch."""

    values: dict[fx.Node, Any]
    batch_dims: dict[fx.Node, list[int]]

    def is_tensor(self, node: fx.Node) -> bool:
        return isinstance(self.values.get(node), Tensor)


def run_examples(gm: fx.GraphModule, input_shape: list[int]) -> Examples:
    """Run `gm` at batch `EXAMPLE_BATCH` and at batch 1 and keep every node's value."""
    runs = []
    for batch in (EXAMPLE_BATCH, 1):
        interpreter = fx.Interpreter(gm, garbage_collect_values=False)
        with torch.no_grad():
            interpreter.run(torch.rand(batch, *input_shape, generator=torch.Generator()))
        runs.append(interpreter.env)
    values, single = runs
    batch_dims = {
        node: [d for d, n in enumerate(v.shape) if n != single[node].shape[d]]
        for node, v in values.items()
        if isinstance(v, Tensor)
    }
    return Examples(values, batch_dims)


def op_name(node: fx.Node) -> str:
    """How an error names the op of `node`."""
    if node.op == "call_module":
        return str(node.target)
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def island_graph(
    gm: fx.GraphModule, members: list[fx.Node], examples: Examples, opset: int
) -> tuple[onnx.GraphProto, list[fx.Node], list[fx.Node]]:
    """The ONNX graph of the island `members` (consecutive nodes of `gm`), its input nodes (its
    graph inputs, in order) and its output nodes (its graph outputs, in order: the members whose
    tensors nodes outside the island read)."""
    inside = set(members)
    outputs = [
        n for n in members if examples.is_tensor(n) and any(u not in inside for u in n.users)
    ]
    needed: set[fx.Node] = set()
    inputs: list[fx.Node] = []

    def pull(node: fx.Node) -> None:
        """Take `node` into the island: as an input where it is a tensor computed outside,
        otherwise (a member, a parameter, a shape) with the nodes it reads."""
        if node in needed or node in inputs:
            return
        if node not in inside and node.op != "get_attr" and examples.is_tensor(node):
            inputs.append(node)
            return
        needed.add(node)
        for arg in node.all_input_nodes:
            pull(arg)

    for node in members:
        pull(node)
    inputs.sort(key=_order(gm))
    if not outputs:  # nothing outside reads it (an assert, a shape no one uses)
        return onnx.GraphProto(), inputs, outputs
    if not inputs:  # it reads parameters and buffers only (Swin's position bias): constants
        values = [examples.values[n].detach().numpy() for n in outputs]
        constants = [numpy_helper.from_array(v, f"out{i}") for i, v in enumerate(values)]
        return onnx.GraphProto(initializer=constants), inputs, outputs
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] for n in outputs))
    island = fx.GraphModule(gm, graph)
    in_names = [f"in{i}" for i in range(len(inputs))]
    out_names = [f"out{i}" for i in range(len(outputs))]
    dynamic = {
        name: {d: f"{name}_{d}" for d in examples.batch_dims[n]}
        for name, n in [*zip(in_names, inputs, strict=True), *zip(out_names, outputs, strict=True)]
    }
    buffer = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # attention's fused inference kernel has no ONNX form; its plain path has
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer notes
            torch.onnx.export(
                island,
                tuple(examples.values[n] for n in inputs),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dynamic,
            )
    except Exception as e:  # torch.onnx raises many types for ops it cannot write
        for node in members if len(members) > 1 else []:
            island_graph(gm, [node], examples, opset)  # names the op that fails alone
        first = next(iter(str(e).strip().splitlines()), type(e).__name__)
        what = ", ".join(f"'{op_name(n)}'" for n in members)
        raise QatkdError(
            f"cannot export {what} (graph node {members[0].name}) in float: torch.onnx says {first}"
        ) from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return onnx.load_from_string(buffer.getvalue()).graph, inputs, outputs


def _order(gm: fx.GraphModule) -> Any:
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: position[n]


def rename_tensors(node: onnx.NodeProto, rename: Callable[[str], str]) -> None:
    """Rename the tensors `node` reads and writes, inside its subgraphs too (If, Loop)."""
    node.input[:] = [rename(x) for x in node.input]
    node.output[:] = [rename(x) for x in node.output]
    node.name = node.output[0] if node.output else rename(node.name)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                rename_tensors(inner, rename)
            for value in [*sub.input, *sub.output, *sub.initializer]:
                value.name = rename(value.name)
