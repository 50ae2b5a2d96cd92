"""Deployment: BN folding, ONNX QDQ export (int8 kernels), packed low-bit weights, parity, speed.

`export_checkpoint(run_dir)` writes everything for a trained quantized checkpoint and checks
parity; `bench_run(run_dir)` measures latency and size against FP32 in the same process.
"""

from qatkd.export.bench import Target, measure
from qatkd.export.bias_grid import align_biases, aligned_copy
from qatkd.export.fold import fold_batchnorm
from qatkd.export.frozen import ActRange, freeze
from qatkd.export.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    as_exported,
    class_names_of,
    int32_bias_layers,
    to_onnx,
)
from qatkd.export.qpack import QPack, load_qpack, pack_codes, save_qpack, unpack_codes
from qatkd.export.run import bench_run, export_checkpoint
from qatkd.export.runtime import fused_ops, load_runner
from qatkd.tasks.classification.parity import compare

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ActRange",
    "QPack",
    "Target",
    "align_biases",
    "aligned_copy",
    "as_exported",
    "bench_run",
    "class_names_of",
    "compare",
    "export_checkpoint",
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
    "unpack_codes",
]
