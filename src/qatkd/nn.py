"""Building blocks shared by the model definitions of every image family and by the quantization
pass: the quantization marker `QuantPoint`, the input-normalising wrapper `Classifier`, the
residual `BasicBlock` and `Attention`, multi-head attention with its integer points marked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class QuantPoint(nn.Identity):
    """Marks a tensor that the deployed integer graph quantizes although no conv or matmul reads it
    directly (the branches feeding a residual add). It is the identity in full precision;
    `qatkd.quant.prepare` replaces it with an activation fake-quantizer so that training simulates
    exactly the graph the exporter writes."""


class Classifier(nn.Module):
    """Normalises raw pixels with the dataset's mean/std, then runs the network."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class BasicBlock(nn.Module):
    """ResNet basic block; both inputs of the residual add are marked for 8-bit quantization."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.branch_point = QuantPoint()
        self.shortcut_point = QuantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.branch_point(self.bn2(self.conv2(out)))
        return torch.relu(out + self.shortcut_point(self.shortcut(x)))


class Attention(nn.Module):
    """`nn.MultiheadAttention` (same call, same parameters, same result) written as separate
    projections and matmuls, with QuantPoints where the integer graph quantizes: the query, key
    and value (the operands of both matmuls, onnxruntime's integer MatMul kernels) and the
    probabilities (the softmax's output); `out_proj` reads their product. The softmax itself
    stays float: onnxruntime's integer softmax rounds a few percent of its outputs otherwise
    than a float softmax does, which QAT cannot simulate. `from_module` splits an
    `nn.MultiheadAttention` whose query, key and value have one width and no extra bias; its
    state dict loads into the split one."""

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float, bias: bool, batch_first: bool
    ) -> None:
        super().__init__()
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.embed_dim, self.head_dim = embed_dim, embed_dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(embed_dim, embed_dim, bias) for _ in range(4)
        )
        self.q_point, self.k_point, self.v_point = QuantPoint(), QuantPoint(), QuantPoint()
        self.probs_point = QuantPoint()
        self._register_load_state_dict_pre_hook(_split_in_projection)

    @classmethod
    def splits(cls, m: nn.Module) -> bool:
        """Whether `m` is an `nn.MultiheadAttention` that `from_module` splits."""
        return (
            type(m) is nn.MultiheadAttention
            and m._qkv_same_embed_dim
            and m.bias_k is None
            and not m.add_zero_attn
        )

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention) -> Attention:
        bias = m.in_proj_bias is not None
        new = cls(m.embed_dim, m.num_heads, m.dropout, bias, m.batch_first)
        new.load_state_dict(m.state_dict())
        return new.to(m.in_proj_weight.device, m.in_proj_weight.dtype).train(m.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length = query.shape[:2]
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # [n, heads, tokens, head_dim]
            return t.view(n, -1, heads, self.head_dim).transpose(1, 2)

        q = split(self.q_point(self.q_proj(query)))
        k = split(self.k_point(self.k_proj(key)))
        v = split(self.v_point(self.v_proj(value)))
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        mask = _mask(attn_mask, key_padding_mask, is_causal, n, heads, length, k.shape[2], q)
        if mask is not None:
            scores = scores + mask
        probs = F.dropout(self.probs_point(scores.softmax(-1)), self.dropout, self.training)
        out = self.out_proj((probs @ v).transpose(1, 2).reshape(n, length, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, probs.mean(1) if average_attn_weights else probs


def _mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    n: int,
    heads: int,
    length: int,
    source: int,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """The masks of `nn.MultiheadAttention` as one float mask added to the scores (True, or
    -inf, where a query may not look), broadcast to [n, heads, length, source]."""
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=like.device).triu(1)
    masks = []
    if attn_mask is not None:
        masks.append(
            attn_mask.view(-1, heads, length, source) if attn_mask.dim() == 3 else attn_mask
        )
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(n, 1, 1, source))
    if not masks:
        return None
    total = torch.zeros((), dtype=like.dtype, device=like.device)
    for m in masks:
        total = total + (
            torch.zeros_like(m, dtype=like.dtype).masked_fill(m, float("-inf"))
            if m.dtype == torch.bool
            else m
        )
    return total


def _split_in_projection(state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load an `nn.MultiheadAttention`'s packed `in_proj_weight` / `in_proj_bias` into the
    query, key and value projections."""
    for kind in ("weight", "bias"):
        packed = state.pop(f"{prefix}in_proj_{kind}", None)
        if packed is not None:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), packed.chunk(3), strict=True):
                state[f"{prefix}{name}.{kind}"] = part
