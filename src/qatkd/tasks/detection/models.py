"""Compact anchor-free one-stage detectors (FCOS-style, one feature level at stride 8).

A detector maps raw pixels [B, C, H, W] in [0, 1] to one dense tensor [B, K + 5, H/8, W/8]: per
location K class logits, 4 box-regression values (left, top, right, bottom distances, decoded as
exp(v) * stride) and 1 centerness logit. The network is plain Conv2d / BatchNorm / ReLU (and
residual adds), so quantization, BN folding and the ONNX exporter treat it like any classifier;
decoding and NMS stay in Python (`qatkd.tasks.detection.boxes`).

Sizes: `det_s` (student), `det_m` (teacher, twice as wide) and `det_res` (a teacher of another
architecture: residual stages, as in ResNet). Every detector names its neck output (the head's
input, an identity here as there is no FPN) `neck`, so feature KD reads the same place in
detectors of any architecture (`kd.features`, default `net.neck`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from qatkd.nn import BasicBlock, Classifier
from qatkd.registry import Registry

STRIDE = 8
EXTRA = 5  # 4 box values + 1 centerness after the class logits
PRIOR = 0.01
"""Initial foreground probability of the class logits (FCOS / RetinaNet): stable early training."""

DetectorFactory = Callable[[int, int], nn.Module]
DETECTORS: Registry[DetectorFactory] = Registry("detector")


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DenseHead(nn.Module):
    """One shared 3x3 conv, then a 1x1 prediction conv: K class logits + 4 box + 1 centerness."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.tower = conv_bn_relu(channels, channels)
        self.predict = nn.Conv2d(channels, num_classes + EXTRA, 1)
        with torch.no_grad():
            self.predict.weight.normal_(std=0.01)
            self.predict.bias.zero_()
            self.predict.bias[:num_classes] = -math.log((1 - PRIOR) / PRIOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(self.tower(x))


class PlainDetector(nn.Module):
    """VGG-style backbone: pairs of 3x3 convs, the second of each pair with stride 2."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        layers, cin = [], in_channels
        for w in widths:
            layers += [conv_bn_relu(cin, w), conv_bn_relu(w, w, stride=2)]
            cin = w
        self.backbone = nn.Sequential(*layers)
        self.neck = nn.Identity()
        self.head = DenseHead(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


class ResidualDetector(nn.Module):
    """ResNet-style backbone: a stem conv, then three residual stages of stride 2."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        stages, cin = [], width
        for w in (width, 2 * width, 4 * width):
            stages += [BasicBlock(cin, w, 2), BasicBlock(w, w, 1)]
            cin = w
        self.stages = nn.Sequential(*stages)
        self.neck = nn.Identity()
        self.head = DenseHead(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.stages(self.stem(x))))


DETECTORS.register("det_s")(lambda c, k: PlainDetector(c, k, 16))
DETECTORS.register("det_m")(lambda c, k: PlainDetector(c, k, 32))
DETECTORS.register("det_res")(lambda c, k: ResidualDetector(c, k, 24))


def build_detector(
    name: str, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    """A registered detector with the dataset's normalisation inside (raw pixels in)."""
    return Classifier(DETECTORS.get(name)(in_channels, num_classes), mean, std)
