"""GGUF: training on Q4_0 / Q8_0 / Q4_1's grid (float16 scales and minimums, blocks of 32), the
blocks written from the student's codes, and SmolLM2's GGUF read back by `gguf` and by
`transformers` bit for bit."""

import os

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from qatkd.config import load_config
from qatkd.export.qpack import PackedLayer
from qatkd.quant import QuantConfig, QuantLinear, prepare
from qatkd.tasks.language.export import packed_linear
from qatkd.tasks.language.gguf_file import GGUF_FILE, blocks, rotary_order

USER_CACHE = os.environ.get("QATKD_CACHE")  # read before the autouse fixture isolates it


def test_format_sets_the_grid_and_refuses_contradictions():
    config = QuantConfig(format="q4_0")
    assert (config.bits, config.group_size, config.first_last_bits) == ("W4A16", 32, None)
    assert QuantConfig(format="q8_0").bits == "W8A16"
    for wrong in ({"bits": "W3A16"}, {"group_size": 64}, {"method": "pact"}):
        with pytest.raises(ValidationError, match="format q4_0 is blocks of 32 4-bit weights"):
            QuantConfig(format="q4_0", **wrong)


def test_a_format_trains_on_float16_scales_with_a_gradient():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 8))
    prepare(layer, QuantConfig(format="q4_0", method="lsq"))
    quantizer = layer[0].weight_quantizer
    quantizer.init_from(layer[0].weight.detach())
    quantizer.step.data.mul_(1 + 1e-3)  # off the float16 grid
    scale = quantizer.scale
    assert torch.equal(scale, scale.half().float()) and scale.shape == (8, 64)
    weight = quantizer(layer[0].weight)
    assert torch.equal(weight, quantizer.quantize_int(layer[0].weight) * scale)
    weight.sum().backward()
    assert quantizer.step.grad is not None and quantizer.step.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_blocks_dequantize_to_the_codes_times_their_float16_scales(bits):
    import gguf

    rng = np.random.default_rng(0)
    low, high = (-8, 7) if bits == 4 else (-128, 127)
    codes = rng.integers(low, high + 1, size=(4, 64)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-1, size=(4, 2)).astype(np.float16).astype(np.float32)
    layer = PackedLayer("x", bits, low, high, codes, scale, None, None, 32)
    qtype = gguf.GGMLQuantizationType.Q4_0 if bits == 4 else gguf.GGMLQuantizationType.Q8_0
    weight = gguf.quants.dequantize(blocks(layer, None), qtype)
    assert np.array_equal(weight.reshape(4, 64), layer.weight())


@pytest.mark.parametrize("heads", [None, 2])
def test_q4_1_blocks_decode_to_the_learned_asymmetric_weights(heads):
    """A Q4_1 student's learned steps and offsets, moved off the float16 grid: the blocks
    (d, m, 32 unsigned codes) dequantize in `gguf` to the fake-quantized weight bit for bit, in
    llama.cpp's rotary row order for q and k."""
    import gguf

    torch.manual_seed(0)
    model = prepare(
        torch.nn.Sequential(torch.nn.Linear(64, 8)), QuantConfig(format="q4_1", method="lsq")
    )
    quantizer = model[0].weight_quantizer
    quantizer.init_from(model[0].weight.detach())
    with torch.no_grad():
        quantizer.step.mul_(1 + 0.1 * torch.rand_like(quantizer.step))
        quantizer.beta.sub_(0.01 * torch.rand_like(quantizer.beta))
        fake = quantizer(model[0].weight).numpy()
    data = blocks(packed_linear("0", model[0]), heads)
    weight = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1).reshape(8, 64)
    assert data.shape == (8, 2 * 20)  # two blocks of 2 + 2 + 16 bytes a row
    assert np.array_equal(weight, fake if heads is None else rotary_order(fake, heads))


def test_rotary_order_interleaves_each_heads_halves():
    rows = np.arange(8)[:, None]  # 2 heads of 4 rows: halves (0, 1 | 2, 3) interleaved
    assert rotary_order(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.slow  # ~25 s on 2 cores; `make test` runs it all the same
def test_smollm2_student_round_trips_through_gguf_and_transformers(tmp_path, monkeypatch):
    """A Q4_1 RTN student of the real SmolLM2 (the GGUF source): `transformers` loads the file
    (dequantizing and un-permuting q and k itself) to the student's fake-quantized weights.
    One format: the others' blocks differ only in what `blocks` writes, checked above through
    the same `gguf.quants.dequantize` that `transformers` calls."""
    fmt = "q4_1"
    from transformers import AutoModelForCausalLM

    from qatkd.tasks.language.export import export_language
    from qatkd.tasks.language.family import Loaded, build_student, language_quant
    from qatkd.tasks.language.source import smollm2_gguf

    if USER_CACHE is None:
        monkeypatch.delenv("QATKD_CACHE")
    else:
        monkeypatch.setenv("QATKD_CACHE", USER_CACHE)
    source = smollm2_gguf()  # make setup installs the wheel: without it this test fails
    config = load_config(overrides=["task=language", f"quant.format={fmt}", "data.test_limit=1"])
    config = config.model_copy(update={"quant": language_quant(config.quant)})
    loaded = Loaded(config, training=False)
    student = build_student(config, loaded).eval()
    result = export_language(
        {"meta": {}}, student, loaded.hf, loaded.tokenizer, tmp_path, False, fmt, source
    )
    assert result["gguf"]["written"] and GGUF_FILE in result["files"]
    read = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=GGUF_FILE, dtype=torch.float32)
    with torch.no_grad():
        for name, module in student.named_modules():
            if isinstance(module, QuantLinear):
                expected = module.weight_quantizer(module.weight)
                got = read.get_submodule(name.removeprefix("hf.")).weight
                assert torch.equal(got, expected), name
        assert torch.equal(read.model.norm.weight, student.hf.model.norm.weight)
