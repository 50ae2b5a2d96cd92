"""Swin's shifted-window attention with its projections called as layers, so that they quantize.

torchvision's `ShiftedWindowAttention` passes `self.qkv.weight` and `self.proj.weight` to one
function (`shifted_window_attention`, a leaf of every torch.fx trace): the Linear layers are never
called, so `prepare`'s quantized layers would never run and a third of a Swin's weights would
train and deploy in float. `WindowAttention` computes the same thing with `self.qkv(x)` and
`self.proj(x)`, and marks the integer points as `qatkd.nn.Attention` does (query, key and value,
the operands of the integer matmuls, and the probabilities). What depends on the feature map's
size (padding to whole windows, the cyclic shift, the partition and its reverse, the shift's
attention mask) stays in leaf functions, computed in float as torch.fx cannot trace Python
branches on shapes. Its state dict is the torchvision module's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

from qatkd.nn import QuantPoint


class WindowAttention(ShiftedWindowAttention):
    """`ShiftedWindowAttention` (same parameters, same result to float rounding) with its
    projections called as layers and QuantPoints at its integer points."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.q_point, self.k_point, self.v_point = QuantPoint(), QuantPoint(), QuantPoint()
        self.probs_point = QuantPoint()

    @classmethod
    def splits(cls, m: nn.Module) -> bool:
        """Whether `m` is torchvision's (v1) `ShiftedWindowAttention`; v2's cosine attention is
        not rewritten."""
        return type(m) is ShiftedWindowAttention

    @classmethod
    def from_module(cls, m: ShiftedWindowAttention) -> WindowAttention:
        new = cls(
            m.qkv.in_features, list(m.window_size), list(m.shift_size), m.num_heads,
            m.qkv.bias is not None, m.proj.bias is not None, m.attention_dropout, m.dropout,
        )  # fmt: skip
        new.load_state_dict(m.state_dict())
        return new.to(m.qkv.weight.device, m.qkv.weight.dtype).train(m.training)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        windows = _partition(x, self.window_size, self.shift_size)  # [B * windows, N, C]
        q, k, v = self.qkv(windows).chunk(3, -1)
        heads, channels = self.num_heads, self.proj.in_features

        def split(t: Tensor) -> Tensor:  # [B * windows, heads, N, head_dim]
            return t.unflatten(-1, (heads, channels // heads)).transpose(1, 2)

        q, k, v = split(self.q_point(q)), split(self.k_point(k)), split(self.v_point(v))
        scores = (q @ k.transpose(-2, -1)) * (channels // heads) ** -0.5
        scores = scores + self.get_relative_position_bias()
        scores = _mask_shifted(scores, x, self.window_size, self.shift_size)
        probs = self.probs_point(scores.softmax(-1))
        probs = F.dropout(probs, self.attention_dropout, self.training)
        out = self.proj((probs @ v).transpose(1, 2).flatten(2))
        out = F.dropout(out, self.dropout, self.training)
        return _merge(out, x, self.window_size, self.shift_size)


def _padded_shift(x: Tensor, window: list[int], shift: list[int]) -> tuple[int, int, list[int]]:
    """The feature map's height and width padded to whole windows, and the shift torchvision
    applies there (none along an axis that one window covers)."""
    height, width = x.shape[1], x.shape[2]
    padded = (-(-height // window[0]) * window[0], -(-width // window[1]) * window[1])
    return (*padded, [0 if w >= p else s for w, p, s in zip(window, padded, shift, strict=True)])


def _partition(x: Tensor, window: list[int], shift: list[int]) -> Tensor:
    """[B, H, W, C] padded to whole windows, shifted cyclically, cut into windows:
    [B * windows, window tokens, C]."""
    batch, height, width, channels = x.shape
    padded_h, padded_w, shift = _padded_shift(x, window, shift)
    x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(batch, padded_h // window[0], window[0], padded_w // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def _merge(windows: Tensor, x: Tensor, window: list[int], shift: list[int]) -> Tensor:
    """`_partition`'s inverse: the windows back on `x`'s [B, H, W, C] map."""
    batch, height, width, _ = x.shape
    padded_h, padded_w, shift = _padded_shift(x, window, shift)
    out = windows.view(
        batch, padded_h // window[0], padded_w // window[1], window[0], window[1], -1
    )
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


def _mask_shifted(scores: Tensor, x: Tensor, window: list[int], shift: list[int]) -> Tensor:
    """The scores with -100 where a shifted window joins tokens from regions of the map that
    are not neighbours (torchvision's mask), unchanged where nothing is shifted."""
    padded_h, padded_w, shift = _padded_shift(x, window, shift)
    if sum(shift) == 0:
        return scores
    regions = scores.new_zeros((padded_h, padded_w))
    cuts = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift, strict=True)]
    for count, ((h0, h1), (w0, w1)) in enumerate((h, w) for h in cuts[0] for w in cuts[1]):
        regions[h0:h1, w0:w1] = count
    regions = regions.view(padded_h // window[0], window[0], padded_w // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    apart = (regions.unsqueeze(1) - regions.unsqueeze(2)) != 0
    mask = torch.zeros_like(apart, dtype=scores.dtype).masked_fill(apart, -100.0)
    grouped = scores.view(-1, mask.shape[0], *scores.shape[1:])
    return (grouped + mask.unsqueeze(1).unsqueeze(0)).view(scores.shape)


for _leaf in (_partition, _merge, _mask_shifted):
    fx.wrap(_leaf.__name__)
