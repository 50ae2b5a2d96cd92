"""One quantizer per tensor (`quant.tensors`): which layers read the same tensor, which quantizer
they share, its name in the exported graph, and the torch.fx trace they are found on."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from qatkd.errors import QatkdError
from qatkd.nn import QuantPoint
from qatkd.quant import QuantConfig, make_quantizer, prepare
from qatkd.quant.tensors import call_name, global_pool_call, share_tensor_quantizers, trace


class Views(nn.Module):
    """One tensor read by a conv directly and by two Linears through `torch.flatten` and `view`;
    the head reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.flat = nn.Linear(8, 4)
        self.viewed = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3)) + self.flat(torch.flatten(x, 1)) + self.viewed(x.view(-1, 8))
        return self.head(y)


def input_quantizers(model: Views) -> list:
    return [model.conv.input_quantizer, model.flat.input_quantizer, model.viewed.input_quantizer]


def test_layers_reading_one_tensor_through_flatten_or_view_share_its_highest_bit_quantizer():
    model = prepare(Views(), QuantConfig(bits="W4A4"))
    shared = model.conv.input_quantizer
    assert all(q is shared for q in input_quantizers(model))
    assert model.head.input_quantizer is not shared
    # the conv is the first layer (8 bits), the Linears' own quantizers had 4
    assert shared.bits == 8 and model.flat.weight_quantizer.bits == 4


def test_at_equal_bits_the_first_readers_quantizer_is_kept_and_shared_tensors_are_counted():
    model = prepare(Views(), QuantConfig(bits="W8A8"))
    first, second, third = (make_quantizer("lsq", 8) for _ in range(3))
    model.conv.input_quantizer, model.flat.input_quantizer = first, second
    model.viewed.input_quantizer = third
    assert share_tensor_quantizers(model) == 1  # one tensor was read through several quantizers
    assert all(q is first for q in input_quantizers(model))
    model.flat.input_quantizer = make_quantizer("lsq", 8)
    assert share_tensor_quantizers(model) == 1
    assert share_tensor_quantizers(model) == 0  # nothing left to share


def test_each_activation_quantizer_is_named_after_the_first_module_that_reads_its_tensor():
    """A QuantAct's tensor is the module's path, a layer input's `<path>.input` (the names of
    the exported graph's quantized tensors)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), QuantPoint(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    prepare(model, QuantConfig(bits="W4A4"))
    assert model[3].input_quantizer is model[2].quantizer
    hints = [model[0].input_quantizer, model[2].quantizer, model[4].input_quantizer]
    hints = [q.tensor_hint for q in [*hints, model[6].input_quantizer]]
    assert hints == ["0.input", "2", "4.input", "6.input"]


def test_a_tensor_passed_by_keyword_is_a_tensor_of_its_own():
    """`torch.flatten(input=x)` has no positional argument to follow: its result is read as a
    new tensor, and prepare goes on."""

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(input=self.conv(x), start_dim=1))

    model = prepare(Keywords(), QuantConfig(bits="W4A4"))
    assert model.fc.input_quantizer.tensor_hint == "fc.input"
    assert model.train()(torch.randn(2, 2, 2, 2)).shape == (2, 3)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


class Unfinished(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@pytest.mark.parametrize(
    ("model", "cause"),
    [
        (Branchy(), "TraceError: symbolically traced variables cannot be used as inputs to control "
         "flow"),
        (Unfinished(), "NotImplementedError: "),  # an exception without a message
    ],
    ids=["control-flow", "no-message"],
)  # fmt: skip
def test_a_model_fx_cannot_trace_is_refused_in_one_line_that_names_the_cause(model, cause):
    with pytest.raises(QatkdError) as error:
        trace(model)
    assert str(error.value) == (
        f"cannot trace {type(model).__name__} ({cause}); its forward must be a plain graph of "
        "modules and tensor ops, without data-dependent control flow"
    )


def test_a_model_fx_cannot_trace_is_prepared_with_one_quantizer_per_layer_input():
    model = prepare(Branchy(), QuantConfig(bits="W4A4"))
    assert model.fc.input_quantizer.tensor_hint is None  # not named: no graph to name it in
    assert model.train()(torch.ones(2, 4)).shape == (2, 4)


def test_the_trace_is_a_copy_named_after_the_model():
    model = Views().train()
    gm = trace(model)
    assert type(gm).__name__ == "Views" and not gm.training
    assert all(m.training for m in model.modules())  # the model itself is left as it was


def _call(function: Any) -> fx.Node:
    """The one function or method call of `function`, traced."""
    (node,) = [
        n
        for n in fx.symbolic_trace(function).graph.nodes
        if n.op in ("call_function", "call_method")
    ]
    return node


@pytest.mark.parametrize(
    "function, pooled",
    [
        (lambda x: F.adaptive_avg_pool2d(x, 1), True),
        (lambda x: F.adaptive_avg_pool2d(x, (1, 1)), True),
        (lambda x: F.adaptive_avg_pool2d(x, [1, 1]), True),
        (lambda x: F.adaptive_avg_pool2d(x, 2), False),
        (lambda x: F.adaptive_avg_pool2d(x, (2, 1)), False),
        (lambda x: F.adaptive_avg_pool2d(x, (1, 2)), False),
        (lambda x: F.adaptive_avg_pool2d(x, [2, 1]), False),
        (lambda x: F.adaptive_avg_pool2d(x, [1, 2]), False),
        (lambda x: x.mean((2, 3)), True),
        (lambda x: torch.mean(x, dim=[3, 2]), True),
        (lambda x: x.mean(dim=(2, 3)), True),
        (lambda x: x.mean(dim=(1, 2)), False),
        (lambda x: x.mean(2), False),
        (lambda x: x.mean((1, 2)), False),
    ],
)
def test_global_pooling_is_an_adaptive_pool_to_one_or_a_mean_over_the_spatial_dims(
    function, pooled
):
    assert global_pool_call(_call(function)) is pooled


@pytest.mark.parametrize("size, pooled", [(1, True), ((1, 1), True), (2, False)])
def test_a_pool_size_given_by_keyword_counts_too(size, pooled):
    """fx's tracer passes it by position; a graph made otherwise may keep the keyword."""
    graph = fx.Graph()
    node = graph.call_function(
        F.adaptive_avg_pool2d, (graph.placeholder("x"),), {"output_size": size}
    )
    assert global_pool_call(node) is pooled


def test_a_torchvision_function_traced_as_a_leaf_is_called_by_its_qualified_name():
    graph = fx.Graph()
    node = graph.call_function(stochastic_depth, (graph.placeholder("x"), 0.2, "row", True))
    assert call_name(node) == "torchvision.ops.stochastic_depth.stochastic_depth"
    assert call_name(_call(lambda x: torch.relu(x))) is torch.relu
    assert call_name(_call(lambda x: x.relu())) == "relu"
