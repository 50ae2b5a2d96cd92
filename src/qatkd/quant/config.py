"""`QuantConfig`: the `quant:` section of a run's configuration, validated at construction."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qatkd.errors import QatkdError

# The methods register themselves on import; a config must see all of them.
from qatkd.quant import quantizers as _quantizers  # noqa: F401
from qatkd.quant.base import QUANTIZERS, check_bits, check_group_size

T = TypeVar("T")
_BITS = re.compile(r"W(\d+)A(\d+)")
FORMATS = {"q4_0": 4, "q8_0": 8, "q4_1": 4}
"""GGUF block formats (`quant.format`): blocks of 32 weights of these bits, one float16 scale
each; Q4_0 / Q8_0 with signed codes, Q4_1 (`ASYMMETRIC_FORMATS`) with unsigned codes and a
float16 minimum (the offset of an asymmetric grid)."""
ASYMMETRIC_FORMATS = {"q4_1"}
FORMAT_GROUP = 32
INIT_METHODS = {"rtn": ("minmax", "lsq"), "gptq": ("lsq",)}
"""The weight methods each `quant.init` takes: GPTQ picks codes on a stored grid, which minmax
would recompute from the weights at the next step."""

BEFORE_KEYS: dict[str, Any] = {"act_grid": "symmetric"}
"""Quant keys added after checkpoints were saved, with what qatkd did before each existed:
symmetric activation grids were all there were before `act_grid`."""


def _value_error(check: Callable[[T], object], value: T) -> T:
    """Run a check that raises `QatkdError` and re-raise as `ValueError`, which pydantic reports."""
    try:
        check(value)
    except QatkdError as e:
        raise ValueError(str(e)) from None
    return value


def parse_bits(spec: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8): weight and activation bit-widths."""
    match = _BITS.fullmatch(spec.strip().upper())
    if match is None:
        raise QatkdError(
            f"bits '{spec}' is not of the form W<bits>A<bits> (e.g. W4A4, W8A8, W4A16)"
        )
    weight, act = int(match[1]), int(match[2])
    for kind, bits in (("weight", weight), ("activation", act)):
        try:
            check_bits(bits)
        except QatkdError as e:
            raise QatkdError(f"bits '{spec}': {kind} {e}") from None
    return weight, act


class QuantConfig(BaseModel):
    """Which bit-widths and methods `prepare` uses. `method` serves weights and activations unless
    `weight_method` / `act_method` override it. The first and last Conv2d/Linear layers get
    `first_last_bits` (None: the same as the rest) for their weights and inputs, except where the
    rest are 16 (not quantized). Modules whose names match a `skip` pattern (fnmatch) stay float.
    `layer_weight_bits` gives the weights of the layers matching a pattern their own bit-width
    (the first matching pattern; over `first_last_bits`; not where the rest are 16), e.g.
    `{"*lm_head": 8}`. `group_size` gives Linear weights one scale per group of that many
    inputs, and `asymmetric` gives each such group an offset (unsigned codes). `init` starts the
    weight grids at RTN's min-max grid, and with `gptq` sets the codes (and each group's grid) by
    GPTQ on calibration activations (`qatkd.quant.gptq`; the task family supplies them).
    `act_grid` chooses the activations' grid: symmetric (signed codes at abs-max / Q_p; unsigned
    for non-negative tensors) or with a zero point (2^bits codes over the tensor's [min, max]);
    `auto` gives the 8-bit activations of minmax and lsq a zero point, as the int8 runtimes'
    own quantizers do, and keeps the paper's symmetric LSQ grids below 8 bits.
    `act_method=dynamic` (A8, Linear layers) quantizes each input row in blocks at run time, as
    onnxruntime's int8 MatMulNBits kernels do (`DynamicBlockQuantizer`). `format` trains on a
    deployed format's grid exactly: `q4_0` / `q8_0` / `q4_1` (GGUF) mean weight-only W4 / W8 /
    asymmetric W4 in groups of 32 with float16 scales (and minimums); it sets `bits`,
    `group_size` and `asymmetric` where they are not given, and refuses values that contradict
    it. `check_grid` checks what a task family's defaults could still change (the method, the
    groups) once they are applied."""

    model_config = ConfigDict(extra="forbid")

    bits: str = Field(
        "W4A4", description="W<weight bits>A<activation bits>, each of 2, 3, 4, 8, 16 (16 = float)"
    )
    method: str = Field("lsq", description="quantizer of weights and activations")
    weight_method: str | None = Field(None, description="the weights' quantizer, over method")
    act_method: str | None = Field(
        None,
        description="the activations' quantizer, over method; dynamic (A8, Linear layers): int8 "
        "inputs quantized per row in blocks at run time, as onnxruntime's MatMulNBits kernels do",
    )
    act_grid: Literal["auto", "symmetric", "zero_point"] = Field(
        "auto",
        description="activation grids: symmetric (abs-max), zero_point (2^bits codes over "
        "[min, max] with an integer zero point, minmax / lsq), auto: zero_point at 8 bits with "
        "minmax / lsq, else symmetric",
    )
    first_last_bits: int | None = Field(
        8, description="bits of the first and last layer; null: the same as the rest"
    )
    skip: list[str] = Field(
        default_factory=list, description="module-name patterns (fnmatch) left in float"
    )
    layer_weight_bits: dict[str, int] = Field(
        default_factory=dict,
        description="weight bits of the layers matching a pattern (fnmatch, first match wins, "
        "over first_last_bits), e.g. {fc: 8}",
    )
    group_size: int | None = Field(
        None, description="one weight scale per group of this many inputs (Linear layers)"
    )
    asymmetric: bool = Field(
        False,
        description="grouped weights get an offset per group: unsigned codes q, weight = q * "
        "scale + offset (learned with lsq, each group's min with minmax); onnxruntime's "
        "MatMulNBits stores it as a float zero point, GGUF Q4_1 as the block's minimum",
    )
    init: Literal["rtn", "gptq"] | None = Field(
        None,
        description="how weight grids start: null: the method's own start; rtn: the min-max "
        "grid (lsq: QAT starts exactly at round-to-nearest); gptq: the codes of GPTQ on "
        "calibration activations, each group's min-max grid taken as GPTQ reaches it (lsq; "
        "language: the training text)",
    )
    init_samples: int = Field(
        128, gt=0, description="calibration samples for init=gptq (language: training blocks)"
    )
    format: Literal["q4_0", "q8_0", "q4_1"] | None = Field(
        None,
        description="train on GGUF's block grid exactly: weight-only W4 / W8 / asymmetric W4 "
        "(q4_1), groups of 32, float16 scales and minimums (sets bits, group_size, "
        "asymmetric, first_last_bits=null where not given); a language student's export then "
        "also writes model.gguf",
    )

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") in FORMATS:
            data = {**_format_grid(data["format"]), **data}
        return data

    @model_validator(mode="after")
    def _check_format(self) -> QuantConfig:
        if self.format is None:
            return self
        wanted = _format_grid(self.format)
        given = {key: getattr(self, key) for key in wanted}
        methods = {self.weight_method_name} - {"minmax", "lsq"}
        if given != wanted or methods or self.layer_weight_bits:
            raise ValueError(
                f"format {self.format} is blocks of {FORMAT_GROUP} {FORMATS[self.format]}-bit "
                f"weights with float16 scales: it needs {wanted}, a minmax or lsq weight method "
                f"and no layer_weight_bits (got {given}, weight method {self.weight_method_name})"
            )
        return self

    @model_validator(mode="after")
    def _check_dynamic(self) -> QuantConfig:
        if self.weight_method_name == "dynamic":
            raise ValueError(
                "dynamic quantizes activations only: set act_method=dynamic and keep a weight "
                "method (minmax, lsq, ...) in method or weight_method"
            )
        if self.act_method_name == "dynamic" and self.act_bits != 8:
            raise ValueError(
                f"act_method=dynamic quantizes activations to int8 at run time: use A8 (e.g. "
                f"W{self.weight_bits}A8), got bits={self.bits}"
            )
        return self

    @model_validator(mode="after")
    def _check_act_grid(self) -> QuantConfig:
        method = self.act_method_name
        if self.act_grid == "zero_point" and not QUANTIZERS.get(method).takes_offset:
            raise ValueError(
                f"act_grid=zero_point takes the minmax or lsq activation method, not {method}"
            )
        return self

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value: str) -> str:
        _value_error(parse_bits, value)
        return value.strip().upper()

    @field_validator("method", "weight_method", "act_method")
    @classmethod
    def _check_method(cls, value: str | None) -> str | None:
        return value if value is None else _value_error(QUANTIZERS.get, value)

    @field_validator("first_last_bits")
    @classmethod
    def _check_first_last_bits(cls, value: int | None) -> int | None:
        return value if value is None else _value_error(check_bits, value)

    @field_validator("layer_weight_bits")
    @classmethod
    def _check_layer_weight_bits(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, bits in value.items():
            try:
                check_bits(bits)
            except QatkdError as e:
                raise ValueError(f"'{pattern}': {e}") from None
        return value

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, value: int | None) -> int | None:
        return value if value is None else _value_error(check_group_size, value)

    def check_grid(self) -> QuantConfig:
        """`self`, or a `QatkdError` where `asymmetric` or `init` do not fit the weight method or
        groups. Not a validator: a task family's defaults (`method`, `group_size`) may still
        change them; `prepare` and the language family call it on the final values."""
        method = self.weight_method_name
        if self.asymmetric and (self.group_size is None or not QUANTIZERS.get(method).takes_offset):
            raise QatkdError(
                "quant.asymmetric gives weight groups an offset: it needs quant.group_size and "
                f"the minmax or lsq method (got group_size={self.group_size}, {method})"
            )
        if self.init is not None and method not in INIT_METHODS[self.init]:
            why = (
                ": minmax recomputes its grid from the weights at every step; use "
                "quant.method=lsq (learned scales, started at the same grid)"
                if self.init == "gptq"
                else ""
            )
            raise QatkdError(
                f"quant.init={self.init} takes the {' or '.join(INIT_METHODS[self.init])} weight "
                f"method, not {method}{why}"
            )
        return self

    def act_zero_point(self, bits: int) -> bool:
        """Whether activation quantizers of `bits` bits get a grid with a zero point."""
        if self.act_grid == "auto":
            return bits == 8 and QUANTIZERS.get(self.act_method_name).takes_offset
        return self.act_grid == "zero_point"

    @property
    def weight_bits(self) -> int:
        return parse_bits(self.bits)[0]

    @property
    def act_bits(self) -> int:
        return parse_bits(self.bits)[1]

    @property
    def weight_method_name(self) -> str:
        return self.weight_method or self.method

    @property
    def act_method_name(self) -> str:
        return self.act_method or self.method


def saved_quant(values: dict[str, Any]) -> dict[str, Any]:
    """A `quant` section as a checkpoint recorded it, with the keys it was saved without set to
    what qatkd did then (`BEFORE_KEYS`), whatever today's defaults are."""
    return {**BEFORE_KEYS, **values}


def _format_grid(fmt: str) -> dict[str, Any]:
    """The keys a GGUF `format` fixes: its bits, groups of 32, its symmetry, no first/last
    exception."""
    return {
        "bits": f"W{FORMATS[fmt]}A16",
        "group_size": FORMAT_GROUP,
        "asymmetric": fmt in ASYMMETRIC_FORMATS,
        "first_last_bits": None,
    }
