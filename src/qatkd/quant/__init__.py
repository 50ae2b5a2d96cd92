"""Quantization-aware training: quantizers by name, quantized layers, `prepare`, calibration.

Use: `prepare(model, QuantConfig(bits="W4A4"))`, then `calibrate(model, batches)` for PTQ, or train
directly (quantizers initialise themselves on their first training batch).
"""

from qatkd.quant.base import ALLOWED_BITS, GROUP_SIZES, QUANTIZERS, Quantizer
from qatkd.quant.calibrate import calibrate
from qatkd.quant.config import QuantConfig, parse_bits
from qatkd.quant.modules import (
    QuantAct,
    QuantConv2d,
    QuantGlobalAvgPool2d,
    QuantHardswish,
    QuantLinear,
    QuantSiLU,
)
from qatkd.quant.prepare import CONFIG_ATTR, is_quantized, prepare, quant_config_of, quant_summary
from qatkd.quant.quantizers import (
    DoReFaQuantizer,
    DynamicBlockQuantizer,
    FloatQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    PACTQuantizer,
    make_quantizer,
    matmul_nbits_block,
)

__all__ = [
    "ALLOWED_BITS",
    "CONFIG_ATTR",
    "GROUP_SIZES",
    "QUANTIZERS",
    "DoReFaQuantizer",
    "DynamicBlockQuantizer",
    "FloatQuantizer",
    "LSQQuantizer",
    "MinMaxQuantizer",
    "PACTQuantizer",
    "QuantAct",
    "QuantConfig",
    "QuantConv2d",
    "QuantGlobalAvgPool2d",
    "QuantHardswish",
    "QuantLinear",
    "QuantSiLU",
    "Quantizer",
    "calibrate",
    "is_quantized",
    "make_quantizer",
    "matmul_nbits_block",
    "parse_bits",
    "prepare",
    "quant_config_of",
    "quant_summary",
]
