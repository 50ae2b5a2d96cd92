"""Deployment: BN folding, ONNX QDQ export (int8 kernels), packed low-bit weights, parity, speed.

`export_onnx(...)` writes everything for a trained quantized image model and checks parity;
`bench_exported(...)` measures latency and size against FP32 in the same process. Which checkpoint,
data and parity check: the task family decides (`qatkd export` / `qatkd bench` of a run folder
are `qatkd.pipeline.export` / `qatkd.pipeline.bench`).
"""

from qatkd.export.bench import Target, measure
from qatkd.export.bias_grid import align_biases, aligned_copy
from qatkd.export.fold import fold_batchnorm
from qatkd.export.frozen import ActRange, freeze
from qatkd.export.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    TORCH_ONNX_OPS,
    as_exported,
    check_exportable,
    class_names_of,
    int32_bias_layers,
    to_onnx,
    torch_onnx_ops_of,
)
from qatkd.export.qpack import QPack, load_qpack, pack_codes, save_qpack, unpack_codes
from qatkd.export.run import bench_exported, export_onnx
from qatkd.export.runtime import fused_ops, load_runner

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TORCH_ONNX_OPS",
    "ActRange",
    "QPack",
    "Target",
    "align_biases",
    "aligned_copy",
    "as_exported",
    "bench_exported",
    "check_exportable",
    "class_names_of",
    "export_onnx",
    "fold_batchnorm",
    "freeze",
    "fused_ops",
    "int32_bias_layers",
    "load_qpack",
    "load_runner",
    "measure",
    "pack_codes",
    "save_qpack",
    "to_onnx",
    "torch_onnx_ops_of",
    "unpack_codes",
]
