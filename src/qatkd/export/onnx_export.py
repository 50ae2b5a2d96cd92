"""ONNX export: a QDQ graph at the trained scales (int8 kernels) or the same network in FP32.

The graph is written node by node from the BN-folded, frozen fx graph (`fold_batchnorm`), so every
number in it is one that training used:

- input `pixels`: float [0, 1], NCHW, batch dynamic; the model's normalisation is inside the graph;
  output `logits` (the network's output, of any rank); the class names are in `metadata_props`
  (`class_names`, a JSON list);
- each quantized tensor (what a conv / linear / global pooling reads, a QuantAct) is quantized
  once, QuantizeLinear -> DequantizeLinear at its trained scale, uint8 at zero point -qmin (0
  for unsigned codes, 2^(b-1) for signed ones, z for a grid with a zero point: one type for
  every input of an add or a concatenation), right after the conv / matmul / add that computes it
  (moved before ReLU, ReLU6, MaxPool and Flatten, which commute with quantization:
  `onnx_graph`); every conv, residual add and global pooling then runs as one integer kernel.
  An 8-bit QuantizeLinear saturates at the 8-bit range only, so a b < 8-bit activation gets an
  integer Clip to its [qmin, qmax] (narrowed further by a ReLU6) between Q and DQ:
  clamp(clamp(round(x / s), 0, 255), 0, 15) is the 4-bit code exactly, and the Clip sits
  outside the DQ -> Conv -> Q group that the runtime fuses; the tensor holding each one's codes
  is listed in `metadata_props` (`activation_codes`);
- each quantized weight is an int8 initializer holding the trained codes -> DequantizeLinear (per
  output channel, axis 0) -> Conv / Gemm (a Linear on [N, L, C] or channels-last input: the
  codes transposed, axis 1 -> MatMul, then an Add of the float bias, which no int8 kernel
  adds); the bias is int32 at scale input_scale * weight_scale -> DequantizeLinear, the
  standard QDQ form that int8 kernels need;
- GELU (exact) is onnxruntime's contrib `Gelu` (`CONTRIB_DOMAIN`), one fused kernel, in float:
  onnxruntime fuses torch.onnx's five-op form only where one tensor feeds its Div and Mul, and it
  gives each reader of a DequantizeLinear its own copy first (five passes over the tensor);
- every op that no handler writes (tanh-approximate GELU, LayerNorm, a SiLU or Hardswish that
  `quant.skip` leaves float, ...) is torch.onnx's own float export of it (`onnx_fallback`), reading
  DequantizeLinear outputs where its inputs are quantized: the fake-quantized model computes it
  in float too.

That int32 bias is the one number the integer kernel rounds which training kept in float (BN's
folded shift). So the exporter puts the grid as fine as int8 allows without changing a single
value (`bias_grid`): weight codes are stored times 2^k (the largest power of two that still fits
int8; k = 4 for 4-bit codes) with the scale divided by 2^k, and b-bit input codes are shifted
left by 8 - b (BitShift, after the Clip; the zero point shifted with them) with the DQ scale
divided by 2^(8-b); codes * scale is the same float bit for bit (powers of
two). The remaining rounding (~1e-4 of an output step at W4A4, ~1e-2 at W8A8) is what
`bias_grid.align_biases` takes into the PyTorch model before a parity check. A conv whose output
is not quantized (no int8 kernel can run it) keeps its float bias, exactly, as does a bias whose
codes, with the largest sum of products an input can add, would overflow the kernel's int32
accumulator (`bias_grid.int32_bias_fits`: an input scale made very fine). With power-of-two
scales every op is exact and the tests demand bitwise equality.

`precision="fp32"` writes the same network with float weights (codes * scale) and no Q/DQ: the
FP32 reference for speed and size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import onnx
from onnx import helper
from torch import nn

from qatkd.errors import QatkdError
from qatkd.export import onnx_ops  # noqa: F401  (registers the op handlers)
from qatkd.export.bias_grid import aligned_copy
from qatkd.export.fold import fold_batchnorm, fold_layer_scales
from qatkd.export.onnx_graph import INPUT_NAME, OPSET, OUTPUT_NAME, GraphBuilder

ACTIVATION_CODES = "activation_codes"
"""`metadata_props` key of an int8 graph: {quantized tensor's hint: [the tensor holding its codes,
their zero point]}."""
TORCH_ONNX_OPS = "torch_onnx_ops"
"""`metadata_props` key: the nodes that no handler wrote, which torch.onnx exported in float
(`onnx_fallback`), in graph order, each as a function or method's name or a module's path;
absent when there are none."""
Precision = Literal["int8", "fp32"]
__all__ = [
    "ACTIVATION_CODES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TORCH_ONNX_OPS",
    "as_exported",
    "check_exportable",
    "class_names_of",
    "int32_bias_layers",
    "save_onnx",
    "to_onnx",
    "torch_onnx_ops_of",
]


def to_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    precision: Precision = "int8",
    metadata: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """The model as an ONNX graph (see module doc); `input_shape` is one image's (C, H, W).
    `metadata` values are stored as strings (non-strings as JSON). Checked by `onnx.checker`."""
    if precision not in ("int8", "fp32"):
        raise QatkdError(f"precision must be int8 or fp32, not '{precision}'")
    gm = fold_batchnorm(model)
    builder = GraphBuilder(
        fold_layer_scales(gm) if precision == "int8" else gm, precision == "int8"
    )
    graph = builder.build(list(input_shape))
    domains = sorted({node.domain for node in graph.node} - {""})  # CONTRIB_DOMAIN's, version 1
    opsets = [("", OPSET), *((domain, 1) for domain in domains)]
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(*o) for o in opsets], producer_name="qatkd"
    )
    proto.ir_version = 8
    metadata = dict(metadata or {})
    if builder.code_tensors:
        metadata[ACTIVATION_CODES] = builder.code_tensors
    if builder.torch_onnx_ops:
        metadata[TORCH_ONNX_OPS] = builder.torch_onnx_ops
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_exportable(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Raise `QatkdError` naming the first op that the int8 export would refuse (a forward
    fx cannot trace, an op torch.onnx cannot write): a dry run of the graph builder on the
    float model, which `prepare`'s callers make before training rather than after it."""
    GraphBuilder(fold_batchnorm(model), quantized=False).build(list(input_shape))


def int32_bias_layers(model: nn.Module, input_shape: Sequence[int]) -> set[str]:
    """Names of the layers whose bias the int8 graph holds as int32 (rounded to the kernel's
    grid): the ones `bias_grid.align_biases` must align, and only those (a float bias is exact,
    and moving it would change what the graph computes)."""
    builder = GraphBuilder(fold_layer_scales(fold_batchnorm(model)), quantized=True)
    builder.build(list(input_shape))
    return {layer for _, _, layer in builder.int_biases.values()}


def as_exported(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """A copy of `model` with the biases the int8 graph holds as int32 moved onto that grid
    (`bias_grid.aligned_copy` on `int32_bias_layers`): the PyTorch model the graph computes, the
    reference for parity."""
    return aligned_copy(model, int32_bias_layers(model, input_shape))


def class_names_of(proto: onnx.ModelProto) -> list[str] | None:
    """The class names stored by `to_onnx(metadata={"class_names": [...]})`."""
    for entry in proto.metadata_props:
        if entry.key == "class_names":
            return json.loads(entry.value)
    return None


def torch_onnx_ops_of(proto: onnx.ModelProto) -> list[str]:
    """What torch.onnx exported in float (`TORCH_ONNX_OPS`), or [] where nothing was."""
    for entry in proto.metadata_props:
        if entry.key == TORCH_ONNX_OPS:
            return json.loads(entry.value)
    return []


def save_onnx(proto: onnx.ModelProto, path: str) -> int:
    """Write `proto`; returns the file size in bytes."""
    onnx.save(proto, path)
    return len(proto.SerializeToString())
