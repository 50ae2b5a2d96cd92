"""The packed artifact restores the trained integer weights bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from qatkd.export import fold_batchnorm, load_qpack, pack_codes, save_qpack, unpack_codes
from qatkd.quant import QuantConv2d, QuantLinear


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
