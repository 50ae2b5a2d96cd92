"""The quantization methods, registered by name in `QUANTIZERS`, and `make_quantizer`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatkd.errors import QatkdError
from qatkd.quant.base import (
    EPS,
    QUANTIZERS,
    Quantizer,
    abs_max,
    abs_mean,
    check_bits,
    grad_scale,
    grid_with_zero_point,
    maximum,
    minimum,
    range_grid,
    round_ste,
)


@QUANTIZERS.register("minmax")
class MinMaxQuantizer(Quantizer):
    """Scale = abs-max / Q_p, nothing learned. Weights use their exact per-channel abs-max at every
    call (asymmetric grids: each group's min and max, `range_grid`). Activations use the abs-max
    of all calibration batches, then in training an EMA (momentum 0.1) of the batch abs-max;
    frozen in eval. On a grid with a zero point, activations track their min and max the same
    way."""

    method = "minmax"
    momentum = 0.1
    takes_offset = True

    def __init__(
        self,
        bits: int,
        weight_shape: Sequence[int] | None = None,
        group_size: int | None = None,
        asymmetric: bool = False,
        zero_point_grid: bool = False,
    ) -> None:
        super().__init__(bits, weight_shape, group_size, asymmetric, zero_point_grid)
        two_sided = asymmetric or zero_point_grid
        for name in ("running_min", "running_max") if two_sided else ("running_absmax",):
            self.register_buffer(name, torch.zeros(self.param_shape))

    def _bounds(self) -> tuple[Tensor | None, Tensor]:
        """The buffers of the grid's bounds."""
        if self.asymmetric or self.zero_point_grid:
            return self.running_min, self.running_max
        return None, self.running_absmax

    def _init(self, x: Tensor) -> None:
        for buffer, value in zip(self._bounds(), self._range(x), strict=True):
            if buffer is not None:
                buffer.copy_(value)

    def _scale(self) -> Tensor:
        if self.zero_point_grid:
            return grid_with_zero_point(self.running_min, self.running_max, self.bits)[0]
        return range_grid(*self._bounds(), self.qrange[1])[0]

    def _zero_code(self) -> Tensor:
        """Derived from the tracked bounds, as the scale is."""
        return grid_with_zero_point(self.running_min, self.running_max, self.bits)[1]

    def _offset(self) -> Tensor:
        return self.running_min

    def _codes(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        with torch.no_grad():
            if self.is_weight:
                self._init(x)
            elif self.calibrating or update:
                self._track(x)
            scale = self._scale()
        return self._fake_codes(x, scale, self._offset() if self.asymmetric else None)

    def _track(self, x: Tensor) -> None:
        """Widen the activation's bounds to the batch's (calibrating) or move them towards them
        (training)."""
        if self.zero_point_grid:
            bounds = (
                (self.running_min, minimum, torch.minimum),
                (self.running_max, maximum, torch.maximum),
            )
        else:
            bounds = ((self.running_absmax, abs_max, torch.maximum),)
        for buffer, statistic, widest in bounds:
            batch = self._reduce(x, statistic)
            if self.calibrating:
                buffer.copy_(widest(buffer, batch))
            else:
                buffer.lerp_(batch, self.momentum)


@QUANTIZERS.register("lsq")
class LSQQuantizer(Quantizer):
    """Learned step size (Esser et al., ICLR 2020): the step's gradient is scaled by
    1/sqrt(N * Q_p) and the step starts at 2 * mean|x| / sqrt(Q_p). An asymmetric grid also
    learns its offset `beta` (LSQ+, Bhalgat et al., 2020), with the same gradient scale. An
    activation grid with a zero point starts at its data's min-max grid and keeps that zero
    code: the step is learned, the zero stays on a code."""

    method = "lsq"
    takes_offset = True

    def __init__(
        self,
        bits: int,
        weight_shape: Sequence[int] | None = None,
        group_size: int | None = None,
        asymmetric: bool = False,
        zero_point_grid: bool = False,
    ) -> None:
        super().__init__(bits, weight_shape, group_size, asymmetric, zero_point_grid)
        self.step = nn.Parameter(torch.ones(self.param_shape))
        if asymmetric:
            self.beta = nn.Parameter(torch.zeros(self.param_shape))
        if zero_point_grid:
            self.register_buffer("zero_code", torch.zeros(()))

    def _init(self, x: Tensor) -> None:
        """The paper's 2·mean|x|/sqrt(Q_p), capped at max|x|/Q_p: at 8 bits the paper's value
        clips far beyond the data and wastes most levels (PTQ starts from this init). With
        `minmax_start`, and always for an asymmetric grid, the min-max grid (`range_grid`); for
        a grid with a zero point, `grid_with_zero_point`."""
        if self.zero_point_grid:
            step, zero = grid_with_zero_point(*self._range(x), self.bits)
            self.step.copy_(step)
            self.zero_code.copy_(zero)
            return
        q_p = self.qrange[1]
        if self.minmax_start or self.asymmetric:
            step, beta = range_grid(*self._range(x), q_p)
            self.step.copy_(step)
            if beta is not None:
                self.beta.copy_(beta)
            return
        paper = self._reduce(x, abs_mean) * (2 / math.sqrt(q_p))
        self.step.copy_(torch.minimum(paper, self._reduce(x, abs_max) / q_p))

    def _scale(self) -> Tensor:
        return self.step.abs().clamp_min(EPS)

    def _offset(self) -> Tensor:
        return self.beta

    def _zero_code(self) -> Tensor:
        """Fixed where the grid started: the step is learned around it."""
        return self.zero_code

    def _codes(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        # |step|: an SGD update can carry a small step across zero; the magnitude stays a valid,
        # trainable scale, where clamping would freeze it at EPS with a zero gradient.
        # Q_p of a grid with a zero point: its 2^b - 1 steps, as LSQ+ takes for unsigned codes.
        q_p = 2**self.bits - 1 if self.zero_point_grid else self.qrange[1]
        g = 1 / math.sqrt(self._elements_per_scale(x) * q_p)
        offset = grad_scale(self.beta, g) if self.asymmetric else None
        return self._fake_codes(x, grad_scale(self.step, g).abs().clamp_min(EPS), offset)


@QUANTIZERS.register("pact")
class PACTQuantizer(Quantizer):
    """Learned clip alpha (Choi et al., 2018), started at the data's abs-max; scale = alpha / Q_p.
    Unsigned inputs are clipped to [0, alpha]; signed ones to [Q_n * scale, alpha], i.e. the full
    signed code range (one level more below than [-alpha, alpha]), so that an integer runtime's
    saturation reproduces the clip. The gradient reaches alpha only through the clip: 1 where
    x >= alpha, Q_n / Q_p at and below the lower clip, 0 inside (the scale itself is not
    differentiated, as in the paper)."""

    method = "pact"

    def __init__(
        self, bits: int, weight_shape: Sequence[int] | None = None, group_size: int | None = None
    ) -> None:
        super().__init__(bits, weight_shape, group_size)
        self.alpha = nn.Parameter(torch.ones(self.param_shape))

    def _init(self, x: Tensor) -> None:
        self.alpha.copy_(self._reduce(x, abs_max))

    def _scale(self) -> Tensor:
        return self.alpha.clamp_min(EPS) / self.qrange[1]

    def _codes(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor, None]:
        qmin, qmax = self.qrange
        upper = self._broadcast(self.alpha.clamp_min(EPS))
        lower = upper * (qmin / qmax)
        clipped = torch.where(x >= upper, upper, torch.where(x <= lower, lower, x))
        # No second clamp: it would cut alpha's gradient where clipped / scale is exactly Q_p.
        scale = self._broadcast(self._scale().detach())
        return round_ste(clipped / scale), scale, None


@QUANTIZERS.register("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa-Net (Zhou et al., 2016). Weights: w_n = tanh(w) / (2 max|tanh(w)|) + 0.5 (max per
    channel or group), c = round(w_n (2^b - 1)), w_q = 2c / (2^b - 1) - 1, stored as the odd codes
    2c - (2^b - 1) in [-(2^b - 1), 2^b - 1] with scale 1 / (2^b - 1): 2^b levels, but the codes need
    b + 1 bits as signed integers (see `qrange`). Activations: the paper's fixed clip to [0, 1]
    (signed inputs: the signed code range times 1 / Q_p), nothing learned; prefer `pact` or `lsq`
    for activations of networks not designed for that range."""

    method = "dorefa"

    def __init__(
        self, bits: int, weight_shape: Sequence[int] | None = None, group_size: int | None = None
    ) -> None:
        super().__init__(bits, weight_shape, group_size)
        self.register_buffer("fixed_scale", torch.ones(self.param_shape))

    @property
    def qrange(self) -> tuple[int, int]:
        if self.is_weight:
            return -(2**self.bits - 1), 2**self.bits - 1
        return super().qrange

    def _init(self, x: Tensor) -> None:
        self.fixed_scale.fill_(1 / self.qrange[1])  # weights: 1 / (2^b - 1); activations: 1 / Q_p

    def _scale(self) -> Tensor:
        return self.fixed_scale

    def _codes(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        if not self.is_weight:
            return self._fake_codes(x, self.fixed_scale)
        levels = 2**self.bits - 1
        t = torch.tanh(x)
        normalized = t / (2 * self._broadcast(self._reduce(t, abs_max)).clamp_min(EPS)) + 0.5
        return 2 * round_ste(normalized * levels) - levels, self._broadcast(self.fixed_scale), None


def matmul_nbits_block(inputs: int) -> int:
    """The block of onnxruntime's `MatMulNBits` kernels for weight groups of `inputs` inputs (a
    row's width where the weights have no groups): the largest power of two in [16, 256] that
    divides it, so that the kernel's blocks never straddle a trained group."""
    for size in (256, 128, 64, 32, 16):
        if inputs % size == 0:
            return size
    raise QatkdError(
        f"weight groups of {inputs} inputs are not a multiple of 16: MatMulNBits' blocks (16 to "
        "256 weights, powers of two) cannot hold them without changing trained values; set "
        "quant.group_size to a multiple of 16"
    )


@QUANTIZERS.register("dynamic")
class DynamicBlockQuantizer(Quantizer):
    """Activations quantized at run time, as onnxruntime's int8 `MatMulNBits` kernels
    (accuracy_level 4) quantize their input: each row (token) in blocks of `block` inputs (the
    kernel's block, `matmul_nbits_block`; a narrower last block where the width is not a
    multiple), scale = the block's abs-max / 127, codes = round(x * (127 / abs-max)), half to
    even, in [-127, 127]. Training on these codes is what lets the deployed graph use the int8
    kernels without leaving the trained model. Nothing is learned or stored; 8 bits only. `block`
    is set by `prepare` from the layer the quantizer feeds."""

    method = "dynamic"
    levels = 127.0

    def __init__(
        self, bits: int, weight_shape: Sequence[int] | None = None, group_size: int | None = None
    ) -> None:
        if weight_shape is not None:
            raise QatkdError(
                "the dynamic method quantizes activations only; set quant.act_method=dynamic "
                "and another weight method"
            )
        if bits != 8:
            raise QatkdError(f"dynamic activations are int8 (A8), got {bits} bits")
        super().__init__(bits)
        self.block = 0
        self.initialized.fill_(True)
        self.is_signed.fill_(True)

    @property
    def qrange(self) -> tuple[int, int]:
        return -127, 127

    @property
    def granularity(self) -> str:
        return f"row-block{self.block}"

    @property
    def scale(self) -> Tensor:
        raise QatkdError(
            "a dynamic activation quantizer has no stored scale: it takes one per row and block "
            "of each input at run time"
        )

    def _init(self, x: Tensor) -> None:
        """Nothing to learn from data."""

    def _codes(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor, None]:
        if self.block <= 0:
            raise QatkdError("a dynamic activation quantizer is used before prepare set its block")
        width = x.shape[-1]
        blocks = -(-width // self.block)
        padded = F.pad(x, (0, blocks * self.block - width)).unflatten(-1, (blocks, self.block))
        absmax = padded.detach().abs().amax(-1, keepdim=True)
        inverse = torch.where(absmax > 0, self.levels / absmax, torch.zeros_like(absmax))
        codes = round_ste(padded * inverse)
        scale = (absmax / self.levels).expand_as(padded)
        return codes.flatten(-2)[..., :width], scale.flatten(-2)[..., :width], None


class FloatQuantizer(Quantizer):
    """16 bits: not quantized. The identity, with codes = x and scale 1 so the interface holds."""

    method = "float"

    def __init__(
        self, weight_shape: Sequence[int] | None = None, group_size: int | None = None
    ) -> None:
        super().__init__(16, weight_shape, group_size)
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def _init(self, x: Tensor) -> None:
        """Nothing to learn from data."""

    def _scale(self) -> Tensor:
        return torch.ones(self.param_shape, device=self.initialized.device)

    def _codes(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor, None]:
        return x, torch.ones((), dtype=x.dtype, device=x.device), None


def make_quantizer(
    method: str,
    bits: int,
    weight_shape: Sequence[int] | None = None,
    group_size: int | None = None,
    asymmetric: bool = False,
    zero_point_grid: bool = False,
) -> Quantizer:
    """A quantizer of a registered method; 16 bits gives the identity (`FloatQuantizer`).
    `weight_shape` makes it a weight quantizer (per channel, or per group for a Linear weight);
    `asymmetric` gives grouped weights unsigned codes and an offset, `zero_point_grid` an
    activation's codes a zero point (minmax and lsq)."""
    cls = QUANTIZERS.get(method)
    if check_bits(bits) == 16:
        return FloatQuantizer(weight_shape, group_size)
    if asymmetric or zero_point_grid:
        if not cls.takes_offset:
            what = "an asymmetric grid (quant.asymmetric)" if asymmetric else "quant.act_grid"
            raise QatkdError(f"{what} takes the minmax or lsq method, not {method}")
        return cls(bits, weight_shape, group_size, asymmetric, zero_point_grid)
    return cls(bits, weight_shape, group_size)
