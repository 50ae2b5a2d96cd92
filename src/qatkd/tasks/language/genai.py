"""An onnxruntime-genai folder for a weight-quantized language student, whose low-bit weights are
the student's own integer codes and scales in `MatMulNBits` kernels, not a re-quantization.

onnxruntime-genai's model builder (what `python -m onnxruntime_genai.models.builder ... -p fp32`
runs, called in this process: a second interpreter would spend seconds importing torch) writes
the float graph with its KV cache, `genai_config.json` and the tokenizer from the export's `hf/`
folder (whose weights are the dequantized codes); each quantized `MatMul` of that graph is then
replaced by a `MatMulNBits` holding the codes. The builder's weights are checked against the codes
first: a graph that does not hold exactly the student's weights is refused, not patched.

The mapping keeps every trained value:
- codes are stored offset by the kernel's default zero point 2^(bits-1) (no zero-point input):
  signed codes in [-2^(b-1), 2^(b-1) - 1] dequantize to code * scale, as in training;
- an asymmetric grid's unsigned codes are stored as they are, with a float zero point per block
  (the kernel's `zero_points` input in the scales' type), -offset / scale: the kernel's
  (code - zero point) * scale is the trained code * scale + offset to float rounding;
- W2 and W4 are 2- and 4-bit blocks; W3 codes are stored in 4-bit blocks (the kernels have no
  3-bit form), W5-W8 in 8-bit blocks;
- a block is the largest power of two in [16, 256] that divides the group size, each group's
  scale repeated over its blocks; a narrower last group (576 = 4 x 128 + 64) is the last block,
  padded with zero-point codes that the kernel never multiplies with an input;
- a layer trained on int8 inputs (`quant.act_method=dynamic`) runs the int8 kernels
  (accuracy_level 4), whose input quantization training simulated; the others multiply float
  inputs (accuracy_level 0).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from qatkd.errors import QatkdError, first_line
from qatkd.export.qpack import PackedLayer
from qatkd.quant.quantizers import matmul_nbits_block

if TYPE_CHECKING:
    from onnx import NodeProto, TensorProto

    from qatkd.tasks.language.task import LanguageTask

GENAI_FOLDER, GENAI_MODEL = "genai", "model.onnx"
FLOAT_INPUT, INT8_INPUT = 0, 4
"""MatMulNBits' `accuracy_level`: 0 multiplies the float input with the dequantized weights; 4
quantizes the input to int8 per row in the kernel's blocks (`DynamicBlockQuantizer`) and runs
integer dot products, the fast path, used where the student was trained on that input."""
_BUILDER_MATMUL = re.compile(r"model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMul\.weight")
_PACKED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


def storage_bits(bits: int) -> int:
    """The `MatMulNBits` width that holds `bits`-bit codes unchanged."""
    for width in (2, 4, 8):
        if bits <= width:
            return width
    raise QatkdError(f"MatMulNBits holds at most 8-bit weights; the student has {bits} bits")


def pack_codes(codes: np.ndarray, bits: int, block: int, signed: bool = True) -> np.ndarray:
    """Codes `[N, K]` as `MatMulNBits`' B input `[N, ceil(K / block), block * bits / 8]`: signed
    ones offset by the default zero point, padded to whole blocks with it (unsigned ones as they
    are, padded with 0), the first code of a byte in its low bits."""
    zero = 2 ** (bits - 1) if signed else 0
    rows, columns = codes.shape
    blocks = -(-columns // block)
    stored = np.full((rows, blocks * block), zero, dtype=np.uint8)
    stored[:, :columns] = codes.astype(np.int16) + zero
    per_byte = 8 // bits
    parts = stored.reshape(rows, -1, per_byte)
    packed = np.zeros(parts.shape[:2], dtype=np.uint8)
    for i in range(per_byte):
        packed |= parts[:, :, i] << (bits * i)
    return packed.reshape(rows, blocks, block * bits // 8)


def per_block(layer: PackedLayer, values: np.ndarray, block: int) -> np.ndarray:
    """One value per block `[N * blocks]`: each group's value (scale, offset) repeated over its
    blocks."""
    rows, columns = layer.codes.shape
    group = layer.group_size or columns  # per row: one group of the whole row
    grouped = values.reshape(rows, -1).astype(np.float32)
    repeated = np.repeat(grouped, group // block, axis=1)[:, : -(-columns // block)]
    return np.ascontiguousarray(repeated).reshape(-1)


def student_layers(initializer: str, layers: dict[str, PackedLayer]) -> list[PackedLayer] | None:
    """The student's layers behind one of the builder's MatMul weights (q, k and v for its
    packed `qkv_proj`), or None for a MatMul that is not a quantized layer."""
    if initializer == "lm_head.MatMul.weight":
        return [layers["lm_head"]] if "lm_head" in layers else None
    match = _BUILDER_MATMUL.fullmatch(initializer)
    if match is None:
        return None
    index, block, projection = match.groups()
    parent = f"model.layers.{index}.{'self_attn' if block == 'attn' else 'mlp'}"
    names = [f"{parent}.{p}" for p in _PACKED_PROJECTIONS.get(projection, (projection,))]
    if not all(name in layers for name in names):
        return None
    return [layers[name] for name in names]


def matmul_nbits(
    node_name: str, inputs: list[str], outputs: list[str], parts: list[PackedLayer]
) -> tuple[NodeProto, list[TensorProto]]:
    """The `MatMulNBits` node and initializers for the student's `parts` (one, or q/k/v packed
    along the output rows)."""
    from onnx import helper, numpy_helper

    bits = {p.bits for p in parts}
    groups = {p.group_size or p.codes.shape[1] for p in parts}
    input_blocks = {p.input_block for p in parts}
    asymmetric = {p.offset is not None for p in parts}
    if len(bits) != 1 or len(groups) != 1 or len(input_blocks) != 1 or len(asymmetric) != 1:
        raise QatkdError(
            f"{node_name}: the packed projections differ in bits, group size, offsets or input "
            "quantization"
        )
    width, block, input_block = (
        storage_bits(bits.pop()),
        matmul_nbits_block(groups.pop()),
        input_blocks.pop(),
    )
    if input_block not in (None, block):
        raise QatkdError(
            f"{node_name}: the input was trained in int8 blocks of {input_block}, the kernel's "
            f"blocks are {block}"
        )
    codes = np.concatenate([p.codes for p in parts])
    scales = np.concatenate([per_block(p, p.scale, block) for p in parts])
    rows, columns = codes.shape
    weight_name, scale_name = f"{node_name}.qweight", f"{node_name}.scales"
    zero_points = []
    if asymmetric.pop():  # the float zero point of each block: -offset / scale
        offsets = np.concatenate(
            [per_block(p, p.offset, block) for p in parts if p.offset is not None]
        )
        zeros = -offsets / scales
        zero_points = [numpy_helper.from_array(zeros, f"{node_name}.zero_points")]
    node = helper.make_node(
        "MatMulNBits",
        [inputs[0], weight_name, scale_name, *(z.name for z in zero_points)],
        outputs,
        name=node_name,
        domain="com.microsoft",
        K=columns,
        N=rows,
        bits=width,
        block_size=block,
        accuracy_level=FLOAT_INPUT if input_block is None else INT8_INPUT,
    )
    signed = not zero_points
    return node, [
        numpy_helper.from_array(pack_codes(codes, width, block, signed), weight_name),
        numpy_helper.from_array(scales, scale_name),
        *zero_points,
    ]


def replace_matmuls(model_path: Path, layers: list[PackedLayer]) -> int:
    """Replace the builder's MatMuls of the student's quantized layers in `model_path` by
    `MatMulNBits` of their codes, in place; returns how many layers. Each replaced weight must
    equal the dequantized codes bit for bit, and every quantized layer must be found."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    by_name = {layer.name: layer for layer in layers}
    initializers = {t.name: t for t in model.graph.initializer}
    replaced_weights, students = set(), set()
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        parts = student_layers(node.input[1], by_name)
        if parts is None:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        expected = np.concatenate([p.weight() for p in parts]).T
        if weight.shape != expected.shape or not np.array_equal(weight, expected):
            raise QatkdError(
                f"the builder's {node.input[1]} is not the student's dequantized weight; "
                "the genai folder would not run the trained codes"
            )
        replaced_weights.add(node.input[1])
        students.update(p.name for p in parts)
        nbits, tensors = matmul_nbits(node.name, list(node.input), list(node.output), parts)
        node.CopyFrom(nbits)
        model.graph.initializer.extend(tensors)
    missing = sorted(set(by_name) - students)
    if missing:
        raise QatkdError(
            f"{model_path}: no MatMul of the builder's graph holds {missing[0]} "
            f"({len(missing)} quantized layers missing); this architecture is not supported"
        )
    kept = [t for t in model.graph.initializer if t.name not in replaced_weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(model_path), save_as_external_data=True, location=data.name)
    return len(students)


def build_genai(hf_folder: Path, layers: list[PackedLayer], out: Path) -> dict[str, Any]:
    """Write `out` (the module doc) from the export's `hf/` folder and the student's packed
    layers; returns the number of layers in MatMulNBits, the kernel width that stores each
    trained bit-width, the block sizes, how many layers run the int8 kernels and the folder's
    size in bytes."""
    try:
        import onnxruntime_genai  # noqa: F401  (the `llm` extra)
    except ImportError as e:
        raise QatkdError(
            "the genai folder needs onnxruntime-genai and onnx-ir: pip install -e '.[llm]'"
        ) from e
    from onnxruntime_genai.models import builder

    arguments = (None, str(hf_folder), str(out), "fp32", "cpu")
    said = io.StringIO()  # its log and progress bars: the export reports its own progress
    with (
        tempfile.TemporaryDirectory() as cache,
        contextlib.redirect_stdout(said),
        contextlib.redirect_stderr(said),
    ):
        try:  # its command line's two calls, in this process: no second start of torch
            options = builder.parse_extra_options(*arguments, cache, [])
            builder.create_model(*arguments, cache, **options)
        except Exception as e:
            failed = f"onnxruntime-genai's model builder failed on {hf_folder}: {first_line(e)}"
            raise QatkdError(failed) from e
    replaced = replace_matmuls(out / GENAI_MODEL, layers)
    return {
        "layers_in_matmul_nbits": replaced,
        "storage_bits": {str(b): storage_bits(b) for b in sorted({x.bits for x in layers})},
        "block_size": sorted(
            {matmul_nbits_block(x.group_size or x.codes.shape[1]) for x in layers}
        ),
        "int8_input_layers": sum(x.input_block is not None for x in layers),
        "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    }


class GenaiLogits(nn.Module):
    """The genai folder's graph as a causal LM for `LanguageTask.evaluate`: each window's logits
    from onnxruntime with an empty KV cache, so perplexity is measured through the exported
    runtime with the protocol of training."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.session = ort.InferenceSession(str(folder / decoder["filename"]))
        self.kv_shape = (decoder["num_key_value_heads"], 0, decoder["head_size"])
        self.past = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]

    def forward(self, ids: Tensor) -> Tensor:
        array = ids.cpu().numpy().astype(np.int64)
        feeds = {"input_ids": array, "attention_mask": np.ones_like(array)}
        feeds |= {name: np.zeros((len(array), *self.kv_shape), np.float32) for name in self.past}
        return torch.from_numpy(self.session.run(["logits"], feeds)[0])


def genai_parity(
    student: nn.Module, folder: Path, task: LanguageTask, windows: Dataset, limit: int | None
) -> dict[str, Any]:
    """Perplexity and teacher agreement of the student in PyTorch and through the genai folder
    on the first `limit` evaluation windows (all without one), and the perplexities' relative
    difference in %."""
    count = len(windows) if limit is None else min(limit, len(windows))  # type: ignore[arg-type]
    loader = DataLoader(Subset(windows, range(count)), batch_size=task.eval_batch_size)
    with torch.no_grad():
        pytorch = task.evaluate(student, loader)
        genai = task.evaluate(GenaiLogits(folder), loader)
    return {
        "windows": count,
        "pytorch": pytorch,
        "genai": genai,
        "ppl_relative_diff_percent": 100 * (genai["ppl"] / pytorch["ppl"] - 1),
    }
