"""The quantizer interface shared by every method, and the straight-through estimator helpers.

A quantizer computes integer codes and a scale and returns `codes * scale`, so its fake-quantized
output equals `(quantize_int(x) - zero_point) * scale` bitwise: the exporter and the packer write
exactly the numbers that training used. An asymmetric weight grid (`asymmetric`, grouped weights
only) has unsigned codes and a float offset per group instead, and returns
`codes * scale + offset` (GGUF Q4_1's `d * q + m`), equal to `quantize_int(x) * scale + offset`.
An activation grid with a zero point (`zero_point_grid`) keeps integer codes and `codes * scale`:
its 2^bits codes are shifted, [-z, 2^bits - 1 - z], which a runtime stores as unsigned codes at
zero point z.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qatkd.errors import QatkdError
from qatkd.registry import Registry

ALLOWED_BITS = (2, 3, 4, 8, 16)
GROUP_SIZES = (32, 64, 128)
EPS = 1e-8
"""Smallest scale: a dead channel (all zeros) must not divide by zero."""
SCALE_RATIO = 1 + 2.0**-10
"""A grid with a zero point takes the smallest scale at or above what its bounds need among the
powers of this ratio. Calibrated on the extremes of a product (squeeze-excite, SiLU), the scale
would stand in an exact rational ratio to its operands' scales, and with a short significand (a
power of two times a few bits) sums land exactly on halves too: whole families of results then
sit exactly on rounding ties, where PyTorch and an integer kernel (computing in another float
order) round apart, and EfficientNet-B0's int8 graph disagreed with PyTorch on 0.3-0.6 % of the
images. The powers of 1 + 2^-10 are in no such ratio and have full significands; rounding up to
them is idempotent (a grid calibrated on codes of the same grid, after a max pooling, is that
grid, so the codes pass through) and widens the range by less than 0.1 %."""
FLOAT16_TINY = 2.0**-24
"""Smallest positive float16 (a float16 scale's floor: EPS rounds to 0 in float16)."""

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")


def check_bits(bits: int) -> int:
    """`bits` if supported; 16 means "not quantized"."""
    if bits not in ALLOWED_BITS:
        raise QatkdError(
            f"bit-width {bits} is not supported; choose one of: {', '.join(map(str, ALLOWED_BITS))}"
        )
    return bits


def check_group_size(group_size: int) -> int:
    if group_size not in GROUP_SIZES:
        choices = ", ".join(map(str, GROUP_SIZES))
        raise QatkdError(f"group_size {group_size} is not supported; choose one of: {choices}")
    return group_size


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _HalfSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, floor: float | None) -> Tensor:
        half = x.to(torch.float16).to(x.dtype)
        return half if floor is None else half.clamp_min(floor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, g: float) -> Tensor:
        ctx.g = g
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.g, None


def round_ste(x: Tensor) -> Tensor:
    """`torch.round` (half to even, as ONNX QuantizeLinear) with an identity gradient. Same gradient
    as LSQ's `round_pass` (`(x.round() - x).detach() + x`), but the value is `round(x)` bitwise."""
    return _RoundSTE.apply(x)


def grad_scale(x: Tensor, g: float) -> Tensor:
    """`x` unchanged with its gradient multiplied by `g` (LSQ's `grad_scale`, value exact)."""
    return _GradScale.apply(x, g)


def abs_max(x: Tensor, dim: int) -> Tensor:
    return x.abs().amax(dim)


def abs_mean(x: Tensor, dim: int) -> Tensor:
    return x.abs().mean(dim)


def minimum(x: Tensor, dim: int) -> Tensor:
    return x.amin(dim)


def maximum(x: Tensor, dim: int) -> Tensor:
    return x.amax(dim)


def grid_with_zero_point(low: Tensor, high: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero code z of 2^bits codes [-z, 2^bits - 1 - z] that hold [low, high] (widened
    to hold 0, which lands exactly on code 0), as onnxruntime's and NNCF's u8 activations.
    z is -low / scale rounded to an even integer (at most 2^bits - 2): integer kernels add the
    zero point before they round (QLinearAdd, a conv's requantization), and round-half-to-even
    of v + z is round(v) + z only for an even z. The scale is then the smallest that reaches
    both ends (at most one step in 2^bits - 1 above (high - low) / (2^bits - 1)), rounded up
    to a power of `SCALE_RATIO`."""
    levels = 2**bits - 1
    low, high = low.clamp_max(0), high.clamp_min(0)
    spread = ((high - low) / levels).clamp_min(EPS)
    half = torch.round(-low / (2 * spread)).clamp_max(2 ** (bits - 1) - 1)
    zero = 2 * half
    below = torch.where(half > 0, -low / zero, torch.zeros_like(low))
    return _round_up(torch.maximum(below, high / (levels - zero)).clamp_min(EPS)), zero


def _round_up(scale: Tensor) -> Tensor:
    """The smallest power of `SCALE_RATIO` at or above `scale` (float32 rounding: a power in
    float32 maps to itself, and a value within 1e-6 of one above it to that power)."""
    step = math.log(SCALE_RATIO)
    power = torch.ceil(torch.log(scale.double()) / step - 1e-3)
    return torch.exp(power * step).to(scale.dtype)


def range_grid(low: Tensor | None, high: Tensor, qmax: int) -> tuple[Tensor, Tensor | None]:
    """Scale and offset of the grid whose top code lands on `high`: symmetric (`low` None, `high`
    the abs-max) `high / qmax` and no offset; asymmetric `(high - low) / qmax` from `low`
    (code 0). Round-to-nearest on this grid is RTN."""
    if low is None:
        return (high / qmax).clamp_min(EPS), None
    return ((high - low) / qmax).clamp_min(EPS), low


class Quantizer(nn.Module):
    """Fake quantizer for a weight (signed, per output channel or per input group) or an activation
    (per tensor, signed only if the data it is initialised on has negatives).

    Subclasses (one per method) define `_init` (data-driven start values), `_scale` (the scale in
    its stored shape), `_codes` (integer codes with their gradients, and the scale and offset they
    use) and, if they take an asymmetric grid (`takes_offset`), `_offset` and, for an activation
    grid with a zero point, `_zero_code`. All state lives in parameters and buffers, so
    `state_dict()` round-trips it.
    """

    method = ""
    tensor_hint: str | None = None
    """Set by `prepare` on activation quantizers: the name of the tensor they quantize in the
    exported graph (`quant.tensors`)."""
    float16_scale = False
    """Set by `prepare` for a format that stores scales in float16 (`quant.format`, GGUF's
    blocks): every scale (and offset) the quantizer computes with or reports is rounded to
    float16 first (identity gradient), so training runs on exactly the stored grid."""
    minmax_start = False
    """Set by `prepare` (`quant.init`): a weight grid with a learned scale starts at the weights'
    min-max grid (`range_grid`, RTN) rather than at the method's own start."""
    takes_offset = False
    """Whether the method has an asymmetric form (`asymmetric`) and an activation grid with a
    zero point (`zero_point_grid`)."""

    def __init__(
        self,
        bits: int,
        weight_shape: Sequence[int] | None = None,
        group_size: int | None = None,
        asymmetric: bool = False,
        zero_point_grid: bool = False,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.is_weight = weight_shape is not None
        self.group_size = None if group_size is None else check_group_size(group_size)
        if asymmetric and not (self.takes_offset and self.is_weight and self.group_size):
            raise QatkdError(
                "an asymmetric grid (quant.asymmetric) is for grouped Linear weights "
                "(quant.group_size) with the minmax or lsq method"
            )
        self.asymmetric = asymmetric
        if zero_point_grid and (self.is_weight or not self.takes_offset):
            raise QatkdError(
                "a grid with a zero point (quant.act_grid) is for activations, with the minmax "
                "or lsq method"
            )
        self.zero_point_grid = zero_point_grid
        """2^bits codes over the activation's [min, max] with an integer zero point
        (`_zero_code`), not a symmetric or unsigned grid (`grid_with_zero_point`)."""
        self.param_shape = _param_shape(weight_shape, self.group_size)
        self.group_widths: list[int] = []
        """Inputs per group, in order: all `group_size` but the last, which holds the remainder
        when `group_size` does not divide in_features (576 = 4 x 128 + 64)."""
        if self.group_size is not None and weight_shape is not None:
            full, rest = divmod(weight_shape[1], self.group_size)
            self.group_widths = [self.group_size] * full + ([rest] if rest else [])
        self.numel_per_scale = (
            self.group_size
            if self.group_widths
            else math.prod(weight_shape) // math.prod(self.param_shape)
            if weight_shape
            else 0
        )
        self.calibrating = False
        """Set by `calibrate`: initialise and track ranges as in training, whatever the mode, on
        the float model's tensors (`forward` passes them through unquantized)."""
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("is_signed", torch.tensor(self.is_weight))

    @property
    def signed(self) -> bool:
        return bool(self.is_signed)

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer codes' (min, max): unsigned for an asymmetric grid, [-z, 2^bits - 1 - z]
        for a grid with zero code z."""
        if self.zero_point_grid:
            zero = int(self._zero_code())
            return -zero, 2**self.bits - 1 - zero
        if self.signed and not self.asymmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def granularity(self) -> str:
        if not self.is_weight:
            return "tensor+zero_point" if self.zero_point_grid else "tensor"
        if self.group_size is None:
            return "channel"
        return f"group{self.group_size}" + ("+offset" if self.asymmetric else "")

    @property
    def scale(self) -> Tensor:
        """The scale, broadcastable against the quantized tensor: a scalar, `[C, 1, ...]`, or for
        groups `[out, in]` (each group's scale repeated; `scale[:, ::group_size]` is compact, one
        per group, the last group possibly narrower).
        Weight scales that follow the weight (min-max) are those of the last forward or
        quantize_int."""
        return self._broadcast(self._stored(self._scale().detach()))

    def _stored(self, scale: Tensor, floor: float | None = FLOAT16_TINY) -> Tensor:
        """`scale` (or, with `floor` None, an offset) as the deployed format stores it (float16
        with `float16_scale`)."""
        return _HalfSTE.apply(scale, floor) if self.float16_scale else scale

    @property
    def offset(self) -> Tensor:
        """The asymmetric grid's offset (the value of code 0), broadcast as `scale`; zeros for a
        symmetric grid."""
        if not self.asymmetric:
            return torch.zeros_like(self.scale)
        return self._broadcast(self._stored(self._offset().detach(), None))

    @property
    def zero_point(self) -> Tensor:
        """0 for a symmetric grid; an asymmetric one has a float `offset` instead."""
        if self.asymmetric:
            raise QatkdError("an asymmetric grid has a float offset (`offset`), no zero point")
        return torch.zeros_like(self.scale, dtype=torch.int32)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:  # ranges of float tensors: no rounding noise from earlier layers
            self._quantize(x, update=True)
            return x
        codes, scale, offset = self._quantize(x, update=self.training)
        return codes * scale if offset is None else codes * scale + offset

    @torch.no_grad()
    def quantize_int(self, x: Tensor) -> Tensor:
        """The integer codes (as floats) with `forward(x) == (codes - zero_point) * scale`
        (asymmetric: `codes * scale + offset`), as forward in eval mode computes them; running
        statistics are left as they are."""
        return self._quantize(x, update=False)[0]

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Initialise from data (a weight, or a batch of activations, which makes the quantizer
        signed if it has a negative value; one made signed before, by `prepare`, stays so)."""
        if not self.is_weight:
            self.is_signed.fill_(bool(self.is_signed) or bool((x < 0).any()))
        self._init(x.detach())
        self.initialized.fill_(True)

    def _quantize(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Codes, scale and offset (None: symmetric); `update`: training or calibrating, so
        running statistics move."""
        if not bool(self.initialized):
            if not (self.is_weight or update):
                raise QatkdError(
                    "an activation quantizer is used for inference before it was initialised; "
                    "run qatkd.quant.calibrate(model, batches) first, or train the model"
                )
            self.init_from(x)
        return self._codes(x, update)

    def _init(self, x: Tensor) -> None:
        raise NotImplementedError

    def _scale(self) -> Tensor:
        raise NotImplementedError

    def _offset(self) -> Tensor:
        raise NotImplementedError

    def _zero_code(self) -> Tensor:
        raise NotImplementedError

    def _codes(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError

    def _reduce(self, x: Tensor, op: Callable[[Tensor, int], Tensor]) -> Tensor:
        """A per-scale statistic of `x`, in the stored scale's shape."""
        if not self.is_weight:
            return op(x.reshape(-1), 0)
        if self.group_size is not None:
            return torch.stack([op(g, 1) for g in x.split(self.group_size, dim=1)], dim=1)
        return op(x.reshape(x.shape[0], -1), 1).reshape(self.param_shape)

    def _range(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """The bounds `range_grid` takes for the weight `x`: per scale (abs-max) or, asymmetric,
        (min, max); for activations on a grid with a zero point, their (min, max)."""
        if self.asymmetric or self.zero_point_grid:
            return self._reduce(x, minimum), self._reduce(x, maximum)
        return None, self._reduce(x, abs_max)

    def _broadcast(self, scale: Tensor) -> Tensor:
        if self.group_size is None:
            return scale
        widths = torch.tensor(self.group_widths, device=scale.device)
        return scale.repeat_interleave(widths, dim=1, output_size=sum(self.group_widths))

    def _elements_per_scale(self, x: Tensor) -> int:
        """N in LSQ's gradient scale: elements per scale (weights) or features (activations)."""
        if self.is_weight:
            return self.numel_per_scale
        return x[0].numel() if x.dim() > 1 else x.numel()

    def _fake_codes(
        self, x: Tensor, scale: Tensor, offset: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """round(clamp((x - offset) / scale)), equal to clamp(round(...)) as the range is integer,
        with the STE: the gradient passes inside the range only (to x; to the offset outside it,
        as in LSQ+). Clamping first, as LSQ's reference does, keeps the gradient of values that
        round onto the range's ends."""
        qmin, qmax = self.qrange
        scale = self._broadcast(self._stored(scale))
        if offset is not None:
            offset = self._broadcast(self._stored(offset, None))
            x = x - offset
        return round_ste(torch.clamp(x / scale, qmin, qmax)), scale, offset

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}"


def _param_shape(weight_shape: Sequence[int] | None, group_size: int | None) -> tuple[int, ...]:
    if weight_shape is None:
        return ()
    if group_size is None:
        return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    if len(weight_shape) != 2:
        raise QatkdError(
            f"per-group scales need a Linear weight [out, in], got shape {list(weight_shape)}"
        )
    return (weight_shape[0], -(-weight_shape[1] // group_size))
