"""Classification models: CIFAR-style ResNets and a small VGG of our own, and torchvision models.

Models are built for any number of input channels and classes, and carry their input normalisation
(`Classifier`), so a checkpoint or an exported graph takes raw [0, 1] pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision
from torch import nn
from torchvision.models import mobilenetv2 as tv_mobilenet
from torchvision.models import resnet as tv_resnet

from qatkd.errors import QatkdError
from qatkd.nn import BasicBlock, Classifier, QuantPoint
from qatkd.registry import Registry

ModelFactory = Callable[[int, int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")
TORCHVISION_PREFIX = "tv:"


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, §4.2): 3 stages of n blocks, depth = 6n + 2."""

    def __init__(self, depth: int, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


class SmallVGG(nn.Module):
    """A plain VGG-style network (no residuals): a structurally different teacher for ensembles."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)]
            layers.append(nn.ReLU(inplace=True))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _register_resnet(depth: int, width: int = 16, suffix: str = "") -> None:
    MODELS.register(f"resnet{depth}{suffix}")(
        lambda in_channels, num_classes: CifarResNet(depth, in_channels, num_classes, width)
    )


for _depth in (8, 20, 32, 56):
    _register_resnet(_depth)
_register_resnet(20, width=32, suffix="_w2")
_register_resnet(8, width=8, suffix="_w0_5")  # narrower students, for a regime where KD has room
_register_resnet(8, width=4, suffix="_w0_25")


@MODELS.register("vgg8")
def _vgg8(in_channels: int, num_classes: int) -> nn.Module:
    return SmallVGG(in_channels, num_classes, (32, 32, 64, 64, 128, 128))


class _MarkedBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock with both inputs of the residual add marked for quantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.branch_point(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut_point(identity))


class _MarkedBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with both inputs of the residual add marked for quantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.branch_point(self.bn3(self.conv3(out)))
        return self.relu(out + self.shortcut_point(identity))


class _MarkedInvertedResidual(tv_mobilenet.InvertedResidual):
    """torchvision's MobileNetV2 block with both inputs of its residual add marked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_res_connect:
            return self.conv(x)
        return self.shortcut_point(x) + self.branch_point(self.conv(x))


class _PooledMobileNetV2(tv_mobilenet.MobileNetV2):
    """torchvision's MobileNetV2 with its global pooling as a module, which `prepare` quantizes
    (the functional call it replaces is invisible to it)."""

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


_MARKED = {
    tv_resnet.BasicBlock: _MarkedBasicBlock,
    tv_resnet.Bottleneck: _MarkedBottleneck,
    tv_mobilenet.InvertedResidual: _MarkedInvertedResidual,
}


def _mark_for_quantization(net: nn.Module) -> None:
    """Give torchvision's residual blocks the QuantPoints our own ResNets have and MobileNetV2 a
    pooling module, so that QAT simulates the integer graph the exporter writes (int8 adds and
    pooling, not float ones)."""
    for block in net.modules():
        marked = _MARKED.get(type(block))
        if marked is not None:
            block.branch_point, block.shortcut_point = QuantPoint(), QuantPoint()
            block.__class__ = marked
    if type(net) is tv_mobilenet.MobileNetV2:
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.__class__ = _PooledMobileNetV2


def _torchvision_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A torchvision model, untrained, with its first conv adapted to the input channels and its
    residual adds and pooling marked for quantization."""
    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise QatkdError(
            f"unknown torchvision model '{name}'; see torchvision.models.list_models()"
        ) from e
    _mark_for_quantization(net)
    parent, attr, conv = _first_conv(net)
    if conv.in_channels != in_channels:
        setattr(
            parent,
            attr,
            nn.Conv2d(
                in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                conv.bias is not None,
            ),
        )
    return net


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for parent in net.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, attr, child
    raise QatkdError("the torchvision model has no Conv2d to adapt to the input channels")


def model_names() -> list[str]:
    return [*MODELS.names(), f"{TORCHVISION_PREFIX}<torchvision name>"]


def build_model(
    name: str, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> Classifier:
    """A float classifier by registry name (`resnet20`, `vgg8`, `tv:resnet18`, ...)."""
    if name.startswith(TORCHVISION_PREFIX):
        net = _torchvision_model(name.removeprefix(TORCHVISION_PREFIX), in_channels, num_classes)
    else:
        net = MODELS.get(name)(in_channels, num_classes)
    return Classifier(net, mean, std)
