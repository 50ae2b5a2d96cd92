"""`quant.init=gptq` on a tiny Llama: the student starts from GPTQ's codes of the teacher on its
own grid, closer to the teacher than round-to-nearest, and only the trainable decoder moves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qatkd.checkpoint import load_checkpoint
from qatkd.cli import main
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.quant import QuantLinear
from qatkd.tasks.language.family import (
    Loaded,
    build_student,
    decoder_stages,
    language_quant,
    too_few_calibration_tokens,
)
from testdata import language_overrides


def _student(tiny_lm: Path, text_files: tuple[Path, Path], *extra: str):
    overrides = ["quant.bits=W2A16", "quant.group_size=32", "quant.method=lsq", *extra]
    config = load_config(overrides=language_overrides(tiny_lm, text_files, *overrides))
    config = config.model_copy(update={"quant": language_quant(config.quant)})
    loaded = Loaded(config)
    return build_student(config, loaded).eval(), loaded


def teacher_kl(student, loaded) -> float:
    """KL(teacher || student) per token on the training blocks: the distillation loss the
    student starts from."""
    ids = loaded.train.tensors[0]
    with torch.no_grad():
        teacher = F.log_softmax(loaded.reference(ids), -1)
        own = F.log_softmax(student(ids), -1)
    return float(F.kl_div(own, teacher, log_target=True, reduction="sum") / ids.numel())


@pytest.mark.parametrize("asymmetric", ("false", "true"))
def test_the_gptq_start_is_closer_to_the_teacher_than_rtn(tiny_lm, text_files, asymmetric):
    rtn, loaded = _student(tiny_lm, text_files, "quant.init=rtn", f"quant.asymmetric={asymmetric}")
    start, _ = _student(tiny_lm, text_files, "quant.init=gptq", f"quant.asymmetric={asymmetric}")
    moved = 0
    for name, layer in start.named_modules():
        if isinstance(layer, QuantLinear):
            quantizer, before = layer.weight_quantizer, rtn.get_submodule(name).weight_quantizer
            first = slice(0, quantizer.group_size)  # the first group's grid is RTN's
            assert torch.equal(quantizer.scale[:, first], before.scale[:, first])
            assert torch.equal(quantizer(layer.weight), layer.weight)  # on its grid, exactly
            moved += int(
                (
                    quantizer.quantize_int(layer.weight)
                    != before.quantize_int(rtn.get_submodule(name).weight)
                ).sum()
            )
    assert moved > 0
    assert teacher_kl(start, loaded) < teacher_kl(rtn, loaded)


def test_gptq_leaves_the_frozen_head_and_the_teacher_alone(tiny_lm, text_files):
    """A quantized LM head is the teacher's embedding: it is no GPTQ stage and keeps RTN."""
    head = ("quant.skip=[]", "quant.layer_weight_bits={'*lm_head': 8}", "quant.init=gptq")
    student, loaded = _student(tiny_lm, text_files, *head)
    stages = decoder_stages(student)
    assert [len(stage) for stage in stages] == [7, 7]  # q, k, v, o, gate, up, down per block
    assert all(name.startswith(f"hf.model.layers.{i}.") for i, s in enumerate(stages) for name in s)
    original, _ = _student(tiny_lm, text_files, "quant.bits=W16A16")
    for key, value in loaded.hf.state_dict().items():  # the teacher, as loaded
        assert torch.equal(value, original.hf.state_dict()[key]), key


def test_ptq_from_the_gptq_start_reads_the_training_text(tiny_lm, text_files, tmp_path):
    out = tmp_path / "gptq"
    argv = [
        "ptq",
        *language_overrides(tiny_lm, text_files),
        "quant.bits=W3A16",
        "quant.method=lsq",
        "quant.init=gptq",
        f"out={out}",
    ]
    assert main(argv) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["meta"]["train_text"] == str(text_files[0])
    assert state["config"]["quant"]["init"] == "gptq"


def test_a_gptq_start_without_the_training_text_is_refused(tiny_lm, text_files):
    config = load_config(
        overrides=[
            "task=language",
            f"model.path={tiny_lm}",
            f"data.eval_files=[{text_files[1]}]",
            "quant.method=lsq",
            "quant.init=gptq",
        ]
    )
    config = config.model_copy(update={"quant": language_quant(config.quant)})
    with pytest.raises(QatkdError, match=r"quant\.init=gptq calibrates on the training text"):
        build_student(config, Loaded(config, training=False))


def test_a_learned_asymmetric_grid_trains_from_the_gptq_start_and_exports(
    tiny_lm, text_files, tmp_path, capsys
):
    """distill with learned steps and offsets from GPTQ's start: both move; the checkpoint
    evaluates to the run's perplexity; the genai folder (float zero points) computes it."""
    out = tmp_path / "kd"
    argv = [
        "distill",
        *language_overrides(tiny_lm, text_files),
        "quant.bits=W4A16",
        "quant.group_size=32",
        "quant.method=lsq",
        "quant.asymmetric=true",
        "quant.init=gptq",
        "train.lr=1e-3",
        "train.threads=1",
        f"teachers=[{tiny_lm}]",
        f"out={out}",
    ]
    assert main(argv) == 0
    start, _ = _student(tiny_lm, text_files, "quant.init=gptq", "quant.asymmetric=true")
    trained = load_checkpoint(out / "last.pt")["model"]
    for key, value in start.state_dict().items():
        if key.endswith((".step", ".beta")):
            assert not torch.equal(trained[key], value), key
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["test_ppl"] == pytest.approx(metrics["test_ppl"])
    assert main(["export", str(out)]) == 0
    parity = json.loads((out / "parity.json").read_text())
    assert parity["pytorch"]["ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-5)
    assert abs(parity["ppl_relative_diff_percent"]) < 1e-3


def test_calibration_on_fewer_tokens_than_a_layers_inputs_is_noted(tiny_lm, text_files, capsys):
    """4 blocks of 16 tokens: 64 rows for the 128 inputs of the MLP's down projection."""
    start, _ = _student(tiny_lm, text_files, "quant.init=gptq", "quant.init_samples=4")
    assert (
        "note: GPTQ calibrates on 64 tokens, fewer than the 128 inputs of "
        "hf.model.layers.0.mlp.down_proj: GPTQ will fit those tokens rather than the text; "
        "raise quant.init_samples"
    ) in capsys.readouterr().out
    assert too_few_calibration_tokens(128, start, decoder_stages(start)) == ""


def test_a_second_student_from_the_same_start_reads_it_from_the_cache(tiny_lm, text_files, capsys):
    """The cache is keyed by content (`tests/quant/test_gptq_cache.py`); here it serves the
    family: the second build reads the start the first computed, and says so."""
    first, _ = _student(tiny_lm, text_files, "quant.init=gptq")
    assert "GPTQ start read from" not in capsys.readouterr().out
    second, _ = _student(tiny_lm, text_files, "quant.init=gptq")
    assert "GPTQ start read from" in capsys.readouterr().out
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    _student(tiny_lm, text_files, "quant.init=gptq", "quant.init_samples=1")
    assert "GPTQ start read from" not in capsys.readouterr().out  # other calibration blocks
