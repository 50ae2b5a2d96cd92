"""Building blocks shared by the model definitions of every image family and by the quantization
pass: the quantization marker `QuantPoint`, the input-normalising wrapper `Classifier` and the
residual `BasicBlock`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
