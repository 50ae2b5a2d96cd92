"""The command line: exit codes, one-line errors without tracebacks, help text, eval."""

import json
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from qatkd.artifacts import load_model
from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.cli import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR, main
from qatkd.config import config_to_dict, load_config
from qatkd.progress import Settings
from testdata import learning_overrides, majority_share


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qatkd: error: "), err
    assert pattern in lines[0]
    assert "Traceback" not in err


def test_help_lists_commands_and_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "distill", "ptq", "eval", "demo"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.epochs = 5" in out and "quant = null" in out and "--resume" in out


def test_train_then_eval_from_the_cli(capsys, learn_root: Path, tmp_path: Path):
    code, out, _ = run_cli(capsys, "train", *learning_overrides(learn_root, tmp_path / "run"))
    assert code == 0 and "run folder:" in out
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # a model that learned: a broken eval (untrained weights, one class for all) scores otherwise
    assert trained["test_acc"] >= majority_share(learn_root) + 40
    code, out, _ = run_cli(capsys, "eval", "--ckpt", str(tmp_path / "run" / "last.pt"))
    assert code == 0 and json.loads(out)["test_acc"] == pytest.approx(trained["test_acc"], abs=1e-3)
    code, _, err = run_cli(capsys, "eval", "--ckpt", str(tmp_path / "run"), "train.lr=1")
    assert_one_line_error(code, err, "eval takes only data.* overrides")


def test_console_script_and_debug_flag(tmp_path: Path):
    bad = [sys.executable, "-m", "qatkd", "train", "train.epoch=1"]
    run = {"capture_output": True, "text": True, "cwd": tmp_path}  # conftest: this qatkd
    result = subprocess.run(bad, **run)
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr
    result = subprocess.run([*bad[:3], "--debug", *bad[3:]], **run)
    assert "Traceback" in result.stderr


def _raise_unexpected(*args, **kwargs):
    raise RuntimeError("disk on fire")


def test_an_unexpected_error_is_one_line_with_exit_status_1(capsys, monkeypatch):
    from qatkd import pipeline

    monkeypatch.setattr(pipeline, "evaluate", _raise_unexpected)
    code, out, err = run_cli(capsys, "eval", "--ckpt", "anything")
    assert code == EXIT_INTERNAL_ERROR == 1
    assert out == ""
    assert err == (
        "qatkd: internal error: RuntimeError: disk on fire (rerun with --debug for the traceback)\n"
    )


def _press_ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_outside_a_training_run_is_one_line_with_exit_status_130(capsys, monkeypatch):
    """A Ctrl-C that reaches the CLI (a run's own stop signals become RunStopped in the engine)
    prints one line on how a run continues, not a traceback, with the shell's status for SIGINT."""
    from qatkd import pipeline

    monkeypatch.setattr(pipeline, "evaluate", _press_ctrl_c)
    code, out, err = run_cli(capsys, "eval", "--ckpt", "anything")
    assert code == EXIT_INTERRUPTED == 130
    assert out == ""
    assert err == "qatkd: interrupted; a train/distill run continues with --resume RUN_DIR\n"


def test_debug_lets_an_unexpected_error_through_with_its_traceback(capsys, monkeypatch):
    from qatkd import pipeline

    monkeypatch.setattr(pipeline, "evaluate", _raise_unexpected)
    for argv in (["--debug", "eval", "--ckpt", "x"], ["eval", "--debug", "--ckpt", "x"]):
        with pytest.raises(RuntimeError, match="disk on fire") as raised:
            main(argv)
        frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
        assert frames[-1] == "_raise_unexpected" and "cmd_eval" in frames, frames
        assert "internal error" not in capsys.readouterr().err


def test_the_console_script_prints_the_traceback_under_debug(tmp_path: Path):
    """What a user sees under --debug: the interpreter prints the traceback, exit status 1."""
    script = (
        "import sys\n"
        "from qatkd import pipeline\n"
        "def boom(*args): raise RuntimeError('disk on fire')\n"
        "pipeline.evaluate = boom\n"
        "from qatkd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", script, "--debug", "eval", "--ckpt", "x"]
    debug = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert "in boom" in debug.stderr and debug.stderr.endswith("RuntimeError: disk on fire\n")
    assert "internal error" not in debug.stderr


def test_eval_data_overrides_choose_the_evaluated_samples(
    capsys, learn_root, learned_fp32, tmp_path
):
    """A model right on every test image (learned_fp32) evaluated on a copy of the data whose
    last 12 test labels are wrong: 36 of 48 right, all of the first 36, 36 of the first 40."""
    root = tmp_path / "relabelled"
    root.mkdir()
    shutil.copy(learn_root / "train.npz", root / "train.npz")
    with np.load(learn_root / "test.npz") as f:
        x, y = f["x"], f["y"].copy()
    y[36:] = (y[36:] + 1) % 3
    np.savez(root / "test.npz", x=x, y=y)
    model, _ = load_model(learned_fp32)
    with torch.no_grad():
        right = model(torch.from_numpy(x[:, None]).float() / 255).argmax(1).numpy() == y
    assert right[:36].all() and not right[36:].any()  # what the figures below rest on

    def evaluated(*overrides: str) -> float:
        code, out, err = run_cli(capsys, "eval", "--ckpt", str(learned_fp32), *overrides)
        assert code == 0, err
        return json.loads(out)["test_acc"]

    assert evaluated() == pytest.approx(100.0)  # its own data
    assert evaluated(f"data.root={root}") == pytest.approx(75.0)
    assert evaluated(f"data.root={root}", "data.test_limit=36") == pytest.approx(100.0)
    assert evaluated(f"data.root={root}", "data.test_limit=40") == pytest.approx(90.0)
    for other in ("seed=1", "quant.bits=W4A4", "train.lr=1"):
        code, _, err = run_cli(
            capsys, "eval", "--ckpt", str(learned_fp32), "data.test_limit=36", other
        )
        assert_one_line_error(code, err, f"eval takes only data.* overrides, not '{other}'")


def test_ptq_reads_its_config_file_under_the_command_line(
    capsys, learned_fp32, learn_root, tmp_path, monkeypatch
):
    """The file's keys over the checkpoint's data and seed, the command line's over the file's."""
    monkeypatch.chdir(tmp_path)  # a run that missed the file's `out` lands here, not in the repo
    out = tmp_path / "named-in-the-file"
    config = tmp_path / "ptq.yaml"
    config.write_text(
        f"out: {out}\nseed: 3\nquant:\n  bits: W8A8\n  method: minmax\n  first_last_bits: null\n"
        "data:\n  test_limit: 10\n"  # merged into the checkpoint's data section
    )
    argv = ["ptq", "--ckpt", str(learned_fp32), "--config", str(config), "quant.bits=W4A4"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert f"run folder: {out}" in stdout and (out / "metrics.json").is_file()
    saved = load_config(out / "config.yaml")
    assert (saved.quant.bits, saved.quant.method, saved.quant.first_last_bits) == (
        "W4A4",
        "minmax",
        None,
    )
    assert saved.seed == 3
    assert (saved.data.name, saved.data.root, saved.data.augment) == ("npz", str(learn_root), False)
    assert saved.data.test_limit == 10
    assert saved.model.init == str(learned_fp32)
    quant = load_checkpoint(out / "last.pt")["meta"]["quant"]
    assert (quant["bits"], quant["method"], quant["first_last_bits"]) == ("W4A4", "minmax", None)


def test_ptq_of_a_classification_model_needs_its_checkpoint(capsys, learn_root, tmp_path):
    out = f"out={tmp_path / 'x'}"
    overrides = ["data.name=npz", f"data.root={learn_root}", "quant.bits=W4A4", out]
    config = tmp_path / "ptq.yaml"
    config.write_text("quant:\n  bits: W4A4\n")
    for argv in (["ptq", *overrides], ["ptq", "--config", str(config), out]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(
            code, err, "ptq of a classification model needs its FP32 checkpoint: --ckpt PATH"
        )
    assert not (tmp_path / "x").exists()


def test_quiet_lasts_as_long_as_its_command(capsys, learn_root, tmp_path):
    """`main(["--quiet", ...])` called from Python must not silence what the process does next
    (it did: a later run in the same process printed nothing)."""
    argv = ["--quiet", "ptq", "data.name=npz", f"data.root={learn_root}", f"out={tmp_path / 'x'}"]
    assert main(argv) == EXIT_USER_ERROR
    assert not Settings.quiet
    Settings.quiet = True  # a caller's own setting survives a command too
    try:
        assert main(argv[1:]) == EXIT_USER_ERROR
        assert Settings.quiet
    finally:
        Settings.quiet = False


def test_ptq_of_a_language_model_refuses_a_checkpoint(capsys, tmp_path):
    """A language model is quantized from its pretrained weights (`model.name` / `model.path`):
    an FP32 language checkpoint given with --ckpt is refused before any model is loaded."""
    language = load_config(overrides=["task=language"])
    state = {
        "meta": {"task": "language", "model_name": "smollm2-135m"},
        "config": config_to_dict(language),
        "model": {},
    }
    save_checkpoint(state, tmp_path / "lm.pt")
    argv = ["ptq", "--ckpt", str(tmp_path / "lm.pt"), "quant.bits=W4A16", f"out={tmp_path / 'x'}"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(
        code, err, "ptq of a language model quantizes the pretrained model: drop --ckpt"
    )
    assert not (tmp_path / "x").exists()
