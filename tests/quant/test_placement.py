"""Quantizers where the integer graph quantizes (`quant.placement`, `quant.sites`): which tensors
get one, where it sits, what it shares, and that the model runs them in training as in eval."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

from qatkd.nn import Attention, QuantPoint
from qatkd.quant import (
    QuantAct,
    QuantConfig,
    QuantHardswish,
    Quantizer,
    QuantLinear,
    QuantSiLU,
    calibrate,
    prepare,
)
from qatkd.quant.placement import place_quantizers
from qatkd.quant.quantizers import LSQQuantizer
from qatkd.quant.sites import InputSite, OutputSite, carrier, input_sites, output_sites
from qatkd.quant.tensors import share_tensor_quantizers, trace


def sites_of(model: nn.Module) -> list[str]:
    """The paths of the QuantActs that module boundaries hold."""
    return [n for n, m in model.named_modules() if n.endswith((".quant_output", ".quant_input"))]


class Residual(nn.Module):
    """A residual add of two module outputs, read by a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.body(x) + x).flatten(1)


def test_both_operands_of_an_add_are_quantized_on_their_modules_and_the_sum_by_its_reader():
    model = prepare(Residual(), QuantConfig(bits="W4A4", first_last_bits=None))
    assert sites_of(model) == ["stem.1.quant_output", "body.1.quant_output"]  # last children
    # the stem's output is the add's operand and the body conv's input: one 8-bit quantizer
    assert model.stem[1].quant_output.quantizer is model.body[0].input_quantizer
    assert model.body[0].input_quantizer.bits == 8
    # the sum is quantized by the head that reads it, at the activation bits
    assert model.head.input_quantizer.bits == 4


def test_a_boundary_quantizer_runs_once_per_forward_in_training_and_once_in_the_trace():
    model = prepare(Residual(), QuantConfig(bits="W8A8", method="lsq"))
    quantizer = model.body[1].quant_output.quantizer
    calls = []
    quantizer.register_forward_hook(lambda m, i, o: calls.append(o))
    x = torch.randn(2, 3, 6, 6)
    model.train()(x).sum().backward()
    assert len(calls) == 1 and quantizer.step.grad is not None
    gm = trace(model.eval())
    assert not any(output_sites(m) or input_sites(m) for m in gm.modules())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets.count("body.1.quant_output") == 1
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_a_copy_and_a_fresh_prepared_model_carry_their_own_boundary_quantizers():
    model = prepare(Residual(), QuantConfig(bits="W8A8", method="lsq"))
    calibrate(model, [torch.randn(4, 3, 6, 6)], 4)
    x = torch.randn(2, 3, 6, 6)
    twin = copy.deepcopy(model)
    (hook,) = [h for h in twin.body[1]._forward_hooks.values() if isinstance(h, OutputSite)]
    assert hook.act is twin.body[1].quant_output  # not the original's
    fresh = prepare(Residual(), QuantConfig(bits="W8A8", method="lsq"))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    with torch.no_grad():
        twin.body[1].quant_output.quantizer.step.mul_(4)
    assert not torch.equal(twin.eval()(x), model(x))


class Concat(nn.Module):
    """A ReLU branch and a `signed` one (or another ReLU branch), concatenated, read by a conv."""

    def __init__(self, signed: bool) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        tail = [] if signed else [nn.ReLU()]
        self.b = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), *tail)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1)).flatten(1)


@pytest.mark.parametrize("signed", [True, False], ids=["signed-branch", "relu-branches"])
def test_a_concatenations_inputs_and_output_share_one_quantizer_signed_unless_non_negative(
    signed,
):
    model = prepare(Concat(signed), QuantConfig(bits="W8A8"))
    ends = [model.a[2], model.b[-1]]
    assert sites_of(model) == ["a.2.quant_output", f"b.{len(model.b) - 1}.quant_output"]
    shared = model.head.input_quantizer
    assert all(end.quant_output.quantizer is shared for end in ends)
    assert shared.signed == signed  # before any data: a branch without ReLU may be negative
    calibrate(model, [torch.rand(4, 3, 4, 4)], 4)
    assert shared.signed == signed  # and the ReLU branch it saw first does not change it


def test_a_calibrated_shared_quantizer_keeps_its_sign_when_its_tensors_are_shared_again():
    model = prepare(Concat(signed=True), QuantConfig(bits="W8A8"))
    calibrate(model, [torch.rand(4, 3, 4, 4)], 4)
    shared = model.head.input_quantizer
    shared.is_signed.fill_(False)  # as a checkpoint may hold it
    share_tensor_quantizers(model)
    assert model.head.input_quantizer is shared and not shared.signed


class ConcatOf(nn.Module):
    """A ReLU branch concatenated with `branch(self, x)`, read by a conv."""

    def __init__(self, branch: Any) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.conv, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.branch = branch
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.branch(self, x)], 1)).flatten(1)


@pytest.mark.parametrize(
    "branch, signed",
    [
        (lambda m, x: torch.relu(m.conv(x)), False),
        (lambda m, x: F.max_pool2d(F.relu(m.conv(x)), 1), False),
        (lambda m, x: F.max_pool2d(m.conv(x), 1), True),
        (lambda m, x: m.conv2(F.relu(m.conv(x))), True),
    ],
    ids=["relu-call", "pooled-relu", "pooled-conv", "conv-of-relu"],
)
def test_a_concatenation_is_unsigned_where_each_input_is_non_negative_by_its_ops(branch, signed):
    """A ReLU called as a function makes its output non-negative, pooling keeps its input's
    sign, and a conv makes any sign of a non-negative input."""
    model = prepare(ConcatOf(branch), QuantConfig(bits="W8A8"))
    assert model.head.input_quantizer.signed == signed


class Learned(nn.Module):
    """A learned tensor of a given shape: it depends on no input, so it is no activation."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, shape: torch.Size) -> torch.Tensor:
        return self.p.expand(shape)


class Ops(nn.Module):
    """`body(self, x)` over two convs, a GELU, a ReLU, a learned tensor, a BatchNorm, a float
    op of two tensors (nn.Bilinear, traced as a leaf) and a QuantPoint, read by a conv (placement
    runs on the trace only: no shapes are checked; concatenations join along the height)."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.act, self.relu, self.learned = nn.GELU(), nn.ReLU(), Learned()
        self.norm, self.mix = nn.BatchNorm2d(4), nn.Bilinear(4, 4, 4)
        self.point = QuantPoint()
        self.body = body
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self, x)).flatten(1)


def _added_learned(m: Ops, x: torch.Tensor) -> torch.Tensor:
    y = m.act(m.a(x))
    return m.norm(y + m.learned(y.shape))


def _joined_learned(m: Ops, x: torch.Tensor) -> torch.Tensor:
    y = m.act(m.a(x))
    return torch.cat([y, m.learned(y.shape)], 2)


def _added_reshaped(m: Ops, x: torch.Tensor) -> torch.Tensor:
    a, b = m.a(x), m.b(x)
    return a.reshape(b.shape) + b.reshape(a.shape)


def _added_to_joined(m: Ops, x: torch.Tensor) -> torch.Tensor:
    joined = torch.cat([m.a(x), m.b(x)], 2)
    return m.norm(joined + m.act(joined))


def _sum_read_second(m: Ops, x: torch.Tensor) -> torch.Tensor:
    a, b = m.a(x), m.b(x)
    return m.mix(a, a + b)


def _chunks_added(m: Ops, x: torch.Tensor) -> torch.Tensor:
    top, bottom = torch.chunk(m.a(x), 2, dim=2)
    return m.norm(top + bottom)


def _chunk_normed_added(m: Ops, x: torch.Tensor) -> torch.Tensor:
    top, bottom = torch.chunk(m.a(x), 2, dim=2)
    return m.norm(top) + bottom


def _sum_read_twice(m: Ops, x: torch.Tensor) -> torch.Tensor:
    total = m.a(x) + m.b(x)
    read = m.act(total)  # its first reader
    return read + m.head(total.contiguous())


def _sum_read_and_chunked(m: Ops, x: torch.Tensor) -> torch.Tensor:
    total = m.a(x) + m.b(x)
    read = m.act(total)  # its first reader
    top, bottom = torch.chunk(total, 2, dim=2)
    return read + m.head(top) + m.head(bottom)


def _joined_then_added_after_another_rule(m: Ops, x: torch.Tensor) -> torch.Tensor:
    joined = torch.cat([m.a(x), m.b(x)], 2)
    gate = m.norm(torch.sigmoid(m.act(x)))  # a rule between the concatenation and the add
    return m.mix(joined + m.relu(joined), gate)


def _add_relu_reshape(m: Ops, x: torch.Tensor) -> torch.Tensor:
    a, b = m.a(x), m.b(x)
    return F.gelu(m.relu(a + b).reshape(a.shape))


A, B = "a.quant_output", "b.quant_output"


@pytest.mark.parametrize(
    "body, expected",
    [
        pytest.param(lambda m, x: m.norm(torch.tanh(m.a(x))), [A], id="a float function"),
        pytest.param(lambda m, x: m.norm(m.a(x) - m.b(x)), [A, B], id="a difference"),
        pytest.param(_added_learned, [A], id="an add of a learned tensor"),
        pytest.param(
            lambda m, x: torch.cat([m.act(m.a(x)), m.b(x)], 2),
            [A, B, "act.quant_output"],
            id="a concatenation",
        ),
        pytest.param(lambda m, x: torch.cat([m.act(m.a(x))], 2), [A], id="a concatenation of one"),
        pytest.param(_joined_learned, [A], id="a concatenation of a learned tensor"),
        pytest.param(
            lambda m, x: m.norm(torch.cat([m.a(x), m.b(x)], 2)),
            [A, B],
            id="a concatenation read by a float module",
        ),
        pytest.param(_added_reshaped, [A, B], id="an add of reshaped operands"),
        pytest.param(
            lambda m, x: m.norm(torch.sigmoid(m.a(x))),
            [A, "norm.quant_input"],
            id="a sigmoid function",
        ),
        pytest.param(
            _add_relu_reshape,
            [A, B, "relu.quant_output"],
            id="an add read through a ReLU and a reshape",
        ),
        pytest.param(lambda m, x: m.point(m.a(x)) + m.b(x), [B], id="an add of a quantized tensor"),
        pytest.param(
            _added_to_joined,
            [A, B, "act.quant_output", "norm.quant_input"],
            id="an add of a concatenation",
        ),
        pytest.param(_sum_read_second, [A, B], id="a sum read as a second input"),
        pytest.param(_chunks_added, [A, "norm.quant_input"], id="an add of two chunks"),
        pytest.param(
            _chunk_normed_added,
            [A, "norm.quant_output"],
            id="an add of a chunk and a module's output",
        ),
        pytest.param(
            _sum_read_twice,
            [A, B, "act.quant_input"],
            id="a sum read by a float module and, made contiguous, by a layer",
        ),
        pytest.param(
            _sum_read_and_chunked,
            [A, B, "act.quant_input"],
            id="a sum read by a float module and, chunked, by a layer",
        ),
        pytest.param(
            _joined_then_added_after_another_rule,
            [A, B, "act.quant_output", "relu.quant_output", "norm.quant_input", "mix.quant_input"],
            id="an add of a concatenation after another rule",
        ),
    ],
)
def test_only_the_ops_with_an_integer_kernel_quantize_where_their_tensors_have_a_boundary(
    body, expected
):
    """Ops with no integer kernel stay float (only the conv outputs they read are quantized), as
    do adds and concatenations of a tensor that is no activation; a concatenation's output is
    its inputs' codes; a tensor is quantized on the best of the nodes that hold it."""
    model = prepare(Ops(body), QuantConfig(bits="W8A8"))
    assert sites_of(model) == expected


class Gated(nn.Module):
    """A squeeze-excite block (torchvision's: pooling, two 1x1 convs, sigmoid, product) between
    two convs, and SiLU activations as modules and as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.se = SqueezeExcitation(8, 4, activation=nn.SiLU, scale_activation=nn.Sigmoid)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.head(self.se(self.stem(x)))).mean((2, 3))


def test_squeeze_excite_and_silu_are_quantized_as_integer_sigmoid_and_products():
    model = prepare(Gated(), QuantConfig(bits="W8A8"))
    assert isinstance(model.stem[2], QuantSiLU) and isinstance(model.se.activation, QuantSiLU)
    # the sigmoid's input (fc2's output) and output (the product's operand); the product's
    # other operand is the SiLU's output, which the pooling also reads: one quantizer
    assert sites_of(model) == [
        "stem.2.quant_output", "se.fc2.quant_output", "se.scale_activation.quant_output",
    ]  # fmt: skip
    assert model.stem[2].quant_output.quantizer is model.se.avgpool.input_quantizer
    # the product is read by the head; the SiLU function after it and the mean stay float:
    # nothing after them is quantized
    x = torch.randn(2, 3, 5, 5)
    calibrate(model, [x], 2)
    silu = model.stem[2].eval()
    with torch.no_grad():
        inner = model.stem[1](model.stem[0](x))
        x_q = silu.input_quantizer(inner)
        product = x_q * silu.gate_quantizer(torch.sigmoid(x_q))
        assert torch.equal(silu(inner), silu.quant_output(product))  # and its output hook


def test_hardswish_and_a_hardsigmoid_gate_are_quantized_like_silu_and_sigmoid():
    """MobileNetV3's blocks: each Hardswish becomes a QuantHardswish (its input and its
    hardsigmoid quantized), the squeeze-excite Hardsigmoid gets its input and output quantized;
    `quant.skip` leaves a Hardswish float, its conv's output quantized for it."""
    block = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Hardswish(),
        SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid),
        nn.Conv2d(8, 8, 1),
        nn.Hardswish(),
        nn.Conv2d(8, 4, 1),
    )
    model = prepare(copy.deepcopy(block), QuantConfig(bits="W8A8", first_last_bits=None))
    assert isinstance(model[1], QuantHardswish) and isinstance(model[4], QuantHardswish)
    assert sites_of(model) == [
        "1.quant_output", "2.fc2.quant_output", "2.scale_activation.quant_output",
    ]  # fmt: skip
    x = torch.randn(2, 3, 5, 5) * 4
    calibrate(model, [x], 2)
    hardswish = model[1].eval()
    with torch.no_grad():
        inner = model[0](x)
        x_q = hardswish.input_quantizer(inner)
        product = x_q * hardswish.gate_quantizer(F.hardsigmoid(x_q))
        assert torch.equal(hardswish(inner), hardswish.quant_output(product))
    skipped = prepare(copy.deepcopy(block), QuantConfig(bits="W8A8", skip=["4"]))
    assert type(skipped[4]) is nn.Hardswish and "3.quant_output" in sites_of(skipped)


def test_ops_whose_result_reaches_no_quantized_layer_stay_float():
    """A detector's raw outputs: the conv before the output and a concatenation of outputs."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.box = nn.Conv2d(3, 4, 1)
            self.cls = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.box(x), self.cls(x)], 1).sigmoid()

    assert sites_of(prepare(Heads(), QuantConfig(bits="W8A8"))) == []


class Block(nn.Module):
    """torchvision's BasicBlock calls one ReLU module twice: its boundary is no place for a
    quantizer, the block's is."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(self.relu(x))) + x)


def test_a_module_called_twice_passes_its_boundary_to_the_module_around_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Block(), Block(), nn.Conv2d(4, 2, 1))
    prepare(model, QuantConfig(bits="W8A8"))
    # the adds' operands: the stem's output, each block's BatchNorm, and the first block's
    # output (its ReLU's, had that ReLU run once)
    expected = ["0.quant_output", "1.bn.quant_output", "1.quant_output", "2.bn.quant_output"]
    assert sites_of(model) == expected


def test_skipped_modules_hold_no_quantizer_and_their_op_stays_float():
    model = prepare(Residual(), QuantConfig(bits="W8A8", skip=["*.1"]))
    assert sites_of(model) == []


def test_a_container_passes_its_boundary_to_its_last_or_first_child_or_has_none():
    class Dict(nn.ModuleDict):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity())), Dict())
    assert carrier(model, "0", "output") == "0.1.0"
    assert carrier(model, "0", "input") == "0.0"
    assert carrier(model, "1", "output") is None


def test_a_reader_module_takes_the_quantizer_where_the_tensor_has_no_module_of_its_own():
    """A product computed inside a forward, read by a BatchNorm: its pre-hook quantizes it."""

    class Product(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.norm = nn.BatchNorm2d(4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.a(x) * self.b(x))).flatten(1)

    model = prepare(Product(), QuantConfig(bits="W8A8"))
    assert sites_of(model) == ["a.quant_output", "b.quant_output", "norm.quant_input"]
    (hook,) = model.norm._forward_pre_hooks.values()
    assert isinstance(hook, InputSite) and hook.act is model.norm.quant_input
    x = torch.randn(2, 3, 4, 4)
    calibrate(model, [x], 2)
    seen = []
    model.norm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        model.eval()(x)
        product = model.a.quant_output(model.a(x)) * model.b.quant_output(model.b(x))
    assert torch.equal(seen[0], model.norm.quant_input(product))


def test_an_input_site_quantizes_the_first_input_and_passes_the_others_as_they_are():
    act = QuantAct(LSQQuantizer(2))  # signed: codes -2..1
    act.quantizer.init_from(torch.tensor([-1.0, 1.0]))
    with torch.no_grad():
        act.quantizer.step.fill_(0.5)
    x, mask, scale = torch.tensor([0.3, -0.9]), torch.tensor([1.0, 0.0]), 3.0
    quantized, *rest = InputSite(act)(nn.Identity(), (x, mask, scale))
    assert torch.equal(quantized, torch.tensor([0.5, -1.0])) and rest == [mask, scale]


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(bits="W4A16"),
        QuantConfig(bits="W8A8", act_method="dynamic", weight_method="lsq"),
    ],
    ids=["float-activations", "dynamic"],
)
def test_no_quantizer_is_placed_where_activations_have_no_fixed_scale(config):
    model = nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 4))
    prepare(model, config)
    assert type(model[1]) is nn.SiLU and sites_of(model) == []
    assert not any(isinstance(m, QuantAct) for m in model.modules())


class AttentionBlock(nn.Module):
    """A ViT block's attention."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(*[self.norm(x)] * 3, need_weights=False)[0])


def test_multihead_attention_is_split_so_that_its_matmuls_read_quantized_operands():
    """The projections are quantized Linear layers reading one quantized input, and the query,
    key, value and probabilities are quantized."""
    float_model = AttentionBlock().eval()
    model = prepare(copy.deepcopy(float_model), QuantConfig(bits="W8A8"))
    attention = model.attention
    assert isinstance(attention, Attention)
    projections = [attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj]
    assert all(isinstance(p, QuantLinear) for p in projections)
    assert attention.q_proj.input_quantizer is attention.v_proj.input_quantizer
    points = ["q_point", "k_point", "v_point", "probs_point"]
    assert all(isinstance(getattr(attention, p), QuantAct) for p in points)
    x = torch.randn(2, 5, 16)
    for m in model.modules():  # the float computation: quantizers as identities
        if isinstance(m, Quantizer):
            m.forward = lambda t: t
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), float_model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(bits="W8A8", skip=["attention"]),
        QuantConfig(bits="W8A8", act_method="dynamic", weight_method="lsq"),
    ],
    ids=["skipped", "dynamic"],
)
def test_attention_stays_whole_where_skipped_or_without_fixed_activation_scales(config):
    model = prepare(AttentionBlock(), config)
    assert type(model.attention) is nn.MultiheadAttention


def test_each_placed_quantizer_is_made_under_the_name_of_its_place():
    model = nn.Sequential(Residual(), nn.SiLU(), nn.Linear(4, 2))
    prepare(model, QuantConfig(bits="W8A16"))  # the layers only: nothing placed yet
    names: list[str] = []

    def make(name: str) -> Quantizer:
        names.append(name)
        return LSQQuantizer(8)

    place_quantizers(model, make, lambda name: False)
    assert names == ["1.input", "1.gate", "0.stem.1.output", "0.body.1.output"]
    assert sites_of(model) == ["0.stem.1.quant_output", "0.body.1.quant_output"]


class SumBlock(nn.Module):
    """A block fx traces through (not a leaf) whose output is a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class Squared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.norm, self.head = SumBlock(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return self.head(self.norm(y * y)).flatten(1)


def test_the_trace_quantizes_on_each_boundary_once_where_the_model_does():
    """A leaf's input site is a QuantAct node before it; a traced-through module's output site
    is one QuantAct node after its last op."""
    model = prepare(Squared(), QuantConfig(bits="W8A8"))
    assert sites_of(model) == [
        "block.a.quant_output",
        "block.b.quant_output",
        "block.quant_output",
        "norm.quant_input",
    ]
    called = [n.target for n in trace(model).graph.nodes if n.op == "call_module"]
    assert called == [
        "block.a",
        "block.a.quant_output",
        "block.b",
        "block.b.quant_output",
        "block.quant_output",
        "norm.quant_input",
        "norm",
        "head",
    ]


class PooledWithIndices(nn.Module):
    """A conv's max pooling that returns its indices, added to a strided conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 4, 1), nn.MaxPool2d(2, return_indices=True)
        self.strided, self.norm = nn.Conv2d(3, 4, 1, stride=2), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.pool(self.conv(x))
        return self.head(self.norm(pooled + self.strided(x))).flatten(1)


def test_a_max_pooling_that_returns_its_indices_is_no_place_for_a_quantizer():
    """Its output is a tuple: the conv's output before it is quantized instead. The pooled
    tensor, taken from the tuple, holds no value of the conv's output and has no boundary of
    its own: the add stays float."""
    model = prepare(PooledWithIndices(), QuantConfig(bits="W8A8"))
    assert sites_of(model) == ["conv.quant_output", "strided.quant_output"]
    calibrate(model, [torch.randn(2, 3, 4, 4)], 2)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 8)
