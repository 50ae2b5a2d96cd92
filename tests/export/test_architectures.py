"""Every torchvision classification family exports to int8 ONNX and computes in onnxruntime what
the fake-quantized PyTorch model computes: conv / linear / add / pooling on integer kernels, the
rest (Hardswish, SiLU, SE blocks' functional pooling, cat, chunk, permute, LayerNorm, attention)
in float between DequantizeLinear and QuantizeLinear (`onnx_fallback`).

Small widths and 32 x 32 Fashion-MNIST images (3 channels) keep each case to about a second.
Untrained networks are made to see the images (BatchNorm statistics measured on them, one
variance per layer so that no near-dead channel amplifies rounding) and get a ridge-regression
head on the labels, so that their logits differ from image to image and agreement means
something.

The kernels and PyTorch round a few values one step apart (float sums in another order, an
integer pooling's own rounding: `test_onnx_parity`), and an untrained deep network amplifies
such a step in some images into a different top-1: 1 to 3 of 256 here, as many on the
mobilenet_v2 graph, which has no float op at all, as on the ones with float islands. So the
test demands the same logits on most images, which any wrongly exported op breaks, and 98 %
top-1 agreement; the 99.9 % target is the benchmark's, on trained models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import convnext, regnet, swin_transformer

from qatkd.export import INPUT_NAME, as_exported, to_onnx
from qatkd.export.runtime import ort_session
from qatkd.nn import Classifier
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.tasks.classification.models import build_model
from qatkd.tasks.fashion_mnist import read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE = 32
MEAN, STD = [0.29] * 3, [0.35] * 3


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: build_model(f"tv:{name}", 3, 10, MEAN, STD)


def _wrapped(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: Classifier(make(), MEAN, STD)


ARCHITECTURES = {
    "mobilenet_v2": _tv("mobilenet_v2"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "mnasnet0_5": _tv("mnasnet0_5"),
    "shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "squeezenet1_1": _tv("squeezenet1_1"),
    "regnet_y": _wrapped(
        lambda: regnet.RegNet(
            regnet.BlockParams.from_init_params(6, 16, 8.0, 2.0, 8, se_ratio=0.25),
            num_classes=10,
        )
    ),
    "resnet18": _tv("resnet18"),
    "densenet": _wrapped(lambda: torchvision.models.DenseNet(8, (2, 2, 2), 16, num_classes=10)),
    "googlenet": _wrapped(
        lambda: torchvision.models.GoogLeNet(10, aux_logits=False, init_weights=True)
    ),
    "convnext": _wrapped(
        lambda: torchvision.models.ConvNeXt(
            [convnext.CNBlockConfig(16, 32, 2), convnext.CNBlockConfig(32, None, 2)],
            num_classes=10,
        )
    ),
    "vit": _wrapped(
        lambda: torchvision.models.VisionTransformer(
            SIZE, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        )
    ),
    "swin": _wrapped(
        lambda: swin_transformer.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10)
    ),
}


@pytest.fixture(scope="module")
def fashion() -> tuple[torch.Tensor, torch.Tensor]:
    """256 test images, resized to 3 x SIZE x SIZE, with a little sensor noise, and their
    labels. (Fashion-MNIST's flat black background gives whole regions one value, so a single
    float rounding tie, in PyTorch or in the runtime, flips the codes of a whole region at once;
    a photograph has no such regions.)"""
    images = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:256]
    labels = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")[:256]
    x = torch.from_numpy(images.copy()).float()[:, None] / 255
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear").repeat(1, 3, 1, 1)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    return (x + 0.03 * noise).clamp(0, 1), torch.from_numpy(labels.copy()).long()


@torch.no_grad()
def _fit_to(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    """Module doc: BatchNorm statistics of the images, one variance per layer, and the last
    layer refitted to the labels by ridge regression on its (pooled) input."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()(x)
    for m in norms:
        m.running_var.fill_(float(m.running_var.mean()))
    head = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)][-1]
    seen = []
    hook = head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    model.eval()(x)
    hook.remove()
    features = seen[0].mean((2, 3)) if seen[0].dim() == 4 else seen[0]
    centred = features - features.mean(0)
    target = F.one_hot(labels, 10).float() * 10
    ridge = 0.1 * centred.square().sum() / centred.shape[1]
    eye = torch.eye(centred.shape[1])
    weight = torch.linalg.solve(centred.T @ centred + ridge * eye, centred.T @ target)
    head.weight.copy_(weight.T.reshape(head.weight.shape))
    head.bias.copy_(target.mean(0) - features.mean(0) @ weight)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_exports_int8_with_parity(fashion, name):
    x, labels = fashion
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    _fit_to(model, x, labels)
    prepare(model, QuantConfig(bits="W8A8", method="minmax"))
    calibrate(model, [x[:64]], 64)
    model.eval()
    shape = [3, SIZE, SIZE]
    reference = as_exported(model, shape)
    session = ort_session(to_onnx(model, shape).SerializeToString())
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        expected = reference(x).numpy()
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    error = np.abs(got - expected).max(1) / np.abs(expected).max()
    print(f"{name}: top-1 agreement {agreement:.2%}, median logit error {np.median(error):.1e}")
    assert len(set(expected.argmax(1))) >= 5  # the logits tell the images apart
    assert np.median(error) < 1e-4  # most images: the same logits (any wrong op breaks all)
    assert agreement >= 0.98  # module doc: rounding steps that untrained networks amplify
