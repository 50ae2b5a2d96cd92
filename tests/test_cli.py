"""The command line: exit codes, one-line errors without tracebacks, help text, eval."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qatkd.cli import EXIT_USER_ERROR, main
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
    result = subprocess.run(bad, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr
    result = subprocess.run(
        [*bad[:3], "--debug", *bad[3:]], capture_output=True, text=True, cwd=tmp_path
    )
    assert "Traceback" in result.stderr
