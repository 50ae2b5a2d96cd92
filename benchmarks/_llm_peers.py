"""Established post-training weight-only quantizers for LLMs, the tools a user would pick instead
of qatkd, each run with its own defaults at qatkd's bits and group layout: GPTQ through
`gptqmodel` (symmetric, calibrated on qatkd's training blocks) and HQQ through `hqq`
(calibration-free). Each returns a float `transformers` model whose decoder Linear weights are the
peer's dequantized weights (embedding, norms and the tied LM head stay float, as in qatkd's
students), so that qatkd's own evaluation scores it on the same windows.

`make peers` installs them (gptqmodel with `--no-deps`: its declared needs
would replace this project's torch).

Groups follow qatkd's layout along each row's inputs: groups of `group`, the last one holding the
rest (SmolLM2's 576 inputs: 4 x 128 + 64); gptqmodel does the same, hqq is given the full groups
and the rest separately (it would otherwise make groups that wrap across rows).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

PEER_PACKAGES = {"gptq": "gptqmodel", "hqq": "hqq"}


def missing_packages() -> list[str]:
    """The peer packages that are not installed."""
    return [p for p in PEER_PACKAGES.values() if importlib.util.find_spec(p) is None]


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder's Linear layers: the LM head is excluded (tied to the float embedding)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {name: m for name, m in linears.items() if "lm_head" not in name}


def column_groups(columns: int, group: int) -> list[tuple[int, int]]:
    """(start, end) of each group along a row's inputs: full groups, then the rest as one."""
    full = columns // group * group
    bounds = [(a, a + group) for a in range(0, full, group)]
    return bounds + ([(full, columns)] if full < columns else [])


def hqq(hf: nn.Module, bits: int, group: int, calibration: Tensor) -> None:
    """HQQ's half-quadratic fit of scale and zero per group, with the defaults of `hqq`'s
    `hqq_base_quant_config` (optimize on; zero point in float, rounded at 4 bits only;
    `calibration` is not used). Replaces the weights in place."""
    from hqq.core.quantize import Quantizer

    del calibration
    for layer in decoder_linears(hf).values():
        weight = layer.weight.data
        parts = []
        for start, end in column_groups(weight.shape[1], group):
            part = weight[:, start:end].contiguous()
            codes, meta = Quantizer.quantize(
                part,
                nbits=bits,
                group_size=end - start,
                optimize=True,
                round_zero=bits == 4,
                axis=1,
                bitpack=False,
                compute_dtype=torch.float32,
                device=str(weight.device),
            )
            meta["compute_dtype"] = torch.float32
            parts.append(Quantizer.dequantize(codes, meta).reshape(part.shape))
        weight.copy_(torch.cat(parts, dim=1))


def gptq(hf: nn.Module, bits: int, group: int, calibration: Tensor) -> None:
    """GPTQ through gptqmodel's own quantize loop on the `calibration` blocks (token ids
    [N, T]), with its defaults (gptqmodel 7.7: symmetric, damping 0.05, group-aware activation
    reordering, a block's layers quantized in order). gptqmodel loads the model
    from a folder; its fake-quantized weights are taken just before packing, since the packed
    layer's dequantization is wrong for 576 inputs in groups of 128 (checked: perplexity 5e8).
    The tokenizer is read from the folder `hf` was loaded from."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its loader pool refuses 1
    import tempfile

    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from transformers import AutoTokenizer

    weights: dict[str, Tensor] = {}
    original = GPTQProcessor.process

    def keep_weight(self: object, module: nn.Module, *args: object, **kwargs: object) -> object:
        out = original(self, module, *args, **kwargs)
        weights[module.full_name] = module.weight.data.detach().float().clone()
        return out

    config = QuantizeConfig(bits=bits, group_size=group, device="cpu", offload_to_disk=False)
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calibration]
    # gptqmodel writes its logs to ./logs: chdir keeps them in the temporary folder
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        hf.save_pretrained(folder)
        AutoTokenizer.from_pretrained(hf.name_or_path).save_pretrained(folder)
        GPTQProcessor.process = keep_weight
        try:
            model = GPTQModel.load(folder, config, dtype=torch.float32)
            model.quantize(rows, batch_size=8, calibration_sort=None)
        finally:
            GPTQProcessor.process = original
    del model
    layers = decoder_linears(hf)
    if set(weights) != set(layers):
        raise RuntimeError(f"gptqmodel quantized {len(weights)} of the {len(layers)} Linear layers")
    for name, layer in layers.items():
        layer.weight.data.copy_(weights[name].view_as(layer.weight))


PEERS: dict[str, Callable[[nn.Module, int, int, Tensor], None]] = {"gptq": gptq, "hqq": hqq}
"""Each peer quantizes a float model's decoder Linear weights in place: (model, bits, group,
calibration token blocks)."""


def levels_per_group(hf: nn.Module, group: int) -> int:
    """The most distinct values in any weight group: at most 2**bits if the weights really lie
    on the peer's grid (a check that the peer quantized what it was asked to)."""
    worst = 0
    for layer in decoder_linears(hf).values():
        weight = layer.weight.detach()
        for start, end in column_groups(weight.shape[1], group):
            values = weight[:, start:end].sort(dim=1).values
            distinct = 1 + (values[:, 1:] != values[:, :-1]).sum(dim=1)
            worst = max(worst, int(distinct.max()))
    return worst
