"""The onnxruntime-genai folder: MatMulNBits kernels holding the student's codes, checked against
the fake-quantized student through onnxruntime and onnxruntime-genai themselves."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.export.qpack import PackedLayer
from qatkd.quant import QuantLinear
from qatkd.tasks.language.export import export_language, packed_linear
from qatkd.tasks.language.family import Loaded, build_student, language_quant
from qatkd.tasks.language.genai import (
    FLOAT_INPUT,
    GENAI_FOLDER,
    GENAI_MODEL,
    INT8_INPUT,
    GenaiLogits,
    build_genai,
    matmul_nbits,
    pack_codes,
    per_block,
)
from testdata import language_overrides

IDS = np.array([[5, 9, 17, 3, 40, 2, 33, 70]], dtype=np.int64)


def exported_student(
    tiny_lm: Path, text_files, out: Path, bits: str, group: int, *extra: str, genai: bool = True
):
    config = load_config(
        overrides=language_overrides(
            tiny_lm, text_files, f"quant.bits={bits}", f"quant.group_size={group}", *extra
        )
    )
    config = config.model_copy(update={"quant": language_quant(config.quant)})
    loaded = Loaded(config, training=False)
    student = build_student(config, loaded).eval()
    result = export_language({"meta": {}}, student, loaded.hf, loaded.tokenizer, out, genai=genai)
    return student, result


def test_codes_pack_low_bits_first_offset_by_the_default_zero_point():
    codes = np.array([[-8, 7, 0, 1, -1]], dtype=np.int8)
    packed = pack_codes(codes, bits=4, block=16)
    assert packed.shape == (1, 1, 8)
    # stored codes 0, 15, 8, 9, 7, then zero-point padding (8) up to the block of 16
    assert packed[0, 0].tolist() == [0xF0, 0x98, 0x87, 0x88, 0x88, 0x88, 0x88, 0x88]
    two = pack_codes(np.array([[-2, 1, 0, -1]], dtype=np.int8), bits=2, block=16)
    assert two[0, 0, 0] == 0b01_10_11_00 and two.shape == (1, 1, 4)


HEAD_8 = ("quant.skip=[]", "quant.layer_weight_bits={'*lm_head': 8}")
MIXED = ("quant.skip=[]", "quant.layer_weight_bits={'*lm_head': 8, '*down_proj': 2}")


DYNAMIC = ("quant.act_method=dynamic", *HEAD_8)
ASYMMETRIC = ("quant.asymmetric=true", "quant.method=lsq")


def nbits_attribute(graph, name: str) -> set[int]:
    """The values the graph's MatMulNBits nodes give the integer attribute `name`."""
    return {
        a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == name
    }


@pytest.mark.parametrize(
    ("bits", "extra", "widths"),
    [
        ("W2A16", (), {"2": 2}),
        ("W3A16", MIXED, {"2": 2, "3": 4, "8": 8}),
        ("W4A8", DYNAMIC, {"4": 4, "8": 8}),
        ("W4A16", ASYMMETRIC, {"4": 4}),
    ],
)
def test_genai_graph_computes_the_students_logits(
    tiny_lm, text_files, tmp_path, bits, extra, widths
):
    """W2 in 2-bit blocks, float head; W3 in 4-bit blocks beside W2 layers in 2-bit blocks and
    the 8-bit head untied from the float embedding; W4 with int8 inputs in the int8 kernels
    (accuracy_level 4), head included; W4 asymmetric (learned grids) with float zero points."""
    student, result = exported_student(tiny_lm, text_files, tmp_path, bits, 32, *extra)
    folder = tmp_path / GENAI_FOLDER
    graph = onnx.load(str(folder / GENAI_MODEL), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    nbits_inputs = {len(n.input) for n in graph.node if n.op_type == "MatMulNBits"}
    assert nbits_inputs == {4 if extra == ASYMMETRIC else 3}  # zero points: the 4th input
    head = int("quant.skip=[]" in extra)  # qkv, o, gate, up, down per layer, and the head
    assert (ops["MatMulNBits"], ops["MatMul"]) == (2 * 5 + head, 1 - head)
    assert nbits_attribute(graph, "bits") == set(widths.values())
    int8 = extra == DYNAMIC
    assert nbits_attribute(graph, "accuracy_level") == {INT8_INPUT if int8 else FLOAT_INPUT}
    assert result["genai"]["layers_in_matmul_nbits"] == 2 * 7 + head
    assert result["genai"]["int8_input_layers"] == (2 * 7 + head if int8 else 0)
    assert result["genai"]["storage_bits"] == widths
    with torch.no_grad():
        expected = student(torch.from_numpy(IDS)).numpy()
    with torch.no_grad():
        logits = GenaiLogits(folder)(torch.from_numpy(IDS)).numpy()  # one prompt, empty KV cache
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


def test_genai_generates_the_students_greedy_tokens_with_a_narrower_last_group(
    tiny_lm, text_files, tmp_path
):
    """Groups of 128 over 64 inputs: one group narrower than its block, padded, not changed."""
    import onnxruntime_genai as og

    student, _ = exported_student(tiny_lm, text_files, tmp_path, "W4A16", 128)
    model = og.Model(str(tmp_path / GENAI_FOLDER))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(IDS)
    while not generator.is_done():
        generator.generate_next_token()
    generated = [int(t) for t in generator.get_sequence(0)]
    ids = torch.from_numpy(IDS)
    with torch.no_grad():
        while ids.shape[1] < len(generated):
            ids = torch.cat([ids, student(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert len(generated) > IDS.shape[1] and generated == ids[0].tolist()


def test_a_graph_without_the_students_weights_is_refused(tiny_lm, text_files, tmp_path, capsys):
    """... and the builder, which runs in this process, prints nothing of its own."""
    student, _ = exported_student(tiny_lm, text_files, tmp_path, "W4A16", 32, genai=False)
    layers = [packed_linear(n, m) for n, m in student.named_modules() if isinstance(m, QuantLinear)]
    layers[0].codes[0, 0] += 1  # the codes no longer match the weights the builder reads
    capsys.readouterr()
    with pytest.raises(QatkdError, match="is not the student's dequantized weight"):
        build_genai(tmp_path / "hf", layers, tmp_path / "other")
    assert capsys.readouterr() == ("", "")


def test_a_builder_failure_is_one_line_naming_the_folder(tmp_path):
    (tmp_path / "hf").mkdir()
    message = rf"^onnxruntime-genai's model builder failed on {tmp_path / 'hf'}: .+$"
    with pytest.raises(QatkdError, match=message):
        build_genai(tmp_path / "hf", [], tmp_path / "genai")


def test_each_group_scale_is_repeated_over_its_blocks():
    from qatkd.export.qpack import PackedLayer

    layer = PackedLayer(
        "x",
        4,
        -8,
        7,
        np.zeros((2, 80), np.int8),
        np.array([[1.0, 2.0], [3.0, 4.0]]),
        None,
        None,
        64,
    )
    # blocks of 32: group 1 (64 wide) -> 2 blocks, group 2 (16 wide) -> 1 block
    assert per_block(layer, layer.scale, 32).tolist() == [1.0, 1.0, 2.0, 3.0, 3.0, 4.0]


def one_linear_session(layer: PackedLayer):
    """An onnxruntime session of one MatMulNBits node, x -> y, holding the packed `layer`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node, weights = matmul_nbits("y", ["x"], ["y"], [layer])
    outputs, inputs = layer.codes.shape
    graph = helper.make_graph(
        [node],
        "one_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, outputs])],
        weights,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString())


@pytest.mark.parametrize("act_method", ["minmax", "dynamic"])
def test_matmul_nbits_zero_points_decode_to_the_learned_asymmetric_weights(act_method):
    """Learned steps and offsets moved off their start, W4 in groups of 64 over 80 inputs (the
    last group 16 wide), float and int8 inputs: onnxruntime's MatMulNBits on the identity gives
    back the fake-quantized weight to float rounding ((code - zero point) * scale against
    code * scale + offset)."""
    from qatkd.quant import QuantConfig, prepare

    torch.manual_seed(0)
    bits = "W4A8" if act_method == "dynamic" else "W4A16"
    config = QuantConfig(
        bits=bits, method="lsq", act_method=act_method, group_size=64, asymmetric=True,
        first_last_bits=None,
    )  # fmt: skip
    model = prepare(torch.nn.Sequential(torch.nn.Linear(80, 24, bias=False)), config).eval()
    quantizer = model[0].weight_quantizer
    quantizer.init_from(model[0].weight.detach())
    with torch.no_grad():
        quantizer.step.mul_(1 + 0.2 * torch.rand_like(quantizer.step))
        quantizer.beta.add_(0.02 * torch.randn_like(quantizer.beta))
        fake = quantizer(model[0].weight).numpy()
    session = one_linear_session(packed_linear("0", model[0]))
    decoded = session.run(None, {"x": np.eye(80, dtype=np.float32)})[0].T
    np.testing.assert_allclose(decoded, fake, rtol=0, atol=1e-6 * np.abs(fake).max())
    assert not np.array_equal(fake, model[0].weight.detach().numpy())


def test_int8_kernels_compute_what_training_simulated():
    """One Linear of 576 inputs, W4 in groups of 128 (the last 64 wide) with dynamic int8 inputs,
    through onnxruntime's MatMulNBits at accuracy_level 4: the fake-quantized layer's output to
    float rounding, where the float input (what training without `dynamic` assumes) is far off."""
    from qatkd.quant import QuantConfig, prepare

    torch.manual_seed(0)
    config = QuantConfig(
        bits="W4A8", method="minmax", act_method="dynamic", group_size=128, first_last_bits=None
    )
    model = prepare(torch.nn.Sequential(torch.nn.Linear(576, 48, bias=False)), config).eval()
    layer = packed_linear("0", model[0])
    assert layer.input_block == 128
    session = one_linear_session(layer)
    x = torch.randn(5, 576) * torch.linspace(0.1, 3.0, 576)  # blocks of different ranges
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        simulated = model(x).numpy()
        float_input = (x @ torch.from_numpy(layer.weight()).T).numpy()
    size = np.abs(simulated).max()
    assert np.abs(got - simulated).max() < 1e-5 * size
    assert np.abs(got - float_input).max() > 1e-3 * size
