"""QuantConfig: shorthands, overrides, and one clear message per bad value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qatkd.errors import QatkdError
from qatkd.quant import QuantConfig
from qatkd.quant.config import saved_quant


def test_defaults_and_shorthands():
    config = QuantConfig()
    assert (config.weight_bits, config.act_bits) == (4, 4)
    assert (config.weight_method_name, config.act_method_name) == ("lsq", "lsq")
    assert config.first_last_bits == 8
    config = QuantConfig(bits="w4a16", method="minmax", act_method="pact", skip=["fc"])
    assert config.bits == "W4A16"
    assert (config.weight_bits, config.act_bits) == (4, 16)
    assert (config.weight_method_name, config.act_method_name) == ("minmax", "pact")


def test_dump_round_trip():
    config = QuantConfig(
        bits="W2A2", method="lsq", first_last_bits=None, skip=["fc"], group_size=64
    )
    assert QuantConfig(**config.model_dump()) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": "W5A4"}, "bits 'W5A4': weight bit-width 5 is not supported; choose one of: 2, 3"),
        ({"bits": "W4A1"}, "bits 'W4A1': activation bit-width 1 is not supported"),
        ({"bits": "4bit"}, "bits '4bit' is not of the form W<bits>A<bits>"),
        ({"method": "lsqq"}, "unknown quantizer 'lsqq' (did you mean 'lsq'?); choose one of: "),
        ({"act_method": "packt"}, "unknown quantizer 'packt'"),
        ({"first_last_bits": 6}, "bit-width 6 is not supported"),
        ({"group_size": 16}, "group_size 16 is not supported; choose one of: 32, 64, 128"),
        ({"bitz": "W4A4"}, "Extra inputs are not permitted"),
        ({"bits": "W4A4", "act_method": "dynamic"}, "act_method=dynamic quantizes activations to"),
        ({"method": "dynamic", "bits": "W4A8"}, "dynamic quantizes activations only"),
        ({"act_grid": "asym"}, "Input should be 'auto', 'symmetric' or 'zero_point'"),
        (
            {"act_grid": "zero_point", "act_method": "pact"},
            "act_grid=zero_point takes the minmax or lsq activation method, not pact",
        ),
    ],
)
def test_errors_name_the_value_and_the_choices(kwargs, message):
    with pytest.raises(ValidationError) as info:
        QuantConfig(**kwargs)
    assert message in str(info.value)


def test_q4_1_is_gguf_s_asymmetric_grid():
    config = QuantConfig(format="q4_1")
    assert (config.bits, config.group_size, config.asymmetric) == ("W4A16", 32, True)
    assert not QuantConfig(format="q4_0").asymmetric
    with pytest.raises(ValidationError, match="format q4_1 is blocks of 32 4-bit weights"):
        QuantConfig(format="q4_1", asymmetric=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"asymmetric": True},
            "it needs quant.group_size and the minmax or lsq method (got group_size=None, lsq)",
        ),
        ({"asymmetric": True, "group_size": 32, "method": "pact"}, "(got group_size=32, pact)"),
        (
            {"init": "rtn", "method": "pact"},
            "quant.init=rtn takes the minmax or lsq weight method, not pact",
        ),
        (
            {"init": "gptq", "method": "minmax"},
            "quant.init=gptq takes the lsq weight method, not minmax: minmax recomputes its grid "
            "from the weights at every step; use quant.method=lsq (learned scales, started at the "
            "same grid)",
        ),
    ],
)
def test_grids_that_do_not_fit_the_method_or_groups_are_refused(kwargs, message):
    """`check_grid` runs on the final values (a family's defaults may set the method or the
    groups after validation)."""
    config = QuantConfig(**kwargs)
    with pytest.raises(QatkdError) as info:
        config.check_grid()
    assert str(info.value).endswith(message)
    assert QuantConfig(group_size=32, asymmetric=True, init="gptq").check_grid().asymmetric


@pytest.mark.parametrize(
    ("act_grid", "method", "zero_point_at"),
    [
        ("auto", "lsq", {8}),
        ("auto", "minmax", {8}),
        ("auto", "pact", set()),
        ("symmetric", "lsq", set()),
        ("zero_point", "minmax", {2, 4, 8}),
    ],
)
def test_act_grid_gives_a_zero_point_to_the_bit_widths_it_names(act_grid, method, zero_point_at):
    """auto: the int8 runtimes' own grid at 8 bits, the paper's symmetric grids below."""
    config = QuantConfig(act_grid=act_grid, act_method=method)
    assert {b for b in (2, 4, 8) if config.act_zero_point(b)} == zero_point_at


def test_a_quant_section_saved_before_act_grid_is_read_as_symmetric():
    saved = QuantConfig().model_dump(mode="json")
    del saved["act_grid"]
    assert QuantConfig(**saved_quant(saved)).act_grid == "symmetric"
    assert QuantConfig(**saved_quant({**saved, "act_grid": "zero_point"})).act_grid == "zero_point"
