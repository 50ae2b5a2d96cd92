"""The packed artifact restores the trained integer weights bit for bit."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch
from torch import nn

from qatkd.errors import QatkdError
from qatkd.export import fold_batchnorm, load_qpack, pack_codes, save_qpack, to_onnx, unpack_codes
from qatkd.export.frozen import FrozenLinear
from qatkd.export.qpack import QPack, packed_layer, write_qpack
from qatkd.quant import QuantConfig, QuantConv2d, QuantLinear, calibrate, prepare


@pytest.mark.parametrize(
    ("qmin", "qmax", "bytes_per_16"),
    [(-2, 1, 4), (-4, 3, 8), (-8, 7, 8), (-128, 127, 16), (-3, 3, 8)],
)
def test_pack_round_trip_is_bit_exact(qmin, qmax, bytes_per_16):
    rng = np.random.default_rng(0)
    codes = rng.integers(qmin, qmax + 1, (7, 3, 3, 3)).astype(np.int8)  # 189: a partial byte
    packed = pack_codes(codes, qmin, qmax)
    assert len(packed) == -(-codes.size * bytes_per_16 // 16)
    np.testing.assert_array_equal(unpack_codes(packed, qmin, qmax, codes.shape), codes)


def test_pack_layout_is_low_bits_first():
    assert pack_codes(np.array([-8, 7, 0]), -8, 7) == bytes([0xF0, 0x08])
    assert pack_codes(np.array([-2, -1, 0, 1]), -2, 1) == bytes([0b11100100])


@pytest.mark.parametrize("bits", ["W2A2", "W3A3", "W4A4"])
def test_qpack_file_restores_trained_codes(tiny_model, tmp_path, bits):
    model, _ = tiny_model(bits)
    size = save_qpack(fold_batchnorm(model), {"model_name": "resnet8"}, tmp_path / "m.qpack")
    pack = load_qpack(tmp_path / "m.qpack")
    assert size == (tmp_path / "m.qpack").stat().st_size
    assert pack.meta == {"model_name": "resnet8"}
    layers = {layer.name: layer for layer in pack.layers}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
    assert layers.keys() == quantized.keys()
    for name, m in quantized.items():
        trained = m.weight_quantizer.quantize_int(m.weight).numpy()
        np.testing.assert_array_equal(layers[name].codes, trained, err_msg=name)
        assert layers[name].input.scale == float(m.input_quantizer.scale)
    assert len(pack.activations) == 6
    inner = [layer for layer in pack.layers if layer.bits == int(bits[1])]
    assert inner and all(layer.codes.min() >= layer.qmin for layer in inner)


def test_per_group_linear_freezes_to_the_fake_quantized_weight_and_stays_out_of_onnx():
    """One convert step for per-channel and per-group weights: a grouped Linear (80 inputs in
    groups of 32: the last group holds 16) freezes to exactly the fake-quantized weight and packs
    with one scale per group; the ONNX QDQ exporter, which has no per-group form, refuses it."""
    torch.manual_seed(0)
    model = prepare(
        nn.Sequential(nn.Flatten(), nn.Linear(80, 6)),
        QuantConfig(bits="W4A16", method="minmax", first_last_bits=None, group_size=32),
    )
    calibrate(model, [torch.randn(8, 80)], 8)
    layer = model[1]
    assert isinstance(layer, QuantLinear)
    frozen = FrozenLinear(layer, "1")
    with torch.no_grad():
        assert torch.equal(frozen.weight, layer.weight_quantizer(layer.weight))
    packed = packed_layer("1", frozen)
    assert packed.group_size == 32 and packed.scale.shape == (6, 3)
    np.testing.assert_array_equal(packed.weight(), frozen.weight.numpy())
    with pytest.raises(QatkdError, match=r"group_size=32\) have no per-channel QDQ form"):
        to_onnx(model.eval(), [80])


@pytest.mark.parametrize("bits", [3, 8])
def test_asymmetric_groups_keep_their_codes_scales_and_offsets(tmp_path, bits):
    """Learned (lsq) steps and offsets moved off their start, 80 inputs in groups of 32: the
    unsigned codes (up to 255 at 8 bits), the scales and the offsets survive the qpack, which
    then is version 2, and decode to the fake-quantized weight bit for bit."""
    torch.manual_seed(bits)
    config = QuantConfig(
        bits=f"W{bits}A16", method="lsq", group_size=32, asymmetric=True, first_last_bits=None
    )
    model = prepare(nn.Sequential(nn.Linear(80, 6)), config)
    quantizer = model[0].weight_quantizer
    quantizer.init_from(model[0].weight.detach())
    with torch.no_grad():
        quantizer.step.mul_(1 + 0.1 * torch.rand_like(quantizer.step))
        quantizer.beta.add_(0.01 * torch.randn_like(quantizer.beta))
    frozen = FrozenLinear(model[0], "0")
    with torch.no_grad():
        fake = quantizer(model[0].weight)
    assert torch.equal(frozen.weight, fake) and frozen.codes.dtype == torch.uint8
    write_qpack(QPack({}, [packed_layer("0", frozen)], {}), tmp_path / "m.qpack")
    assert struct.unpack_from("<I", (tmp_path / "m.qpack").read_bytes(), 6) == (2,)
    restored = load_qpack(tmp_path / "m.qpack").layers[0]
    assert restored.offset.shape == restored.scale.shape == (6, 3)
    assert (restored.qmin, restored.qmax) == (0, 2**bits - 1)
    np.testing.assert_array_equal(restored.codes, frozen.codes.numpy())
    np.testing.assert_array_equal(restored.weight(), fake.numpy())


def test_int8_inputs_quantized_at_run_time_pack_their_block_and_stay_out_of_onnx(tmp_path):
    """A Linear with `dynamic` int8 inputs: the qpack keeps the input's block (the genai export
    runs it in the int8 kernels); an exporter with one scale per tensor refuses it, naming why."""
    config = QuantConfig(bits="W4A8", method="minmax", act_method="dynamic", first_last_bits=None)
    model = prepare(nn.Sequential(nn.Flatten(), nn.Linear(96, 6)), config).eval()
    frozen = FrozenLinear(model[1], "1")
    assert frozen.input_block == 32 and frozen.input_range is None  # 96 = 3 x 32
    write_qpack(QPack({}, [packed_layer("1", frozen)], {}), tmp_path / "m.qpack")
    assert load_qpack(tmp_path / "m.qpack").layers[0].input_block == 32
    with pytest.raises(QatkdError, match="quantized per row at run time"):
        to_onnx(model, [96])


def _small_qpack(path) -> bytes:
    """A real qpack of one W4A4 linear layer; its bytes."""
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(8, 4)), QuantConfig(bits="W4A4", first_last_bits=None))
    calibrate(model, [torch.rand(4, 8)], 4)
    save_qpack(fold_batchnorm(model.eval()), {"model_name": "tiny"}, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "content",
    [b"", b"QPACK", b"\x08\x07onnx-protobuf" + bytes(64), b'{"format": "qatkd-qpack"}'],
    ids=["empty", "magic-cut-short", "onnx", "json"],
)
def test_a_foreign_file_is_refused_by_name(tmp_path, content):
    path = tmp_path / "model.qpack"
    path.write_bytes(content)
    with pytest.raises(QatkdError, match=rf"^{re.escape(str(path))} is not a qatkd qpack file$"):
        load_qpack(path)


@pytest.mark.parametrize("version", [0, 3, 2**32 - 1])
def test_a_qpack_of_another_version_is_refused_by_its_number(tmp_path, version):
    path = tmp_path / "model.qpack"
    raw = bytearray(_small_qpack(path))
    assert load_qpack(path).meta == {"model_name": "tiny"}  # the file as written loads
    assert struct.unpack_from("<I", raw, 6) == (1,)  # no offsets: what older readers read
    raw[6:10] = struct.pack("<I", version)
    path.write_bytes(bytes(raw))
    message = f"{path} is qpack version {version}; this qatkd reads versions 1 and 2"
    with pytest.raises(QatkdError, match=f"^{re.escape(message)}$"):
        load_qpack(path)


@pytest.mark.parametrize("keep", ["prefix", "header", "data"])
def test_a_truncated_qpack_is_a_clear_error(tmp_path, keep):
    """A file cut short (a full disk, an interrupted copy) is refused by name, not read into
    wrong weights or a struct / JSON / numpy error."""
    path = tmp_path / "model.qpack"
    raw = _small_qpack(path)
    (length,) = struct.unpack_from("<I", raw, 10)
    cut = {"prefix": 8, "header": 14 + length // 2, "data": len(raw) - 3}[keep]
    path.write_bytes(raw[:cut])
    with pytest.raises(QatkdError, match=rf"^{re.escape(str(path))} is truncated"):
        load_qpack(path)
