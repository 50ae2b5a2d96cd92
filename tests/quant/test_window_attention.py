"""Swin's shifted-window attention rewritten with its projections called as layers
(`qatkd.quant.window_attention`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import swin_transformer

from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.quant.base import Quantizer
from qatkd.quant.modules import QuantAct, QuantConv2d, QuantLinear
from qatkd.quant.window_attention import WindowAttention


@pytest.mark.parametrize(
    ("height", "width", "shift"),
    [(8, 8, [2, 2]), (7, 9, [2, 1]), (4, 4, [2, 2]), (4, 10, [2, 2]), (6, 10, [0, 0])],
    ids=["shifted", "padded", "one-window", "one-window-high", "unshifted"],
)
def test_window_attention_computes_what_torchvisions_does(height, width, shift):
    """Padding to whole windows, the cyclic shift (none along an axis one window covers) and its
    mask, in training mode too (dropout off); the state dict is the same."""
    torch.manual_seed(0)
    original = swin_transformer.ShiftedWindowAttention(16, [4, 4], shift, 2)
    nn.init.normal_(original.relative_position_bias_table)
    rewritten = WindowAttention.from_module(original)
    assert WindowAttention.splits(original) and rewritten.training
    assert rewritten.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, height, width, 16)
    torch.testing.assert_close(rewritten(x), original(x), rtol=1e-5, atol=1e-6)


def test_swin_v2_cosine_attention_is_not_rewritten():
    v2 = swin_transformer.ShiftedWindowAttentionV2(16, [4, 4], [2, 2], 2)
    assert not WindowAttention.splits(v2)


def _small_swin() -> nn.Module:
    return swin_transformer.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10)


def test_a_prepared_swin_runs_every_quantized_layer_its_attention_included():
    """torchvision's attention reads its projections' weights in one function, so that the
    quantized Linear layers never ran; the rewrite calls them."""
    torch.manual_seed(0)
    float_model = _small_swin().eval()
    model = prepare(copy.deepcopy(float_model), QuantConfig(bits="W8A8"))
    layers = [m for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    called: set[nn.Module] = set()
    for layer in layers:
        layer.register_forward_hook(lambda m, *_: called.add(m))
    x = torch.rand(2, 3, 32, 32)
    calibrate(model, [x], 2)
    assert called == set(layers)
    attentions = [m for m in model.modules() if isinstance(m, WindowAttention)]
    assert len(attentions) == 4
    for attention in attentions:
        assert isinstance(attention.qkv, QuantLinear) and isinstance(attention.proj, QuantLinear)
        points = (attention.q_point, attention.k_point, attention.v_point, attention.probs_point)
        assert all(isinstance(p, QuantAct) for p in points)
    for m in model.modules():  # the float computation: quantizers as identities
        if isinstance(m, Quantizer):
            m.forward = lambda t: t
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), float_model(x), rtol=1e-5, atol=1e-6)
