"""Export of a weight-quantized language model: packed low-bit weights, and a `transformers` model
rebuilt from them.

Written into the output folder:

- `model.qpack`: every quantized Linear's integer codes at their bit-width with one float32 scale
  per group (the packed format of `qatkd.export.qpack`, `group_size` set);
- `float_tensors.safetensors`: the tensors that stay float (embedding, norms; a tied LM head is
  the embedding and is stored once), float32;
- `config.json` and the tokenizer files of the model;
- `hf/`: a plain Hugging Face folder whose Linear weights are the dequantized codes (codes *
  scale, bit for bit the fake-quantized weights), rebuilt *from the two files above* by
  `load_packed_lm`, so any `transformers` script reproduces a weight-only student's perplexity
  (a student with int8 inputs, `quant.act_method=dynamic`, computes float activations there);
- `genai/`: with `hf/`, an onnxruntime-genai folder whose `MatMulNBits` kernels hold the codes
  (`qatkd.tasks.language.genai`);
- `model.gguf`: for a student trained on a GGUF grid (`quant.format`) whose teacher came from a
  GGUF file, llama.cpp's format with the codes as Q4_0 / Q8_0 / Q4_1 blocks
  (`qatkd.tasks.language.gguf_file`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatkd.checkpoint import file_sha256
from qatkd.export.frozen import FrozenLinear
from qatkd.export.qpack import PackedLayer, QPack, load_qpack, packed_layer, write_qpack
from qatkd.quant import QuantLinear
from qatkd.quant.quantizers import FloatQuantizer
from qatkd.tasks.language.genai import GENAI_FOLDER, build_genai
from qatkd.tasks.language.gguf_file import GGUF_FILE, write_gguf

QPACK, FLOAT_TENSORS, HF_FOLDER = "model.qpack", "float_tensors.safetensors", "hf"
HF_PREFIX = "hf."


def packed_linear(name: str, layer: QuantLinear) -> PackedLayer:
    """A fake-quantized Linear as stored: its integer codes and per-group (or per-row) scales,
    frozen by the exporters' one convert step (`FrozenLinear`)."""
    return packed_layer(name.removeprefix(HF_PREFIX), FrozenLinear(layer, name))


def export_language(
    state: dict[str, Any],
    student: nn.Module,
    pretrained: nn.Module,
    tokenizer: Any,
    out: Path,
    transformers_folder: bool = True,
    gguf_format: str | None = None,
    gguf_source: Path | None = None,
    genai: bool = True,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Write the files of the module doc for the `student` of a language checkpoint `state` and
    its `pretrained` source model and tokenizer (`hf/` only with `transformers_folder`, `genai/`
    only with `genai` too; `model.gguf` for a `gguf_format` student, from the `gguf_source` file
    the teacher came from); returns their sizes, the sizes of the model in fp32 and fp16, and
    how the genai folder and the GGUF file store the codes; with `checkpoint`, the file `state`
    was read from, export.json records its path and content hash."""
    from safetensors.torch import save_file  # the `llm` extra

    out.mkdir(parents=True, exist_ok=True)
    layers = [  # a 16-bit (float) weight stays with the float tensors
        packed_linear(name, m)
        for name, m in student.named_modules()
        if isinstance(m, QuantLinear) and not isinstance(m.weight_quantizer, FloatQuantizer)
    ]
    qpack_bytes = write_qpack(QPack(state["meta"], layers, {}), out / QPACK)
    quantized = {f"{layer.name}.weight" for layer in layers}
    float_tensors, seen = {}, set()
    for key, tensor in student.hf.state_dict().items():
        if key in quantized or "_quantizer." in key or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        float_tensors[key] = tensor.detach().float().contiguous()
    save_file(float_tensors, str(out / FLOAT_TENSORS))
    pretrained.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    genai_build = None
    if transformers_folder:
        rebuilt, tokenizer = load_packed_lm(out)
        rebuilt.save_pretrained(out / HF_FOLDER)
        tokenizer.save_pretrained(out / HF_FOLDER)
        if genai:
            genai_build = build_genai(out / HF_FOLDER, layers, out / GENAI_FOLDER)
    params = sum(p.numel() for p in pretrained.parameters())
    sizes = {
        "qpack": qpack_bytes,
        "float_tensors": (out / FLOAT_TENSORS).stat().st_size,
        "fp32_model": params * 4,
        "fp16_model": params * 2,
    }
    sizes["packed_total"] = sizes["qpack"] + sizes["float_tensors"]
    files = [QPACK, FLOAT_TENSORS, *([HF_FOLDER] if transformers_folder else [])]
    result: dict[str, Any] = {"files": files, "bytes": sizes}
    if checkpoint is not None:
        result |= {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint)}
    if genai_build is not None:
        files.append(GENAI_FOLDER)
        sizes["genai"] = genai_build.pop("bytes")
        result["genai"] = genai_build
    if gguf_format is not None:
        if gguf_source is None:
            result["gguf"] = {
                "written": False,
                "why": "the model did not come from a GGUF file, whose metadata a GGUF needs",
            }
        else:
            floats = {k: v.numpy() for k, v in float_tensors.items()}
            gguf = write_gguf(gguf_source, layers, floats, gguf_format, out / GGUF_FILE)
            sizes["gguf"] = gguf.pop("bytes")
            files.append(GGUF_FILE)
            result["gguf"] = {"written": True, **gguf}
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_packed_lm(folder: Path) -> tuple[nn.Module, Any]:
    """A `transformers` causal LM rebuilt from an export folder: float tensors from the
    safetensors file, each quantized Linear's weight = codes * scale from the qpack (a quantized
    LM head is untied from the float embedding)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    packed = load_qpack(folder / QPACK)
    if any(layer.name == "lm_head" for layer in packed.layers):
        config.tie_word_embeddings = False  # a quantized head no longer equals the embedding
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, _ = model.load_state_dict(load_file(str(folder / FLOAT_TENSORS)), strict=False)
    with torch.no_grad():
        for layer in packed.layers:
            model.get_submodule(layer.name).weight.copy_(torch.from_numpy(layer.weight()))
    model.tie_weights()
    restored = {f"{layer.name}.weight" for layer in packed.layers}
    untied = [k for k in missing if k not in restored and k != "lm_head.weight"]
    if untied:
        raise ValueError(f"{folder}: no values for {untied[:3]}")
    return model.eval(), AutoTokenizer.from_pretrained(folder)
