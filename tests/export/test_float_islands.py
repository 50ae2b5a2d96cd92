"""The float islands (`qatkd.export.onnx_fallback`): the nodes no handler takes, exported by
torch.onnx and spliced into the graph under fresh names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import fx, nn

from qatkd.errors import QatkdError
from qatkd.export import INPUT_NAME, to_onnx, torch_onnx_ops_of
from qatkd.export.onnx_fallback import island_graph, rename_tensors, run_examples
from qatkd.export.onnx_graph import OPSET
from qatkd.export.runtime import ort_session


class Twice(nn.Module):
    """An island (its maximum, product and minimum) that reads `x` three times, and first `y`,
    which the graph computes after `x`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        return torch.minimum(torch.maximum(y, x), x * x)


def test_an_islands_inputs_are_the_tensors_it_reads_each_once_in_graph_order():
    gm = fx.symbolic_trace(Twice())
    examples = run_examples(gm, [3])
    x, y = (n for n in gm.graph.nodes if n.name in ("x", "add"))
    members = [n for n in gm.graph.nodes if n.name in ("maximum", "mul", "minimum")]
    graph, inputs, outputs = island_graph(gm, members, examples, OPSET)
    assert (inputs, outputs) == ([x, y], [members[-1]])
    assert [i.name for i in graph.input] == ["in0", "in1"]
    assert [o.name for o in graph.output] == ["out0"]


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_attention_exports_on_its_plain_path_and_the_fast_path_setting_is_kept():
    """The fused inference kernel has no ONNX form: the island turns it off while torch.onnx
    exports, and puts the user's setting back after."""
    model = SelfAttention().eval()
    assert torch.backends.mha.get_fastpath_enabled()
    proto = to_onnx(model, [5, 8], "fp32")
    assert torch.backends.mha.get_fastpath_enabled()
    assert torch_onnx_ops_of(proto) == ["attention", "getitem"]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort_session(proto.SerializeToString()).run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_renaming_reaches_every_tensor_of_a_node_and_of_its_subgraphs():
    """Inputs, outputs, node names (a node's is its first output's; one without outputs keeps
    its own, renamed), and in each subgraph (an If's branches, a list of graphs) its nodes'
    tensors, its inputs, outputs and initializers."""

    def branch(name: str) -> helper.GraphProto:
        inner = helper.make_node("Identity", ["c"], [f"{name}_out"], name="inner")
        return helper.make_graph(
            [inner],
            name,
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])],
            [helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])],
        )

    node = helper.make_node(
        "If", ["cond"], ["out"], name="if", then_branch=branch("then"), else_branch=branch("else")
    )
    node.attribute.append(helper.make_attribute("branches", [branch("listed")]))
    rename_tensors(node, lambda name: f"new_{name}")
    assert (list(node.input), list(node.output), node.name) == (
        ["new_cond"],
        ["new_out"],
        "new_out",
    )
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            inner = sub.node[0]
            assert (list(inner.input), inner.name) == (["new_c"], inner.output[0])
            assert inner.output[0] == f"new_{sub.name}_out"
            assert [v.name for v in [*sub.input, *sub.output, *sub.initializer]] == [
                "new_c",
                f"new_{sub.name}_out",
                "new_w",
            ]
    sink = helper.make_node("Sink", ["x"], [], name="sink")
    rename_tensors(sink, lambda name: f"new_{name}")
    assert (list(sink.input), sink.name) == (["new_x"], "new_sink")


class SineCumprod(nn.Module):
    """An island of two ops (no handler for either), of which torch.onnx cannot write one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x).cumprod(1) + 1


class FoldSine(nn.Module):
    """An island of two ops, of which torch.onnx writes one (`F.fold`, as Col2Im) only from
    opset 18, past the graph's `OPSET`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(F.fold(x, (3, 3), 2)) + 1


@pytest.mark.parametrize(
    ("model", "shape", "op"),
    [(SineCumprod(), [4], "cumprod"), (FoldSine(), [4, 4], "fold")],
    ids=["never", "not-at-the-graphs-opset"],
)
def test_the_op_torch_onnx_cannot_write_is_named_alone_with_what_torch_onnx_says(model, shape, op):
    assert OPSET < 18
    with pytest.raises(QatkdError) as refused:
        to_onnx(model.eval(), shape, "fp32")
    message = str(refused.value)
    assert message.startswith(f"cannot export '{op}' (graph node {op}) in float: torch.onnx ")
    cause = refused.value.__cause__
    assert message.endswith(f"says {str(cause).strip().splitlines()[0]}")


def test_a_torch_onnx_error_without_words_is_named_by_its_type(monkeypatch):
    def export(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(torch.onnx, "export", export)
    message = r"^cannot export 'sin' \(graph node sin\) in float: torch.onnx says RuntimeError$"
    with pytest.raises(QatkdError, match=message):
        to_onnx(SineCumprod().eval(), [4], "fp32")


def _relative_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return table[index].view(4, 4)


fx.wrap("_relative_bias")


class PositionBias(nn.Module):
    """A term computed from parameters and buffers only (Swin's relative position bias): an
    island without inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("index", torch.randint(0, 7, (16,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _relative_bias(self.table, self.index)


def test_an_island_that_reads_parameters_only_is_its_values_as_constants():
    model = PositionBias().eval()
    proto = to_onnx(model, [4, 4], "fp32")
    assert torch_onnx_ops_of(proto) == []  # the bias is no op of the graph: a constant
    x = torch.randn(2, 4, 4)
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort_session(proto.SerializeToString()).run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=0)
