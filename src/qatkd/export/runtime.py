"""Inference backends for the exported ONNX files, behind one call: `load_runner`.

onnxruntime is the reference (CPU, int8 QLinear kernels); OpenVINO (optional `openvino` package)
reads the same QDQ file and runs it with its own int8 / bf16 kernels (AMX where the CPU has it).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from qatkd.errors import QatkdError
from qatkd.export.onnx_export import INPUT_NAME
from qatkd.machine import int8_dot_products_exact

Backend = Literal["onnxruntime", "openvino"]
Runner = Callable[[np.ndarray], np.ndarray]
INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "QLinearAdd",
    "QLinearGlobalAveragePool",
)
"""Operators that compute on integers; `fused_ops` counts them in onnxruntime's optimized graph."""


PRECISE_INT8 = ("session.x64quantprecision", "1")
"""onnxruntime's switch from u8 x s8 to u8 x u8 int8 kernels. Without VNNI or AMX the u8 x s8
kernels add pairs of products in saturating 16-bit lanes (255 * 127 * 2 > 32767): 8-bit
weights then give wrong codes, up to 56 steps off in the tests. qatkd sets it on such CPUs only
(`int8_dot_products_exact`), where the u8 x s8 kernels are exact it would only cost speed."""


def ort_session(
    model: str | Path | bytes,
    threads: int = 2,
    optimized_path: str | Path | None = None,
    optimize: bool = True,
) -> ort.InferenceSession:
    """A CPU session for an ONNX file (or its bytes) on `threads` threads, with exact int8
    kernels on every CPU (`PRECISE_INT8`) and all graph optimizations (the QDQ -> QLinear
    fusions; `optimize=False` runs the QDQ graph as written, in float); `optimized_path` saves
    the graph onnxruntime actually runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    # Idle threads must sleep: spinning ones would steal the cores of whatever runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not int8_dot_products_exact():
        options.add_session_config_entry(*PRECISE_INT8)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def fused_ops(path: str | Path) -> dict[str, int]:
    """Node counts by operator of the graph onnxruntime runs for the ONNX file at `path`: shows
    whether the convolutions and matmuls became integer kernels (QLinearConv, QGemm, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, optimized_path=optimized)
        graph = onnx.load(str(optimized)).graph
    return dict(collections.Counter(node.op_type for node in graph.node).most_common())


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def load_runner(
    path: str | Path, backend: Backend = "onnxruntime", threads: int = 2, hint: str = "f32"
) -> Runner:
    """A function from a float NCHW batch to logits. `hint` is OpenVINO's inference precision
    ("f32" or "bf16"); a QDQ graph runs int8 whatever the hint."""
    if backend == "onnxruntime":
        session = ort_session(path, threads)
        return lambda x: session.run(None, {INPUT_NAME: x})[0]
    if backend != "openvino":
        raise QatkdError(f"unknown backend '{backend}'; choose onnxruntime or openvino")
    if not openvino_available():
        raise QatkdError("backend openvino needs the openvino package: pip install openvino")
    requests: dict[tuple[int, ...], Any] = {}

    def run(x: np.ndarray) -> np.ndarray:
        if x.shape not in requests:
            compiled = openvino_compiled(path, x.shape, threads, hint)
            requests[x.shape] = compiled.create_infer_request()
        return requests[x.shape].infer({INPUT_NAME: x})[0]

    return run


def openvino_compiled(
    path: str | Path, shape: Sequence[int], threads: int = 2, hint: str = "f32"
) -> Any:
    """The file at `path` compiled by OpenVINO for the CPU, for inputs of `shape`, with
    `load_runner`'s settings: an `openvino.CompiledModel`, whose runtime model names the layers
    each kernel fused. A static shape, because with a dynamic batch the shape arithmetic stays
    in the graph, and OpenVINO's CPU plugin computed a small ViT wrongly then: the class token,
    broadcast to the batch, made it add channel 0's conv bias to every channel of the patch
    embedding (94 % top-1 agreement with onnxruntime; 100 % with a static shape)."""
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": hint,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    core = _openvino_core()
    model = core.read_model(str(path))
    model.reshape({INPUT_NAME: list(shape)})
    return core.compile_model(model, "CPU", config)


@functools.cache
def _openvino_core() -> Any:
    """One `openvino.Core` for the process, never freed: with a Core for each compiled model,
    once two of them were freed, the next signal the process raised killed it (a segfault where
    qatkd's stop handler should have run; openvino 2026.4)."""
    if not openvino_available():
        raise QatkdError("backend openvino needs the openvino package: pip install openvino")
    import openvino as ov

    return ov.Core()
