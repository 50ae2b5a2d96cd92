"""Layer scales (`qatkd.quant.layer_scale`): the product of a layer's output by a per-channel
parameter is found, quantized after it, and folded into the layer in the int8 graph."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import fx, nn
from torchvision.models import convnext

from qatkd.export import INPUT_NAME, as_exported, to_onnx
from qatkd.export.runtime import ort_session
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.quant.layer_scale import layer_scale
from qatkd.quant.modules import QuantAct


def _plain_channels(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Conv2d):
        return module.out_channels, -3
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    return None


class Scaled(nn.Module):
    """`factor * permute(linear(x))` on a [N, H, W, C] input, as ConvNeXt writes its block."""

    def __init__(
        self,
        factor_shape: tuple[int, ...],
        dims: tuple[int, ...] | None = (0, 3, 1, 2),
        between: str = "",
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.factor = nn.Parameter(torch.linspace(-1.0, 2.0, int(np.prod(factor_shape))))
        self.factor.data = self.factor.data.reshape(factor_shape)
        self.dims, self.between = dims, between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.between == "relu":
            y = torch.relu(y)
        if self.dims is not None:
            y = y.permute(*self.dims)
        out = self.factor * y
        if self.between == "read twice":
            return out + y
        if self.between == "called twice":
            return out + self.linear(x).permute(*self.dims)
        return out


CASES = {  # model, whether the product is a layer scale
    "channels after a permute": (Scaled((6, 1, 1)), True),
    "negative permute dims": (Scaled((6, 1, 1), dims=(0, -1, 1, 2)), True),
    "one value": (Scaled((1,)), True),
    "last axis, no permute": (Scaled((6,), dims=None), True),
    "another axis": (Scaled((1, 6, 1, 1), dims=None), False),
    "two axes": (Scaled((6, 2, 1)), False),
    "a relu between": (Scaled((6, 1, 1), between="relu"), False),
    "a layer output read twice": (Scaled((6, 1, 1), between="read twice"), False),
    "a layer called twice": (Scaled((6, 1, 1), between="called twice"), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_layer_scale_is_a_per_channel_factor_on_a_layers_output_through_permutes(case):
    model, expected = CASES[case]
    gm = fx.symbolic_trace(model)
    mul = next(n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("mul"))
    found = layer_scale(gm, mul, _plain_channels)
    assert (found is not None) == expected
    if found is not None:
        layer, _, factor = found
        assert layer.target == "linear"
        assert torch.equal(factor, model.factor.detach().reshape(-1).expand(6))


def test_a_factor_that_is_zero_somewhere_is_no_layer_scale():
    model = Scaled((6, 1, 1))
    with torch.no_grad():
        model.factor[2] = 0.0
    gm = fx.symbolic_trace(model)
    mul = next(n for n in gm.graph.nodes if n.name.startswith("mul"))
    assert layer_scale(gm, mul, _plain_channels) is None


class Block(nn.Module):
    """A stem, one ConvNeXt block (layer scale of both signs) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = convnext.CNBlock(8, 0.5, 0.0)
        with torch.no_grad():
            self.block.layer_scale.copy_(torch.linspace(-1.5, 1.5, 8).reshape(8, 1, 1))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_a_convnext_block_quantizes_after_its_layer_scale_and_exports_it_folded():
    """The block's last Linear holds no output quantizer (the product's is after the factor);
    the int8 graph has no Mul and no requantization, and runs what PyTorch computes."""
    torch.manual_seed(0)
    model = prepare(Block(), QuantConfig(bits="W8A8", method="minmax"))
    last = model.block.block[5]
    assert not any(isinstance(m, QuantAct) for m in last.children())
    x = torch.rand(16, 3, 8, 8)
    calibrate(model, [x], 16)
    model.eval()
    proto = to_onnx(model, [3, 8, 8])
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Mul"] == 0
    produced = {o: n.op_type for n in proto.graph.node for o in n.output}
    requantized = [
        n for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and produced.get(n.input[0]) == "DequantizeLinear"
    ]  # fmt: skip
    assert requantized == []
    test = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = ort_session(proto.SerializeToString()).run(None, {INPUT_NAME: test.numpy()})[0]
    with torch.no_grad():
        expected = as_exported(model, [3, 8, 8])(test).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
