"""Quantizers against reference math written here: grids, saturation, STE and learned gradients."""

from __future__ import annotations

import math

import pytest
import torch

from qatkd.errors import QatkdError
from qatkd.quant import QUANTIZERS, LSQQuantizer, PACTQuantizer, make_quantizer
from qatkd.quant.base import SCALE_RATIO, grid_with_zero_point
from qatkd.quant.quantizers import matmul_nbits_block

METHODS = [m for m in QUANTIZERS.names() if m != "dynamic"]
"""The methods for weights and activations; `dynamic` (int8 inputs quantized at run time) has its
own tests below."""
BITS = (2, 3, 4, 8)


def weight_quantizer(method: str, bits: int, shape: tuple[int, ...], group_size: int | None = None):
    return make_quantizer(method, bits, shape, group_size)


def act_quantizer(method: str, bits: int, data: torch.Tensor):
    """An initialised activation quantizer (signed iff `data` has negatives)."""
    q = make_quantizer(method, bits)
    q.init_from(data)
    return q


def assert_exact(q, x: torch.Tensor) -> torch.Tensor:
    """forward(x) == (quantize_int(x) - zero_point) * scale bitwise; integer codes in range."""
    out = q(x)
    codes = q.quantize_int(x)
    assert torch.equal(out, (codes - q.zero_point) * q.scale)
    if q.bits < 16:
        qmin, qmax = q.qrange
        assert torch.equal(codes, codes.round())
        assert qmin <= codes.min() and codes.max() <= qmax
    return out


def test_registry_names():
    assert QUANTIZERS.names() == ["dorefa", "dynamic", "lsq", "minmax", "pact"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", (*BITS, 16))
@pytest.mark.parametrize("training", (True, False))
def test_forward_equals_codes_times_scale(method, bits, training):
    torch.manual_seed(bits)
    for shape, group in (((6, 3, 3, 3), None), ((5, 40), None), ((4, 64), 32)):
        q = weight_quantizer(method, bits, shape, group).train(training)
        assert_exact(q, torch.randn(shape))
    for data in (torch.randn(4, 3, 5, 5), torch.rand(4, 3, 5, 5)):
        q = act_quantizer(method, bits, data).train(training)
        assert_exact(q, data * 1.7)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", BITS)
def test_at_most_2_pow_b_levels_on_the_grid(method, bits):
    torch.manual_seed(0)
    w = torch.randn(4, 3, 9, 9)
    q = weight_quantizer(method, bits, w.shape)
    out = q(w)
    for c in range(4):
        assert out[c].unique().numel() <= 2**bits
        levels = out[c] / q.scale[c]
        torch.testing.assert_close(levels, levels.round())
    w = torch.randn(3, 128)
    q = weight_quantizer(method, bits, w.shape, group_size=32)
    out = q(w).reshape(3, 4, 32)
    assert all(out[i, g].unique().numel() <= 2**bits for i in range(3) for g in range(4))
    x = torch.randn(2, 300)
    q = act_quantizer(method, bits, x)
    assert q(x).unique().numel() <= 2**bits


@pytest.mark.parametrize("method", ("minmax", "lsq", "pact"))
def test_values_beyond_the_clip_saturate(method):
    q = act_quantizer(method, 4, torch.linspace(-2, 2, 50))
    q.eval()
    qmin, qmax = q.qrange
    assert (qmin, qmax) == (-8, 7)
    out = q(torch.tensor([-1e4, -50.0, 50.0, 1e4]))
    s = q.scale
    assert torch.equal(out, torch.stack([qmin * s, qmin * s, qmax * s, qmax * s]))


def test_signedness_decided_by_initialisation_data():
    assert act_quantizer("lsq", 4, torch.rand(10)).qrange == (0, 15)
    assert act_quantizer("lsq", 4, torch.tensor([0.5, -0.01, 2.0])).qrange == (-8, 7)
    assert make_quantizer("lsq", 4, (3, 4)).qrange == (-8, 7)


def test_ste_passes_gradient_inside_and_zero_outside():
    q = act_quantizer("minmax", 4, torch.tensor([-1.0, 1.0])).eval()  # scale 1/7
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.3, 0.99, 1.2, 5.0], requires_grad=True)
    upstream = torch.arange(1.0, 9.0)
    (q(x) * upstream).sum().backward()
    low, high = -8 / 7, 1.0
    inside = (x > low) & (x < high)
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, 0.0))


@pytest.mark.parametrize(
    ("shape", "features"),
    [((2, 7), 7), ((2, 1, 7), 7), ((7, 2), 2), ((1, 14), 14), ((14,), 14)],
    ids=["2x7", "2x1x7", "7x2", "1x14", "14"],
)
def test_lsq_step_gradient_matches_paper(shape, features):
    """N in the step's gradient scale is the features of one sample (a whole 1-D input is one
    sample), whatever the batch size."""
    q = LSQQuantizer(4)
    q.init_from(torch.tensor([-1.0, 1.0]))  # signed: Q_n = -8, Q_p = 7
    with torch.no_grad():
        q.step.fill_(0.5)
    values = [-5.0, -1.3, 0.2, 0.74, 1.1, 3.3, 4.0, 0.9, -4.2, 0.1, -0.3, 2.6, -3.9, 1.7]
    weights = [0.3, -1.2, 0.7, 2.0, -0.4, 1.5, 0.9, -0.6, 1.1, 0.2, -2.0, 0.8, 0.5, -1.4]
    x = torch.tensor(values).reshape(shape).requires_grad_()
    upstream = torch.tensor(weights).reshape(shape)
    (q(x) * upstream).sum().backward()

    s, qn, qp = 0.5, -8, 7
    g = 1 / math.sqrt(features * qp)
    expected_ds, expected_dx = 0.0, []
    for xi, ui in zip(values, weights, strict=True):
        v = xi / s
        if v <= qn:
            expected_ds += ui * qn * g
            expected_dx.append(0.0)
        elif v >= qp:
            expected_ds += ui * qp * g
            expected_dx.append(0.0)
        else:
            expected_ds += ui * (round(v) - v) * g
            expected_dx.append(ui)
    torch.testing.assert_close(q.step.grad, torch.tensor(expected_ds))
    torch.testing.assert_close(x.grad, torch.tensor(expected_dx).reshape(shape))


@pytest.mark.parametrize("bits", BITS)
def test_lsq_starts_at_the_papers_step_capped_at_the_data_range(bits):
    """2 mean|w| / sqrt(Q_p) where the data is spiky (one large weight among small ones), max|w| /
    Q_p where that would clip beyond the data."""
    w = torch.zeros(2, 64)
    w[0, 5] = 3.0
    w[1] = torch.linspace(-1.0, 1.0, 64)
    q = LSQQuantizer(bits, w.shape)
    q.init_from(w)
    q_p = 2 ** (bits - 1) - 1
    paper = 2 * w.abs().mean(1, keepdim=True) / math.sqrt(q_p)
    cap = w.abs().amax(1, keepdim=True) / q_p
    assert paper[0, 0] < cap[0, 0] and (bits == 2 or cap[1, 0] < paper[1, 0])  # both cases
    torch.testing.assert_close(q.step.detach(), torch.minimum(paper, cap))


def test_lsq_weight_gradient_scale_per_channel_and_init():
    w = torch.tensor([[0.4, -0.2, 0.9, -3.0], [0.1, 0.05, -0.3, 0.2]])
    q = LSQQuantizer(2, w.shape)  # Q_n = -2, Q_p = 1
    q.init_from(w)
    paper = 2 * w.abs().mean(1, keepdim=True) / math.sqrt(1)  # Esser et al.'s init
    cap = w.abs().amax(1, keepdim=True) / 1  # max|w| / Q_p: never clip beyond the data
    torch.testing.assert_close(q.step.detach(), torch.minimum(paper, cap))
    assert q.step[0, 0] == paper[0, 0] and q.step[1, 0] == cap[1, 0]
    with torch.no_grad():
        q.step.copy_(torch.tensor([[0.5], [0.25]]))
    q(w).sum().backward()
    g = 1 / math.sqrt(4 * 1)
    expected = []
    for row, s in zip(w.tolist(), (0.5, 0.25), strict=True):
        total = 0.0
        for xi in row:
            v = xi / s
            total += -2 if v <= -2 else 1 if v >= 1 else round(v) - v
        expected.append([total * g])
    torch.testing.assert_close(q.step.grad, torch.tensor(expected))


def test_pact_alpha_gradient():
    q = PACTQuantizer(2)
    q.init_from(torch.tensor([0.0, 3.0]))  # unsigned, alpha = 3
    assert q.alpha.item() == 3.0
    with torch.no_grad():
        q.alpha.fill_(2.0)
    x = torch.tensor([-1.0, 0.5, 1.9, 2.0, 2.5, 7.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = q(x)
    s = 2.0 / 3
    reference = torch.clamp(torch.round(torch.clamp(x.detach(), 0, 2.0) / s), 0, 3) * s
    torch.testing.assert_close(out, reference)
    (out * upstream).sum().backward()
    torch.testing.assert_close(q.alpha.grad, torch.tensor(4.0 + 5.0 + 6.0))  # x >= alpha
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 0.0, 0.0, 0.0]))


def test_pact_signed_clip_uses_full_code_range():
    """The lower clip is Q_n * scale = -2 alpha; a value at it counts as clipped, as one at alpha
    does."""
    q = PACTQuantizer(2)
    q.init_from(torch.tensor([-1.0, 1.0]))  # signed: codes -2..1, scale alpha / 1
    x = torch.tensor([-5.0, -2.0, -0.4, 5.0], requires_grad=True)
    out = q(x)
    torch.testing.assert_close(out, torch.tensor([-2.0, -2.0, 0.0, 1.0]))
    out.sum().backward()
    # Q_n / Q_p at and below the lower clip, 1 above alpha
    torch.testing.assert_close(q.alpha.grad, torch.tensor(-2.0 - 2.0 + 1.0))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_dorefa_weights_match_paper_formula():
    torch.manual_seed(0)
    w = torch.randn(3, 20)
    for bits in BITS:
        q = make_quantizer("dorefa", bits, w.shape)
        n = 2**bits - 1
        t = torch.tanh(w)
        normalized = t / (2 * t.abs().amax(1, keepdim=True)) + 0.5
        reference = 2 * torch.round(normalized * n) / n - 1
        torch.testing.assert_close(assert_exact(q, w), reference)
        codes = q.quantize_int(w)
        assert torch.all(codes.remainder(2) == 1)  # odd codes in [-n, n]
        assert q.qrange == (-n, n)


def test_dorefa_activations_clip_to_unit_range():
    q = act_quantizer("dorefa", 2, torch.rand(8))
    out = q(torch.tensor([-1.0, 0.2, 0.5, 3.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    # signed inputs: the signed code range [-8, 7] times 1 / Q_p = 1 / 7
    q = act_quantizer("dorefa", 4, torch.tensor([-0.5, 1.0]))
    out = q(torch.tensor([-5.0, -1.0, 0.3, 3.0]))
    torch.testing.assert_close(out, torch.tensor([-8 / 7, -1.0, 2 / 7, 1.0]))


def test_scale_shapes():
    assert make_quantizer("lsq", 4, (8, 3, 3, 3)).scale.shape == (8, 1, 1, 1)
    assert make_quantizer("lsq", 4, (8, 1, 3, 3)).scale.shape == (8, 1, 1, 1)  # depthwise
    assert make_quantizer("lsq", 4, (6, 40)).scale.shape == (6, 1)
    q = make_quantizer("lsq", 4, (6, 128), group_size=64)
    assert q.step.shape == (6, 2)
    assert q.scale.shape == (6, 128)
    torch.testing.assert_close(q.scale[:, ::64], q.step.detach())
    assert make_quantizer("lsq", 4).scale.shape == ()
    assert make_quantizer("minmax", 4, (6, 40)).zero_point.dtype == torch.int32


@pytest.mark.parametrize(("method", "bits"), [*((m, 4) for m in METHODS), ("lsq", 16)])
def test_a_last_group_narrower_than_group_size(method, bits):
    """72 inputs in groups of 32: 32 + 32 + 8, each group with its own scale (as SmolLM2's 576
    inputs in groups of 128), with every method, and at 16 bits (scales of 1)."""
    torch.manual_seed(0)
    w = torch.randn(5, 72)
    w[:, 64:] *= 10  # the narrow last group has its own, larger range
    q = make_quantizer(method, bits, w.shape, group_size=32)
    codes = q.quantize_int(w)
    assert q.granularity == "group32"
    assert q.param_shape == (5, 3) and q.scale.shape == (5, 72)
    for g, (start, stop) in enumerate([(0, 32), (32, 64), (64, 72)]):
        scale = q.scale[:, start:stop]
        assert torch.equal(scale, scale[:, :1].expand_as(scale))
        torch.testing.assert_close(q.scale[:, start], q.scale[:, ::32][:, g])
    if method == "minmax":  # max |w| of each group maps to the top code
        expected = torch.stack(
            [w[:, a:b].abs().amax(1) for a, b in [(0, 32), (32, 64), (64, 72)]], 1
        )
        torch.testing.assert_close(q.scale[:, ::32] * 7, expected)
    torch.testing.assert_close(q(w), codes * q.scale)


def test_float16_scales_are_the_float16_values_with_a_floor():
    """With `float16_scale` (a format that stores float16 scales) every scale is rounded to
    float16, kept as float32, and a dead group's scale is float16's smallest positive value (EPS
    itself rounds to 0)."""
    torch.manual_seed(0)
    w = torch.randn(3, 64)
    w[1, :32] = 0
    q = make_quantizer("minmax", 4, w.shape, group_size=32)
    q.float16_scale = True
    out = q(w)
    absmax = w.reshape(3, 2, 32).abs().amax(-1)
    expected = (absmax / 7).half().float().clamp_min(2.0**-24)
    assert q.scale.dtype == torch.float32
    assert torch.equal(q.scale[:, ::32], expected) and expected[1, 0] == 2.0**-24
    assert not torch.equal(expected, absmax / 7)  # the rounding changed the scales
    assert torch.equal(out, q.quantize_int(w) * q.scale)


@pytest.mark.parametrize("bits", (4, 16))
def test_a_scale_is_on_the_quantizers_device_and_needs_no_data_to_broadcast(bits):
    """On a quantizer moved to another device (meta here: no data at all), `scale` is on that
    device, and a group scale's broadcast has a size known in advance (nothing read back from
    the device)."""
    for shape, group_size, scale_shape in (((5, 40), None, (5, 1)), ((5, 72), 32, (5, 72))):
        q = make_quantizer("lsq", bits, shape, group_size).to("meta")
        assert q.scale.device.type == "meta" and q.scale.shape == scale_shape


def test_group_errors():
    with pytest.raises(QatkdError, match="need a Linear weight"):
        make_quantizer("lsq", 4, (6, 64, 1, 1), group_size=32)
    with pytest.raises(QatkdError, match="group_size 48 is not supported; choose one of: 32, 64"):
        make_quantizer("lsq", 4, (6, 96), group_size=48)


def test_minmax_activation_ema_in_training_only():
    q = make_quantizer("minmax", 8)
    q.train()
    q(torch.tensor([0.0, 2.0]))
    q(torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(q.running_absmax, torch.tensor(0.9 * 2.0 + 0.1 * 4.0))
    q.eval()
    q(torch.tensor([0.0, 100.0]))
    torch.testing.assert_close(q.scale, torch.tensor(2.2 / 255))


@pytest.mark.parametrize("method", METHODS)
def test_zero_channel_gives_no_nan(method):
    w = torch.randn(3, 32)
    w[1] = 0
    assert torch.isfinite(make_quantizer(method, 4, w.shape)(w)).all()


def test_uninitialised_activation_quantizer_refuses_inference():
    q = make_quantizer("lsq", 4).eval()
    with pytest.raises(QatkdError) as error:
        q(torch.randn(3))
    assert str(error.value) == (
        "an activation quantizer is used for inference before it was initialised; "
        "run qatkd.quant.calibrate(model, batches) first, or train the model"
    )


def test_16_bits_is_identity():
    """Needs no calibration: its codes are the input, in eval mode too (an exporter reads them)."""
    x = torch.randn(5, 7)
    q = make_quantizer("lsq", 16)
    assert q.eval()(x) is x
    assert torch.equal(q.quantize_int(x), x)
    assert list(q.parameters()) == []


@pytest.mark.parametrize("bits", (1, 5, 6, 32))
def test_unsupported_bits_error(bits):
    with pytest.raises(
        QatkdError, match=rf"bit-width {bits} is not supported; choose one of: 2, 3, 4, 8, 16"
    ):
        make_quantizer("lsq", bits)


def test_unknown_method_error():
    with pytest.raises(QatkdError, match=r"unknown quantizer 'lsqq' \(did you mean 'lsq'\?\)"):
        make_quantizer("lsqq", 4)


def test_lsq_step_that_crossed_zero_still_quantizes_with_its_magnitude():
    x = torch.tensor([[0.3, -0.7, 1.2]])
    q = LSQQuantizer(4)
    q.init_from(x)
    with torch.no_grad():
        q.step.fill_(-0.1)
    assert torch.equal(q.scale, torch.tensor(0.1))
    torch.testing.assert_close(q(x), torch.tensor([[0.3, -0.7, 0.7]]))  # Q_p = 7 for signed 4-bit
    q(x).sum().backward()
    assert q.step.grad is not None and q.step.grad.abs().item() > 0


def dynamic_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """onnxruntime's int8 input of MatMulNBits (accuracy_level 4), element by element: per row and
    block of `block` inputs, scale = abs-max / 127, code = round(x * (127 / abs-max))."""
    out = torch.empty_like(x)
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], block):
            values = x[row, start : start + block]
            absmax = values.abs().max()
            inverse = 127 / absmax if absmax > 0 else torch.zeros(())
            out[row, start : start + block] = torch.round(values * inverse) * (absmax / 127)
    return out


def test_dynamic_quantizes_each_row_block_by_its_own_abs_max():
    """Blocks of 32 over 80 inputs: two whole blocks and a narrower last one; a zero block stays
    zero; the result does not depend on training mode or on other rows."""
    torch.manual_seed(0)
    q = make_quantizer("dynamic", 8)
    q.block = 32
    x = torch.randn(3, 80) * torch.tensor([[0.01], [1.0], [50.0]])
    x[1, 32:64] = 0
    expected = dynamic_reference(x, 32)
    assert torch.equal(q.eval()(x), expected)  # nothing to calibrate
    assert torch.equal(q.train()(x), expected)
    assert torch.equal(q(x[2:]), expected[2:])
    codes = q.quantize_int(x)
    assert codes.abs().max() == 127 and torch.equal(codes, codes.round())
    assert torch.equal(codes[1, 32:64], torch.zeros(32))
    assert q.granularity == "row-block32" and q.qrange == (-127, 127) and q.signed
    q.block = 1  # any block: each input on its own
    assert torch.equal(q(x), dynamic_reference(x, 1))


def test_dynamic_passes_the_gradient_straight_through():
    q = make_quantizer("dynamic", 8)
    q.block = 16
    x = torch.randn(2, 4, 48, requires_grad=True)  # any leading dimensions: tokens of a batch
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_dynamic_errors():
    with pytest.raises(QatkdError, match="int8"):
        make_quantizer("dynamic", 4)
    with pytest.raises(QatkdError) as error:
        make_quantizer("dynamic", 8, (4, 64), 32)
    assert str(error.value) == (
        "the dynamic method quantizes activations only; set quant.act_method=dynamic and another "
        "weight method"
    )
    q = make_quantizer("dynamic", 8)
    with pytest.raises(QatkdError) as error:
        q(torch.randn(2, 32))
    assert str(error.value) == "a dynamic activation quantizer is used before prepare set its block"
    with pytest.raises(QatkdError, match="no stored scale"):
        _ = q.scale


@pytest.mark.parametrize(
    ("inputs", "block"), [(512, 256), (128, 128), (576, 64), (192, 64), (96, 32), (48, 16)]
)
def test_matmul_nbits_block_is_the_largest_power_of_two_dividing_a_group(inputs, block):
    assert matmul_nbits_block(inputs) == block


def test_matmul_nbits_block_refuses_groups_it_cannot_hold():
    with pytest.raises(QatkdError) as error:
        matmul_nbits_block(40)
    assert str(error.value) == (
        "weight groups of 40 inputs are not a multiple of 16: MatMulNBits' blocks (16 to 256 "
        "weights, powers of two) cannot hold them without changing trained values; set "
        "quant.group_size to a multiple of 16"
    )


def test_a_group_quantizer_counts_group_size_weights_per_scale_even_with_a_narrow_last_group():
    """LSQ's gradient scale reads `numel_per_scale`: for groups it is `group_size`, not the mean
    group width (96 inputs in groups of 64: 64, where 96 / 2 groups would say 48)."""
    assert make_quantizer("lsq", 4, (2, 96), 64).numel_per_scale == 64
    assert make_quantizer("lsq", 4, (2, 128), 64).numel_per_scale == 64
    assert make_quantizer("lsq", 4, (3, 5, 2, 2)).numel_per_scale == 20


def group_bounds(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (min, max) of a [rows, inputs] weight, repeated over the group's inputs."""
    parts = w.split(group, dim=1)
    low = torch.cat([p.amin(1, keepdim=True).expand_as(p) for p in parts], dim=1)
    high = torch.cat([p.amax(1, keepdim=True).expand_as(p) for p in parts], dim=1)
    return low, high


@pytest.mark.parametrize("method", ("minmax", "lsq"))
@pytest.mark.parametrize("bits", BITS)
def test_an_asymmetric_group_spans_its_min_to_its_max(method, bits):
    """72 inputs in groups of 32 (the last 8 wide): code 0 is each group's min exactly, the top
    code its max, the rest round to nearest on (max - min) / (2^b - 1); the output is
    codes * scale + offset bitwise."""
    torch.manual_seed(bits)
    w = torch.randn(5, 72) + torch.linspace(-1, 2, 72)  # groups off-centre
    q = make_quantizer(method, bits, w.shape, group_size=32, asymmetric=True)
    out = q(w)
    low, high = group_bounds(w, 32)
    top = 2**bits - 1
    scale = (high - low) / top
    assert q.qrange == (0, top) and q.granularity == "group32+offset"
    assert torch.equal(q.offset, low) and torch.equal(q.scale, scale)
    codes = q.quantize_int(w)
    assert torch.equal(codes, torch.clamp(torch.round((w - low) / scale), 0, top))
    assert torch.equal(out, codes * q.scale + q.offset)
    assert torch.equal(out[w == low], w[w == low])  # each group's min is on the grid
    torch.testing.assert_close(out[w == high], w[w == high])
    with pytest.raises(QatkdError, match=r"has a float offset \(`offset`\), no zero point"):
        q.zero_point  # noqa: B018


def test_asymmetric_lsq_learns_its_step_and_offset_as_lsq_plus():
    """d/ds: round(v) - v inside the range, 0 below (code 0), Q_p above; d/dbeta: 1 where the
    value is clipped, 0 inside (the codes move with it); both scaled by 1/sqrt(N Q_p)."""
    x = torch.tensor([[-3.0, -0.9, -0.2, 0.35, 0.8, 1.3, 2.6, 9.0] * 4])
    q = LSQQuantizer(2, x.shape, group_size=32, asymmetric=True)  # codes 0..3
    q.init_from(x)
    with torch.no_grad():
        q.step.fill_(0.5)
        q.beta.fill_(-1.0)
    x.requires_grad_()
    upstream = torch.arange(1.0, 33.0).reshape(1, 32)
    (q(x) * upstream).sum().backward()
    g = 1 / math.sqrt(32 * 3)
    ds, dbeta, dx = 0.0, 0.0, []
    for xi, ui in zip(x.detach()[0].tolist(), upstream[0].tolist(), strict=True):
        v = (xi + 1.0) / 0.5
        if v <= 0:
            dbeta, dx = dbeta + ui, [*dx, 0.0]
        elif v >= 3:
            ds, dbeta, dx = ds + ui * 3, dbeta + ui, [*dx, 0.0]
        else:
            ds, dx = ds + ui * (round(v) - v), [*dx, ui]
    torch.testing.assert_close(q.step.grad, torch.tensor([[ds * g]]))
    torch.testing.assert_close(q.beta.grad, torch.tensor([[dbeta * g]]))
    torch.testing.assert_close(x.grad, torch.tensor([dx]))


@pytest.mark.parametrize("asymmetric", (False, True))
def test_lsq_with_a_minmax_start_starts_at_rtn(asymmetric):
    """`minmax_start` (quant.init): LSQ's first grid is min-max's, so its first output is RTN's,
    where the paper's start clips the outlier of a spiky group."""
    torch.manual_seed(0)
    w = torch.randn(4, 64) * 0.02
    w[0, 3] = 0.5  # an outlier
    rtn = make_quantizer("minmax", 4, w.shape, 32, asymmetric)(w)
    lsq = make_quantizer("lsq", 4, w.shape, 32, asymmetric)
    lsq.minmax_start = True
    assert torch.equal(lsq(w), rtn)
    if not asymmetric:  # the paper's start differs where a group has an outlier
        assert not torch.equal(make_quantizer("lsq", 4, w.shape, 32)(w), rtn)


def test_float16_offsets_keep_their_sign():
    """A format's float16 grid rounds the offsets too, without the scales' positive floor."""
    torch.manual_seed(0)
    w = torch.randn(3, 64) - 0.3
    q = make_quantizer("minmax", 4, w.shape, group_size=32, asymmetric=True)
    q.float16_scale = True
    out = q(w)
    low = w.reshape(3, 2, 32).amin(-1)
    assert (low < 0).all() and torch.equal(q.offset[:, ::32], low.half().float())
    assert torch.equal(out, q.quantize_int(w) * q.scale + q.offset)


def test_asymmetric_grid_errors():
    message = r"^an asymmetric grid \(quant\.asymmetric\) takes the minmax or lsq method, not pact$"
    with pytest.raises(QatkdError, match=message):
        make_quantizer("pact", 4, (4, 64), 32, asymmetric=True)
    for shape, group in (((4, 64), None), (None, None)):  # per channel, activations
        with pytest.raises(QatkdError, match=r"is for grouped Linear weights \(quant.group_size\)"):
            make_quantizer("lsq", 4, shape, group, asymmetric=True)


@pytest.mark.parametrize(
    ("low", "high", "zero", "reach"),
    [
        (-1.0, 3.0, 64, 3 / 191),  # 255 * 1 / 4 = 63.75 -> 64; the top end binds
        (-0.28, 6.0, 12, 6 / 243),  # SiLU's range: 11.37 -> 12 (even)
        (0.0, 2.0, 0, 2 / 255),  # non-negative: the unsigned grid
        (-2.0, 0.0, 254, 2 / 254),  # non-positive: 254.99 -> 254 (even)
        (-255.0, 0.0, 254, 255 / 254),  # exactly 255 -> 256 (half to even) -> 254 (at most 2^b - 2)
        (-0.0159, 2.0, 2, 0.0159 / 2),  # 2.01 -> 2; the bottom end binds
        (-0.00786, 2.0, 0, 2 / 255),  # 0.99 -> 0: negatives clip at 0 and widen nothing
        (0.5, 2.0, 0, 2 / 255),  # widened to hold 0
    ],
)
def test_a_grid_with_a_zero_point_holds_its_range_on_an_even_zero_code(low, high, zero, reach):
    """z = -low / ((high - low) / 255) rounded to an even integer; the scale is the smallest
    that reaches both ends from z (`reach`, by hand), rounded up to a power of 1 + 2^-10."""
    scale, z = grid_with_zero_point(torch.tensor(low), torch.tensor(high), 8)
    assert int(z) == zero
    assert reach <= float(scale) <= reach * SCALE_RATIO * (1 + 1e-6)
    power = math.log(float(scale)) / math.log(SCALE_RATIO)
    assert abs(power - round(power)) < 1e-3  # on the ratio's powers
    # idempotent: the grid of its own codes' range is itself
    again = grid_with_zero_point(-z * scale, (255 - z) * scale, 8)
    assert torch.equal(again[0], scale) and torch.equal(again[1], z)


@pytest.mark.parametrize("method", ["minmax", "lsq"])
def test_a_zero_point_grid_quantizes_onto_shifted_codes(method):
    q = make_quantizer(method, 8, zero_point_grid=True)
    q.init_from(torch.tensor([-0.28, 6.0]))
    scale, zero = grid_with_zero_point(torch.tensor(-0.28), torch.tensor(6.0), 8)
    assert torch.equal(q.scale, scale) and q.qrange == (-int(zero), 255 - int(zero))
    assert q.granularity == "tensor+zero_point"
    x = torch.linspace(-1.0, 7.0, 97)
    out = assert_exact(q.eval(), x)
    expected = torch.clamp(torch.round(x / scale), -zero, 255 - zero) * scale
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    restored = make_quantizer(method, 8, zero_point_grid=True)
    restored.load_state_dict(q.state_dict())  # the zero code is state
    assert restored.qrange == q.qrange


def test_minmax_zero_point_grid_tracks_min_and_max():
    q = make_quantizer("minmax", 8, zero_point_grid=True)
    q.calibrating = True
    q(torch.tensor([-0.5, 1.0]))
    q(torch.tensor([-0.25, 3.0]))
    assert (float(q.running_min), float(q.running_max)) == (-0.5, 3.0)
    q.calibrating = False
    q.train()(torch.tensor([-1.5, 1.0]))  # EMA, momentum 0.1
    assert float(q.running_min) == pytest.approx(-0.6)
    assert float(q.running_max) == pytest.approx(2.8)
    assert q.qrange[0] == -int(grid_with_zero_point(q.running_min, q.running_max, 8)[1])


def test_lsq_zero_point_grid_learns_its_step_and_keeps_its_zero_code():
    q = make_quantizer("lsq", 8, zero_point_grid=True)
    q.init_from(torch.tensor([-1.0, 3.0]))
    assert q.qrange == (-64, 191)
    x = torch.tensor([-2.0, 0.5, 4.0])  # below, inside, above the range
    q(x).sum().backward()
    # LSQ+: d/ds of the clamped ends is the end code, inside round(x/s) - x/s; scaled by
    # 1 / sqrt(N * (2^b - 1)), N = 3 features
    s = float(q.step)
    inside = round(0.5 / s) - 0.5 / s
    expected = (-64 + inside + 191) / math.sqrt(3 * 255)
    assert float(q.step.grad) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        q.step.mul_(2)
    assert q.qrange == (-64, 191)


def test_a_zero_point_grid_is_for_activations_of_minmax_or_lsq():
    message = r"^quant\.act_grid takes the minmax or lsq method, not pact$"
    with pytest.raises(QatkdError, match=message):
        make_quantizer("pact", 8, zero_point_grid=True)
    message = (
        r"^a grid with a zero point \(quant\.act_grid\) is for activations, with the minmax or "
        r"lsq method$"
    )
    with pytest.raises(QatkdError, match=message):
        make_quantizer("minmax", 8, (4, 4), zero_point_grid=True)
