"""The post-training quantizers a user would pick instead of qatkd, each run the way its own
documentation shows, on the same float ONNX model and the same calibration images:
onnxruntime's `quantize_static` (QDQ, per-channel weights) and OpenVINO's `nncf.quantize`.
NNCF is the optional `peers` dependency group: make peers."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))
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
) -> list[Target]:
    """The two peers' runners for the model `name`, with their file sizes."""
    ort_file = ort_quantize_static(fp32_onnx, work / "quantize_static.onnx", images)
    ov_file = nncf_quantize(fp32_onnx, work / "nncf.xml", images)
    ov_bytes = ov_file.stat().st_size + ov_file.with_suffix(".bin").stat().st_size
    return [
        Target(
            name,
            "onnxruntime",
            ORT_PEER,
            load_runner(ort_file, threads=threads),
            ort_file.stat().st_size,
        ),
        Target(name, "openvino", NNCF_PEER, load_runner(ov_file, "openvino", threads), ov_bytes),
    ]
