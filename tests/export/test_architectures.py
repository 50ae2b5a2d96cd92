"""Every torchvision classification family exports to int8 ONNX, its quantizers sit where
onnxruntime's integer kernels need them (`quant.placement`), and the kernels compute what the
fake-quantized PyTorch model computes: its logits within 2 % of their spread on average, and
the same top-1 class on >= 98.5 % of the images; OpenVINO computes the graph as it runs it
(`openvino_reference`: without the roundings it drops) within 0.5 % and on >= 99.5 %, and
stays within 3 % and >= 97 % of PyTorch.

A small member of each family (a few blocks, narrow; 32 x 32 Fashion-MNIST images in 3
channels) is trained for a few dozen steps, its BatchNorm statistics measured on the training
images, then prepared W8A8 and calibrated (PTQ). Trained, because agreement on untrained weights
measures noise: the kernels and PyTorch round a few values one step apart (integer sums against
float sums, `test_onnx_parity`; here 7 of 2 million codes after the first convolution), an
untrained network's logits are nearly tied, and a deep one amplifies each step (a sigmoid gate
reads one input code as up to 15 output codes and moves its whole channel): untrained, the
full-size graphs agree on 62 to 100 % of the images. How far a trained one amplifies depends on
the weights, so on the seed and on the CPU that trained them: over the ten families and seeds
0-2 on an Intel Xeon (AMX), the mean deviation was at most 0.83 % of the logits' spread and at
most 18 of the 2048 test images changed class (EfficientNet, seed 0; SqueezeNet, whose logits
are closest, 5), where an AMD EPYC changed none. A wrong handler moves every logit: its
deviation is of the order of the spread itself.

Each case names the ops that still run in float in the graph onnxruntime optimizes (those that
read a DequantizeLinear): the ops without an integer kernel (LayerNorm; GELU; a BatchNorm after
a concatenation; Hardswish runs as an integer add and product), the adds that have no module
boundary to quantize on (ViT's, Swin's) and Swin's window partition, and nothing else, so a
quantizer that goes missing shows up as a float Conv, MatMul, Add or Mul.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import convnext, efficientnet, mobilenetv3, regnet, swin_transformer

from qatkd.export import INPUT_NAME, as_exported, to_onnx
from qatkd.export.openvino_reference import openvino_reference
from qatkd.export.runtime import load_runner, ort_session
from qatkd.nn import Classifier
from qatkd.quant import QuantConfig, calibrate, prepare
from qatkd.tasks.fashion_mnist import read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE = 32
MEAN, STD = [0.29] * 3, [0.35] * 3
IMAGES = 2048
"""Training images, and test images on which agreement is measured."""
MAX_DEVIATION = 0.02
"""Mean |onnxruntime - PyTorch| logit over the logits' standard deviation (measured <= 0.0083)."""
MIN_AGREEMENT = 0.985
"""Top-1 agreement: at most 30 of the 2048 images change class (measured <= 18)."""
STEPS, BATCH = 40, 64
OPENVINO_MAX_DEVIATION, OPENVINO_MIN_AGREEMENT = 0.005, 0.995
"""The same for OpenVINO against `openvino_reference`, the graph as OpenVINO computes it: it drops
the rounding before each residual sum that it fuses into a convolution, so against PyTorch it
deviated up to 1.23 % (98.2 % agreement); against the reference at most 0.09 % (99.8 %), Intel
Xeon, AMX. A transformation that goes wrong moves the logits far more: ConvNeXt's layer scale as
a float Mul, 56 % agreement; ViT compiled for a dynamic batch (`openvino_compiled`), 94 %."""
OPENVINO_PYTORCH_MAX_DEVIATION, OPENVINO_PYTORCH_MIN_AGREEMENT = 0.03, 0.97
"""OpenVINO against PyTorch too, with room for the roundings it drops (above): the reference is
read from OpenVINO's own compiled model, so it alone would follow OpenVINO anywhere."""


def _small(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: Classifier(make(), MEAN, STD)


def _mobilenet_v3() -> nn.Module:
    blocks, _ = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.5)
    return mobilenetv3.MobileNetV3(blocks[:4], 128, num_classes=10)


def _efficientnet() -> nn.Module:
    stages, _ = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.5, depth_mult=0.5)
    return efficientnet.EfficientNet(stages[:3], 0.2, last_channel=128, num_classes=10)


GELU = {"Gelu"}  # onnxruntime's fused float kernel (`onnx_ops.gelu`)
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], float, set[str]]] = {
    # name: (model, learning rate, the op types that read a DequantizeLinear in the graph
    # onnxruntime runs: the float ops)
    "mobilenet_v2": (
        _small(
            lambda: torchvision.models.MobileNetV2(
                10, 0.5, [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2]]
            )
        ),
        3e-3,
        set(),
    ),
    "mobilenet_v3_small": (_small(_mobilenet_v3), 3e-3, set()),
    "efficientnet_b0": (_small(_efficientnet), 3e-3, set()),
    "shufflenet_v2": (
        _small(lambda: torchvision.models.ShuffleNetV2([2, 2, 2], [16, 32, 64, 128, 256], 10)),
        3e-3,
        set(),
    ),
    "squeezenet1_1": (
        _small(lambda: torchvision.models.SqueezeNet("1_1", num_classes=10)),
        1e-3,
        {"GlobalAveragePool"},  # of the logits, which stay float
    ),
    "regnet_y": (
        _small(
            lambda: regnet.RegNet(
                regnet.BlockParams.from_init_params(3, 16, 8.0, 2.0, 8, se_ratio=0.25),
                num_classes=10,
            )
        ),
        3e-3,
        set(),
    ),
    "densenet": (
        _small(lambda: torchvision.models.DenseNet(8, (2, 2, 2), 16, num_classes=10)),
        3e-3,
        {"BatchNormalization"},  # after a concatenation
    ),
    "convnext": (
        _small(
            lambda: torchvision.models.ConvNeXt(
                [convnext.CNBlockConfig(16, 32, 2), convnext.CNBlockConfig(32, None, 2)],
                num_classes=10,
            )
        ),
        3e-3,
        # the layer scale is folded into the Linear before it (`fold_layer_scales`)
        {"LayerNormalization", *GELU},
    ),
    "vit": (
        _small(
            lambda: torchvision.models.VisionTransformer(
                SIZE, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
            )
        ),
        3e-3,
        # the class token's Concat, the position embedding's and the residual adds (one fused
        # with the LayerNorm after it), GELU; attention's softmax reads a float matmul
        {"Shape", "Concat", "Add", "SkipLayerNormalization", *GELU},
    ),
    "swin": (
        _small(
            lambda: swin_transformer.SwinTransformer(
                [4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10
            )
        ),
        3e-3,
        # the residual adds; the windows' padding, shift and partition read the block's
        # quantized input in float (its Shape, the shift's Concat); the attention is integer
        {"LayerNormalization", "Add", "Shape", "Concat", *GELU},
    ),
}


def _images(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`IMAGES` images of a split, resized to 3 x SIZE x SIZE, with a little sensor noise (a
    flat background would give whole regions one value, so that one rounding tie flips them all
    at once), and their labels."""
    images = read_idx(FASHION / f"{kind}-images-idx3-ubyte.gz")[:IMAGES]
    labels = read_idx(FASHION / f"{kind}-labels-idx1-ubyte.gz")[:IMAGES]
    x = torch.from_numpy(images.copy()).float()[:, None] / 255
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear").repeat(1, 3, 1, 1)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    return (x + 0.03 * noise).clamp(0, 1), torch.from_numpy(labels.copy()).long()


@pytest.fixture(scope="module")
def fashion() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {kind: _images(kind) for kind in ("train", "t10k")}


def _train(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, lr: float) -> None:
    """A few dozen AdamW steps, then BatchNorm statistics of the training images (its running
    averages are far from them after so few steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        batch = torch.randint(0, len(x), (BATCH,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.optim.swa_utils.update_bn([x[:512]], model)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_exports_int8_with_parity(fashion, tmp_path, name):
    (x, labels), (test, test_labels) = fashion["train"], fashion["t10k"]
    make, lr, expected_float = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = make()
    _train(model, x, labels, lr)
    prepare(model, QuantConfig(bits="W8A8", method="minmax"))
    calibrate(model, [x[:128]], 128)
    model.eval()
    shape = [3, SIZE, SIZE]
    proto = to_onnx(model, shape)
    optimized = tmp_path / "optimized.onnx"
    session = ort_session(proto.SerializeToString(), threads=1, optimized_path=optimized)
    got = session.run(None, {INPUT_NAME: test.numpy()})[0]
    with torch.no_grad():
        expected = as_exported(model, shape)(test).numpy()
    onnx.save(proto, tmp_path / "model.onnx")
    in_openvino = load_runner(tmp_path / "model.onnx", "openvino", threads=1)(test.numpy())
    reference = ort_session(openvino_reference(tmp_path / "model.onnx").SerializeToString(), 1)
    as_openvino = reference.run(None, {INPUT_NAME: test.numpy()})[0]
    agreement, deviation = _agreement(got, expected), _deviation(got, expected)
    openvino = _agreement(in_openvino, as_openvino), _deviation(in_openvino, as_openvino)
    openvino_pytorch = _agreement(in_openvino, expected), _deviation(in_openvino, expected)
    accuracy = float((expected.argmax(1) == test_labels.numpy()).mean())
    graph = onnx.load(str(optimized)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    ops = collections.Counter(n.op_type for n in graph.node if dequantized & set(n.input))
    print(
        f"{name}: top-1 agreement {agreement:.2%}, mean deviation {deviation:.2%} of the logits' "
        f"spread (accuracy {accuracy:.1%}), float ops {ops}; OpenVINO against the graph as it "
        f"computes it {openvino[0]:.2%}, {openvino[1]:.2%}; against PyTorch "
        f"{openvino_pytorch[0]:.2%}, {openvino_pytorch[1]:.2%}"
    )
    assert accuracy > 0.3  # trained: the logits tell the images apart
    assert deviation <= MAX_DEVIATION
    assert agreement >= MIN_AGREEMENT
    assert openvino[0] >= OPENVINO_MIN_AGREEMENT and openvino[1] <= OPENVINO_MAX_DEVIATION
    assert openvino_pytorch[0] >= OPENVINO_PYTORCH_MIN_AGREEMENT
    assert openvino_pytorch[1] <= OPENVINO_PYTORCH_MAX_DEVIATION
    assert set(ops) == expected_float


def _agreement(got: np.ndarray, expected: np.ndarray) -> float:
    return float((got.argmax(1) == expected.argmax(1)).mean())


def _deviation(got: np.ndarray, expected: np.ndarray) -> float:
    """Mean |got - expected| over the spread of the expected logits."""
    return float(abs(got - expected).mean() / expected.std())
