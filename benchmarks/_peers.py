"""The post-training quantizers a user would pick instead of qatkd, each run the way its own
documentation shows, on the same float ONNX model and the same calibration images:
onnxruntime's `quantize_static` (QDQ, per-channel weights) and OpenVINO's `nncf.quantize`.
NNCF is the optional `peers` dependency group: make peers.

`quant_pre_process` gives up on some graphs ("Incomplete symbolic shape inference": Swin-T's
shifted windows); it then runs again with `skip_symbolic_shape=True`, the switch its own
documentation offers (ONNX shape inference still runs), as a user would."""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _speed import one_line
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from qatkd.errors import QatkdError
from qatkd.export.bench import Target
from qatkd.export.onnx_export import INPUT_NAME
from qatkd.export.runtime import load_runner

ORT_PEER, NNCF_PEER = "int8 quantize_static", "int8 nncf"
"""The precision labels of the peers' rows (qatkd's own rows say plain `int8`)."""


class _Images(CalibrationDataReader):
    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self.images = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.images, None)
        return None if image is None else {INPUT_NAME: image}


def ort_quantize_static(fp32_onnx: Path, out: Path, images: Sequence[np.ndarray]) -> Path:
    """`quant_pre_process` then `quantize_static`: QDQ, uint8 activations, int8 per-channel
    weights, min-max calibration on `images` (each a batch of one)."""
    fp32_onnx, out = fp32_onnx.resolve(), out.resolve()
    # a failing symbolic shape inference dumps the model into the working directory: the tmp one
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_onnx), str(prepared))
        except Exception as e:  # a bare Exception, or an AssertionError from inside (ViT-B/16)
            if not _in_symbolic_shape_inference(e):
                raise
            quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            _Images(images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return out


def _in_symbolic_shape_inference(error: Exception) -> bool:
    """Whether `quant_pre_process` failed in its symbolic shape inference, which it can skip."""
    frames = traceback.extract_tb(error.__traceback__)
    return "symbolic shape inference" in str(error) or any(
        "symbolic_shape_infer" in frame.filename for frame in frames
    )


def nncf_quantize(fp32_onnx: Path, out: Path, images: Sequence[np.ndarray]) -> Path:
    """`nncf.quantize` of the OpenVINO model read from `fp32_onnx` (its defaults: symmetric
    8-bit, per-channel weights), calibrated on `images`; saved as OpenVINO IR at `out`."""
    if importlib.util.find_spec("nncf") is None:
        raise QatkdError("the NNCF peer needs the nncf package: make peers")
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    quantized = nncf.quantize(model, nncf.Dataset(list(images)), subset_size=len(images))
    ov.save_model(quantized, str(out))
    return out


def peer_targets(
    name: str, fp32_onnx: Path, work: Path, images: Sequence[np.ndarray], threads: int
) -> tuple[list[Target], dict[str, str]]:
    """The runners (with their file sizes) of the peers that quantized the model `name`, and
    for each that failed, the one-line reason: one peer's failure does not hide the other."""
    targets, failures = [], {}
    try:
        ort_file = ort_quantize_static(fp32_onnx, work / "quantize_static.onnx", images)
        runner = load_runner(ort_file, threads=threads)
        targets.append(Target(name, "onnxruntime", ORT_PEER, runner, ort_file.stat().st_size))
    except Exception as e:  # the page reports why
        failures[ORT_PEER] = one_line(e)
    try:
        ov_file = nncf_quantize(fp32_onnx, work / "nncf.xml", images)
        ov_bytes = ov_file.stat().st_size + ov_file.with_suffix(".bin").stat().st_size
        runner = load_runner(ov_file, "openvino", threads)
        targets.append(Target(name, "openvino", NNCF_PEER, runner, ov_bytes))
    except Exception as e:
        failures[NNCF_PEER] = one_line(e)
    return targets, failures
