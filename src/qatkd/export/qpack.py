"""The packed low-bit artifact (`model.qpack`): trained integer weights at their real bit-width.

Format, version 2 (all numbers little-endian):

    magic    6 bytes  b"QPACK\\0"
    version  uint32   2 where a layer has offsets (an asymmetric grid), else 1: a file without
                      them is exactly version 1, which older readers read
    length   uint32   byte length of the header
    header   UTF-8 JSON, `length` bytes
    data     the blobs the header points at (offsets count from the first byte of `data`)

The header is `{"format": "qatkd-qpack", "version": 1 or 2, "meta": {...}, "layers": [...],
"activations": [...]}`. `meta` is the checkpoint's model description (model name, class names,
mean/std, quantization config). Each entry of `layers` is one quantized conv / linear after
BatchNorm folding, in graph order:

    name        module path in the model, e.g. "net.layers.0.conv1"
    shape       weight shape, e.g. [16, 16, 3, 3] (out, in / groups, kh, kw) or [out, in]
    bits        the weight bit-width the model was trained with
    qmin, qmax  the integer code range
    width       bits per stored code: 1, 2, 4 or 8, the smallest that holds qmax - qmin + 1
                values (3-bit codes are stored in 4-bit nibbles)
    codes       [offset, nbytes]: codes in C order, each stored as the unsigned value
                (code - qmin) in `width` bits; 8 / width codes per byte, the first code in the
                lowest bits; the last byte is padded with zeros
    scale       [offset, nbytes]: float32 per output channel: weight = code * scale (BN folded);
                with `group_size`, float32 [out, ceil(in / group_size)] in C order:
                weight[o, i] = code[o, i] * scale[o, i // group_size] (the last group
                holds the remainder when group_size does not divide in)
    group_size  inputs per scale of a Linear weight, or null (one scale per output channel)
    offset      version 2, optional: [offset, nbytes], float32 [out, groups] like `scale`, for
                an asymmetric grid: unsigned codes (qmin 0), weight[o, i] = code[o, i] *
                scale[o, g] + offset[o, g], g = i // group_size (GGUF Q4_1's `d * q + m`)
    bias        [offset, nbytes] float32 per output channel, or null
    input       the input activation quantizer: {"scale", "qmin", "qmax", "bits"}, or null
                (float input): x_q = clamp(round(x / scale), qmin, qmax) * scale, round half
                to even
    input_block optional: the input is quantized to int8 at run time, each row in blocks of
                this many inputs (scale = block abs-max / 127; `quant.act_method=dynamic`);
                `input` is then null

`activations` lists the other quantized tensors (residual-add inputs): {"name", "scale", "qmin",
"qmax", "bits"}. `load_qpack` restores the integer codes bit for bit; runtimes without sub-8-bit
kernels expand them to int8 (as `model.int8.onnx` does).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import fx

from qatkd.errors import QatkdError
from qatkd.export.frozen import ActRange, FrozenLayer, act_range
from qatkd.quant import QuantAct

MAGIC = b"QPACK\0"
VERSIONS = (1, 2)
"""The versions this qatkd reads; it writes 2 only where a layer has offsets."""
_WIDTHS = (1, 2, 4, 8)


@dataclass
class PackedLayer:
    """One layer as stored: integer codes (int8 array in the weight's shape) and its floats."""

    name: str
    bits: int
    qmin: int
    qmax: int
    codes: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None
    input: ActRange | None
    group_size: int | None = None
    input_block: int | None = None
    """Set where the input is quantized to int8 per row at run time, in blocks of this many."""
    offset: np.ndarray | None = None
    """An asymmetric grid's offset per group, `[out, groups]` like `scale` (codes unsigned)."""

    def weight(self) -> np.ndarray:
        """The float weight the model computes with: codes times their scales (float32), plus
        the offsets of an asymmetric grid."""
        if self.group_size is None:
            scale = self.scale.reshape(-1, *([1] * (self.codes.ndim - 1)))
            return self.codes.astype(np.float32) * scale
        weight = self.codes.astype(np.float32) * self.per_input(self.scale)
        return weight if self.offset is None else weight + self.per_input(self.offset)

    def per_input(self, values: np.ndarray) -> np.ndarray:
        """Per-group `values` `[out, groups]` repeated over each group's inputs (the last group
        may be narrower)."""
        repeated = np.repeat(values.reshape(self.codes.shape[0], -1), self.group_size, axis=1)
        return repeated[:, : self.codes.shape[1]]


@dataclass
class QPack:
    meta: dict[str, Any]
    layers: list[PackedLayer]
    activations: dict[str, ActRange]


def storage_width(qmin: int, qmax: int) -> int:
    """Bits per stored code: the smallest of 1, 2, 4, 8 that holds qmax - qmin + 1 values."""
    needed = max(1, (qmax - qmin).bit_length())
    for width in _WIDTHS:
        if width >= needed:
            return width
    raise QatkdError(f"codes in [{qmin}, {qmax}] do not fit 8 bits")


def pack_codes(codes: np.ndarray, qmin: int, qmax: int) -> bytes:
    """`codes` (integers in [qmin, qmax]) packed as described in the module doc."""
    values = codes.reshape(-1).astype(np.int16)
    if values.size and (values.min() < qmin or values.max() > qmax):
        raise QatkdError(f"codes outside [{qmin}, {qmax}] cannot be packed")
    width = storage_width(qmin, qmax)
    per_byte = 8 // width
    unsigned = (values - qmin).astype(np.uint8)
    unsigned = np.concatenate([unsigned, np.zeros(-len(unsigned) % per_byte, np.uint8)])
    shifts = (np.arange(per_byte, dtype=np.uint8) * width).astype(np.uint8)
    packed = np.bitwise_or.reduce(unsigned.reshape(-1, per_byte) << shifts, axis=1)
    return packed.astype(np.uint8).tobytes()


def unpack_codes(data: bytes, qmin: int, qmax: int, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `pack_codes`: int8 codes of `shape` (uint8 for unsigned codes)."""
    width = storage_width(qmin, qmax)
    per_byte = 8 // width
    count = int(np.prod(shape))
    packed = np.frombuffer(data, np.uint8)
    shifts = (np.arange(per_byte, dtype=np.uint8) * width).astype(np.uint8)
    mask = np.uint8((1 << width) - 1)
    unsigned = ((packed[:, None] >> shifts) & mask).reshape(-1)[:count]
    codes = unsigned.astype(np.int16) + qmin
    return codes.astype(np.uint8 if qmin >= 0 else np.int8).reshape(shape)


def packed_layer(name: str, layer: FrozenLayer) -> PackedLayer:
    """A frozen layer as stored: its codes, scales (per channel, or `[out, groups]`), offsets
    and bias."""
    qmin, qmax = layer.weight_qrange
    scale = layer.scale if layer.group_size is not None else layer.scale.reshape(-1)
    return PackedLayer(
        name=name,
        bits=layer.weight_bits,
        qmin=qmin,
        qmax=qmax,
        codes=layer.codes.numpy(),
        scale=scale.contiguous().numpy(),
        bias=None if layer.bias is None else layer.bias.detach().float().numpy(),
        input=layer.input_range,
        group_size=layer.group_size,
        input_block=layer.input_block,
        offset=None if layer.offset is None else layer.offset.numpy(),
    )


def packed_layers(gm: fx.GraphModule) -> QPack:
    """The quantized layers and activations of a frozen, BN-folded model (`fold_batchnorm`)."""
    layers, activations = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, FrozenLayer):
            layers.append(packed_layer(node.target, module))
        elif isinstance(module, QuantAct):
            r = act_range(module.quantizer, node.target)
            if r is not None:
                activations[node.target] = r
    return QPack({}, layers, activations)


def save_qpack(gm: fx.GraphModule, meta: dict[str, Any], path: str | Path) -> int:
    """Write the frozen, BN-folded model `gm` (`fold_batchnorm`) as a qpack; returns its size."""
    pack = packed_layers(gm)
    return write_qpack(QPack(meta, pack.layers, pack.activations), path)


def write_qpack(pack: QPack, path: str | Path) -> int:
    """Write `pack` in the format of the module doc; returns the file size."""
    blob = bytearray()

    def put(data: bytes) -> list[int]:
        blob.extend(b"\0" * (-len(blob) % 8))
        start = len(blob)
        blob.extend(data)
        return [start, len(data)]

    layers = [
        {
            "name": layer.name,
            "shape": list(layer.codes.shape),
            "bits": layer.bits,
            "qmin": layer.qmin,
            "qmax": layer.qmax,
            "width": storage_width(layer.qmin, layer.qmax),
            "codes": put(pack_codes(layer.codes, layer.qmin, layer.qmax)),
            "scale": put(_floats(layer.scale)),
            "group_size": layer.group_size,
            **({} if layer.offset is None else {"offset": put(_floats(layer.offset))}),
            "bias": None if layer.bias is None else put(layer.bias.astype("<f4").tobytes()),
            "input": None if layer.input is None else asdict(layer.input),
            **({"input_block": layer.input_block} if layer.input_block else {}),
        }
        for layer in pack.layers
    ]
    activations = [{"name": name, **asdict(r)} for name, r in pack.activations.items()]
    version = 2 if any("offset" in layer for layer in layers) else 1
    header = json.dumps(
        {
            "format": "qatkd-qpack",
            "version": version,
            "meta": pack.meta,
            "layers": layers,
            "activations": activations,
        }
    ).encode()
    data = MAGIC + struct.pack("<II", version, len(header)) + header + bytes(blob)
    Path(path).write_bytes(data)
    return len(data)


def load_qpack(path: str | Path) -> QPack:
    """Read a qpack: the integer codes exactly as trained, with scales, biases and ranges."""
    raw = Path(path).read_bytes()
    if raw[: len(MAGIC)] != MAGIC:
        raise QatkdError(f"{path} is not a qatkd qpack file")
    start = len(MAGIC) + 8

    def truncated() -> QatkdError:
        return QatkdError(f"{path} is truncated ({len(raw)} bytes): export it again")

    if len(raw) < start:
        raise truncated()
    version, length = struct.unpack_from("<II", raw, len(MAGIC))
    if version not in VERSIONS:
        raise QatkdError(f"{path} is qpack version {version}; this qatkd reads versions 1 and 2")
    if len(raw) < start + length:
        raise truncated()
    header = json.loads(raw[start : start + length])
    data = memoryview(raw)[start + length :]

    def get(ref: list[int]) -> bytes:
        if ref[0] + ref[1] > len(data):
            raise truncated()
        return bytes(data[ref[0] : ref[0] + ref[1]])

    layers = []
    for entry in header["layers"]:
        qmin, qmax = entry["qmin"], entry["qmax"]
        group_size = entry.get("group_size")
        scale = np.frombuffer(get(entry["scale"]), "<f4").copy()
        offset = None
        if group_size is not None:
            scale = scale.reshape(entry["shape"][0], -1)
        if "offset" in entry:
            offset = np.frombuffer(get(entry["offset"]), "<f4").reshape(scale.shape).copy()
        layers.append(
            PackedLayer(
                name=entry["name"],
                bits=entry["bits"],
                qmin=qmin,
                qmax=qmax,
                codes=unpack_codes(get(entry["codes"]), qmin, qmax, tuple(entry["shape"])),
                scale=scale,
                bias=None
                if entry["bias"] is None
                else np.frombuffer(get(entry["bias"]), "<f4").copy(),
                input=None if entry["input"] is None else ActRange(**entry["input"]),
                group_size=group_size,
                input_block=entry.get("input_block"),
                offset=offset,
            )
        )
    activations = {a.pop("name"): ActRange(**a) for a in header["activations"]}
    return QPack(header["meta"], layers, activations)


def _floats(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values).astype("<f4").tobytes()
