"""`qatkd export` / `qatkd bench` (`pipeline.export`, `pipeline.bench`) on a tiny run folder,
and the errors users can cause."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatkd.checkpoint import save_checkpoint
from qatkd.config import build_config, config_to_dict
from qatkd.errors import QatkdError
from qatkd.export import INPUT_NAME, as_exported, class_names_of, load_qpack, to_onnx
from qatkd.export.bias_grid import bias_scale
from qatkd.export.frozen import FrozenLinear
from qatkd.export.runtime import ort_session
from qatkd.pipeline import bench, export
from qatkd.quant import QuantConfig, Quantizer, calibrate, prepare
from qatkd.tasks.classification.models import build_model
from qatkd.tasks.image import model_meta


def _run_folder(tmp_path, npz_root, quant: QuantConfig | None):
    """A run folder as `qatkd ptq` leaves it: a checkpoint of a resnet8 on the 3-class npz data."""
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 3, [0.2], [0.3])
    meta = model_meta("resnet8", 1, 12, ["a", "b", "c"], [0.2], [0.3])
    if quant is not None:
        prepare(model, quant)
        calibrate(model, [torch.rand(16, 1, 12, 12)], 16)
        meta["quant"] = quant.model_dump(mode="json")
    config = build_config({"data": {"name": "npz", "root": str(npz_root)}})
    run = tmp_path / "run"
    save_checkpoint(
        {"meta": meta, "config": config_to_dict(config), "model": model.state_dict()},
        run / "last.pt",
    )
    return run


def test_export_and_bench_a_run_folder(tmp_path, npz_root):
    run = _run_folder(tmp_path, npz_root, QuantConfig(bits="W4A4"))
    result = export(run)
    for name in ("model.int8.onnx", "model.fp32.onnx", "model.qpack", "parity.json"):
        assert (run / name).is_file(), name
    assert result["parity"]["onnxruntime"]["samples"] == 24
    assert result["parity"]["onnxruntime"]["agreement"] == 100.0
    codes = result["parity"]["onnxruntime"]
    assert codes["codes_compared"] > 0 and codes["code_mismatch_rate"] < 0.1
    assert codes["code_first_mismatch_max_diff"] <= 1
    assert result["integer_kernels"]["QLinearConv"] >= 1
    assert class_names_of(onnx.load(str(run / "model.int8.onnx"))) == ["a", "b", "c"]
    assert load_qpack(run / "model.qpack").meta["quant"]["bits"] == "W4A4"
    assert result["bytes"]["model.qpack"] < result["bytes"]["model.int8.onnx"]

    benched = bench(run, batch_sizes=(2,), repeats=2)
    kinds = {(r["backend"], r["precision"]) for r in benched["records"]}
    assert {("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")} <= kinds
    reference = ("onnxruntime", "fp32")  # the same network in FP32, same batch, same run
    fp32 = next(r for r in benched["records"] if (r["backend"], r["precision"]) == reference)
    for r in benched["records"]:
        assert r["batch"] == 2 and r["latency_ms"] > 0
        assert r["speedup"] == round(fp32["latency_ms"] / r["latency_ms"], 3)
    assert all(p["agreement"] == 100.0 for p in benched["parity"].values())
    assert json.loads((run / "bench.json").read_text())["records"] == benched["records"]
    assert "| onnxruntime | int8 | 2 |" in (run / "bench.md").read_text()


def test_fp32_checkpoint_is_refused(tmp_path, npz_root):
    run = _run_folder(tmp_path, npz_root, None)
    with pytest.raises(QatkdError, match=r"is not quantized: export needs a QAT/PTQ checkpoint"):
        export(run)


class _FloatAct(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = act
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


class _GeluCall(nn.Module):
    """GELU as a function call in a forward (its fx node is the call, not a module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="none")


@pytest.mark.parametrize(
    "act, op",
    [
        (nn.GELU(), "Gelu"),
        (_GeluCall(), "Gelu"),
        (nn.GELU(approximate="tanh"), "Tanh"),
        (nn.ELU(), "Elu"),
    ],
    ids=["gelu", "gelu call", "tanh gelu", "elu"],
)
def test_ops_without_an_integer_kernel_run_in_float_between_dq_and_q(tmp_path, act, op):
    """GELU is onnxruntime's fused float Gelu; what no handler writes (the tanh approximation,
    ELU) is torch.onnx's own float export. Either reads the conv's DequantizeLinear, and its
    output is quantized for the mean, an integer global pooling."""
    model = prepare(_FloatAct(act), QuantConfig(bits="W8A8"))
    x = torch.rand(4, 1, 8, 8)
    calibrate(model, [x], 4)
    proto = to_onnx(model.eval(), [1, 8, 8])
    producer = {out: node for node in proto.graph.node for out in node.output}
    readers = collections.defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            readers[name].append(node.op_type)
    float_op = [
        n
        for n in proto.graph.node
        if n.name.startswith(("act", "gelu")) and not n.name.startswith("act_quant_output")
    ]
    assert op in {n.op_type for n in float_op}
    made_here = {out for n in float_op for out in n.output}
    read = {i for n in float_op for i in n.input if i not in made_here and i in producer}
    assert {producer[i].op_type for i in read} <= {"DequantizeLinear", "Constant"}
    assert "DequantizeLinear" in {producer[i].op_type for i in read}
    pool = next(n for n in proto.graph.node if n.op_type == "GlobalAveragePool")
    act_q = producer[producer[pool.input[0]].input[0]]
    assert act_q.op_type == "QuantizeLinear" and act_q.name.startswith("act_quant_output")
    assert producer[act_q.input[0]] in float_op
    assert readers[pool.output[0]] == ["QuantizeLinear"]
    if op == "Gelu":  # one kernel where onnxruntime runs it, not Div, Erf, Add, Mul, Mul
        optimized = tmp_path / "optimized.onnx"
        ort_session(proto.SerializeToString(), optimized_path=optimized)
        ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
        assert ops["Gelu"] == 1 and ops["Erf"] == 0
    session = ort_session(proto.SerializeToString())
    with torch.no_grad():
        expected = as_exported(model, [1, 8, 8])(x).numpy()
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * np.abs(expected).max())
    fp32 = ort_session(to_onnx(model, [1, 8, 8], precision="fp32").SerializeToString())
    for m in model.modules():
        if isinstance(m, Quantizer) and not m.is_weight:
            m.forward = lambda t: t  # the FP32 graph: float activations, fake-quantized weights
    with torch.no_grad():
        expected = model(x).numpy()
    got = fp32.run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


class _Tokens(nn.Module):
    """A conv's pixels as rows of one batch (the batch merged into a dim), then back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows = self.conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
        return self.fc(rows).view(n, -1)


def test_a_reshape_that_merges_the_batch_follows_the_batch():
    """Its sizes at the example batch would be wrong at any other: torch.onnx writes it."""
    model = prepare(_Tokens(), QuantConfig(bits="W8A8"))
    calibrate(model, [torch.rand(4, 1, 6, 6)], 4)
    session = ort_session(to_onnx(model.eval(), [1, 6, 6]).SerializeToString())
    x = torch.rand(3, 1, 6, 6)
    with torch.no_grad():
        expected = as_exported(model, [1, 6, 6])(x).numpy()
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


class _Cumprod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.relu().cumprod(1))


def test_an_op_torch_onnx_cannot_write_is_named():
    model = prepare(_Cumprod(), QuantConfig(bits="W8A8"))
    calibrate(model, [torch.rand(4, 4)], 4)
    with pytest.raises(QatkdError, match=r"cannot export 'cumprod' \(graph node cumprod\)"):
        to_onnx(model.eval(), [4])


def test_untraceable_model_is_explained():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    model = prepare(Branchy(), QuantConfig(bits="W8A8"))
    calibrate(model, [torch.rand(4, 4)], 4)
    with pytest.raises(QatkdError, match="cannot trace Branchy"):
        to_onnx(model.eval(), [4])


def test_degenerate_layers_export_exactly():
    """A zero-initialised head (torchvision's ViT: codes that 2^7 would store, which is no
    int8) and a layer whose input was all zeros in calibration (a scale so fine that its bias
    has no int32 codes: it stays float) compute in onnxruntime what PyTorch computes."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # the ReLU's output, the second layer's input, is all zero
        model[2].bias.copy_(torch.tensor([0.5, -0.25, 1.0]))
        model[3].weight.zero_()
        model[3].bias.copy_(torch.tensor([0.3, -0.7]))
    prepare(model, QuantConfig(bits="W8A8", method="minmax"))
    x = torch.rand(8, 4)
    calibrate(model, [x], 8)
    session = ort_session(to_onnx(model.eval(), [4]).SerializeToString())
    with torch.no_grad():
        expected = as_exported(model, [4])(x).numpy()
    np.testing.assert_allclose(session.run(None, {INPUT_NAME: x.numpy()})[0], expected, atol=1e-6)


class _Declined(nn.Module):
    """Forms the integer handlers do not write: pooling to 2 x 2, an add with alpha."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.conv(x))
        return self.fc(torch.add(y, y.relu(), alpha=2).flatten(1))


def test_forms_a_handler_declines_are_exported_in_float():
    model = prepare(_Declined(), QuantConfig(bits="W8A8"))
    x = torch.rand(8, 1, 8, 8)
    calibrate(model, [x], 8)
    proto = to_onnx(model.eval(), [1, 8, 8])
    made = {n.name: n.op_type for n in proto.graph.node}
    assert made["pool_out0"] == "AveragePool" and made["add_Mul_output_0"] == "Mul"  # torch.onnx's
    with torch.no_grad():
        expected = as_exported(model, [1, 8, 8])(x).numpy()
    got = ort_session(proto.SerializeToString()).run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize(
    "codes", [2**30, 2**31 - 128, 2**31], ids=["int32", "overflowing sums", "past int32"]
)
def test_a_bias_is_int32_only_where_the_accumulator_holds_it_with_every_sum(codes):
    """A bias of 2^30 codes stays int32; one of 2^31 - 128 (an int32) plus the products of an
    input would wrap around the kernel's int32 accumulator, so it stays float, as one of 2^31
    codes (no int32) does: each computes the bias."""
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(4, 2)), QuantConfig(bits="W8A8", method="minmax"))
    x = torch.rand(8, 4)
    calibrate(model, [x], 8)
    grid = bias_scale(FrozenLinear(model[0], "0"))
    with torch.no_grad():
        model[0].bias.copy_(torch.from_numpy(grid * np.float32(codes)))
    proto = to_onnx(model.eval(), [4])
    bias_codes = [t for t in proto.graph.initializer if t.name == "0_bias_codes"]
    assert len(bias_codes) == (1 if codes == 2**30 else 0)
    session = ort_session(proto.SerializeToString())
    with torch.no_grad():
        expected = as_exported(model, [4])(x).numpy()
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
