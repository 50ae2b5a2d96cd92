"""PTQ, plain QAT and distillation end to end on the tiny npz data, through the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qatkd import pipeline, reuse
from qatkd.artifacts import load_model
from qatkd.balance import BalancerConfig, build_balancer
from qatkd.checkpoint import load_checkpoint, save_checkpoint
from qatkd.cli import EXIT_USER_ERROR, main
from qatkd.config import load_config
from qatkd.errors import QatkdError
from qatkd.quant import is_quantized
from qatkd.train.logs import read_csv
from testdata import (
    learning_overrides,
    majority_share,
    make_images,
    stop_after_epoch_1,
    tiny_overrides,
)


@pytest.fixture
def fp32_run(npz_root: Path, tmp_path: Path) -> Path:
    run_dir, _ = pipeline.train(load_config(overrides=tiny_overrides(npz_root, tmp_path / "fp32")))
    return run_dir


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ptq_writes_a_quantized_checkpoint_that_eval_reproduces(
    capsys, learn_root, learned_fp32, tmp_path
):
    out = tmp_path / "ptq"
    code, stdout, _ = cli(
        capsys,
        "ptq",
        "--ckpt",
        str(learned_fp32 / "last.pt"),
        "quant.bits=W4A4",
        "quant.method=minmax",
        f"out={out}",
    )
    assert code == 0 and "QuantConv2d" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_acc"] >= majority_share(learn_root) + 40  # it kept what it learned
    state = load_checkpoint(out / "last.pt")
    assert state["meta"]["quant"]["bits"] == "W4A4"
    model, _ = load_model(out / "last.pt")
    assert is_quantized(model)
    code, stdout, _ = cli(capsys, "eval", "--ckpt", str(out))
    assert json.loads(stdout)["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-3)
    with pytest.raises(QatkdError, match="is not a train or distill run"):
        pipeline.resume(out)


def test_ptq_refuses_a_quantized_checkpoint_and_needs_bits(capsys, fp32_run, tmp_path):
    code, _, err = cli(capsys, "ptq", "--ckpt", str(fp32_run), f"out={tmp_path / 'a'}")
    assert code == EXIT_USER_ERROR and "ptq needs a bit-width" in err
    code, _, _ = cli(
        capsys, "ptq", "--ckpt", str(fp32_run), "quant.bits=W8A8", f"out={tmp_path / 'b'}"
    )
    assert code == 0
    code, _, err = cli(
        capsys, "ptq", "--ckpt", str(tmp_path / "b"), "quant.bits=W4A4", f"out={tmp_path / 'c'}"
    )
    assert code == EXIT_USER_ERROR and "is already quantized" in err


def test_qat_from_fp32_saves_and_restores_quantizer_state(learn_root, learned_fp32, tmp_path):
    config = load_config(
        overrides=learning_overrides(
            learn_root,
            tmp_path / "qat",
            "quant.bits=W2A2",
            f"model.init={learned_fp32 / 'last.pt'}",
        )
    )
    run_dir, metrics = pipeline.train(config)
    assert metrics["test_acc"] >= majority_share(learn_root) + 40
    state = load_checkpoint(run_dir / "last.pt")
    steps = {k: v for k, v in state["model"].items() if k.endswith("quantizer.step")}
    assert steps and all(bool(v.abs().gt(0).all()) for v in steps.values())
    model, _ = load_model(run_dir / "last.pt")
    for key, value in steps.items():
        assert torch.equal(model.state_dict()[key], value)
    assert pipeline.evaluate(run_dir)["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-4)


def test_a_checkpoint_saved_before_act_grid_loads_and_resumes_on_symmetric_grids(
    npz_root, tmp_path
):
    """Checkpoints made before `quant.act_grid` trained on symmetric activation grids: loaded or
    resumed, they get those grids back (no zero code in their state), not today's default."""
    overrides = tiny_overrides(npz_root, tmp_path / "old", "quant.bits=W8A8", "train.epochs=1")
    config = load_config(overrides=[*overrides, "quant.act_grid=symmetric"])
    run_dir, metrics = pipeline.train(config)
    state = load_checkpoint(run_dir / "last.pt")
    del state["meta"]["quant"]["act_grid"], state["config"]["quant"]["act_grid"]
    save_checkpoint(state, run_dir / "last.pt")
    model, _ = load_model(run_dir / "last.pt")
    assert not any(getattr(m, "zero_point_grid", False) for m in model.modules())
    assert pipeline.evaluate(run_dir)["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-4)
    _, resumed = pipeline.resume(run_dir)
    assert resumed["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-4)


def test_init_must_match_the_model(npz_root, fp32_run, tmp_path):
    overrides = tiny_overrides(
        npz_root, tmp_path / "x", "model.name=resnet20", f"model.init={fp32_run / 'last.pt'}"
    )
    with pytest.raises(QatkdError, match=r"holds a 'resnet8', but model\.name is 'resnet20'"):
        pipeline.train(load_config(overrides=overrides))


def test_run_or_reuse_reuses_only_a_folder_made_with_the_same_settings(npz_root, fp32_run):
    same = tiny_overrides(npz_root, fp32_run)
    reused = reuse.run_or_reuse(fp32_run, "train", same)
    assert reused == json.loads((fp32_run / "metrics.json").read_text())
    with pytest.raises(
        QatkdError, match=r"fp32 was made with other settings \(train.epochs: 2 there, 3 now\)"
    ):
        reuse.run_or_reuse(fp32_run, "train", [*same, "train.epochs=3"])


def test_distill_end_to_end_from_the_cli(capsys, npz_root, fp32_run, tmp_path):
    teacher = fp32_run / "last.pt"
    out = tmp_path / "gor"
    argv = tiny_overrides(
        npz_root,
        out,
        "train.epochs=1",
        "quant.bits=W4A4",
        f"model.init={teacher}",
        f"teachers=[{teacher},{teacher}]",
        "balancer.per_teacher=true",
        "diag.every=2",
    )
    code, stdout, _ = cli(capsys, "distill", *argv)
    assert code == 0, stdout
    metrics = json.loads((out / "metrics.json").read_text())
    # The learned weights reported are those of the balancer saved in last.pt: one per teacher.
    balancer = build_balancer(BalancerConfig(per_teacher=True), num_teachers=2)
    balancer.load_state_dict(load_checkpoint(out / "last.pt")["balancer"])
    weights = balancer.weights()
    assert list(weights) == ["w_ts", "w_kd0", "w_kd1"] and weights["w_kd0"] != 1.0
    assert {f"final_{k}": v for k, v in weights.items()} == {
        k: metrics[k] for k in ("final_w_ts", "final_w_kd0", "final_w_kd1")
    }
    # Gradient diagnostics on every 2nd step from the first, the ratio the two norms' quotient.
    header = (out / "steps.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["grad_norm_ts", "grad_norm_kd", "grad_ratio", "grad_cosine"]
    steps = read_csv(out / "steps.csv")  # empty cells dropped
    rows = [row for row in steps if "grad_ratio" in row]
    assert [row["step"] for row in rows] == list(range(1, len(steps) + 1, 2)) and len(rows) >= 2
    for row in rows:
        assert row["grad_norm_ts"] > 0 and row["grad_norm_kd"] > 0 and -1 <= row["grad_cosine"] <= 1
        ratio = row["grad_norm_ts"] / row["grad_norm_kd"]
        assert row["grad_ratio"] == pytest.approx(ratio, rel=3e-5)  # 6 digits in the CSV


def test_resume_restores_the_balancer(npz_root, fp32_run, tmp_path, monkeypatch):
    teacher = fp32_run / "last.pt"
    extra = ("quant.bits=W4A4", f"teachers=[{teacher}]", "balancer.form=kendall")
    full, _ = pipeline.distill(
        load_config(overrides=tiny_overrides(npz_root, tmp_path / "f", *extra))
    )
    cut_overrides = tiny_overrides(npz_root, tmp_path / "c", *extra)
    stop_after_epoch_1(monkeypatch, lambda: pipeline.distill(load_config(overrides=cut_overrides)))
    # GoR's parameters are optimised: they moved from their initial values in the first epoch
    # (this fails if the balancer's parameter group never reaches the optimizer) ...
    initial = build_balancer(BalancerConfig(form="kendall"), num_teachers=1).state_dict()
    moved = load_checkpoint(tmp_path / "c" / "last.pt")["balancer"]
    assert initial.keys() == moved.keys()
    assert all(not torch.equal(moved[k], initial[k]) for k in initial), moved
    # ... and resume continues from those moved values: it ends where the uninterrupted run does
    resumed, _ = pipeline.resume(tmp_path / "c")
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(resumed / "last.pt")
    for key in a["balancer"]:
        assert torch.equal(a["balancer"][key], b["balancer"][key])
        assert not torch.equal(a["balancer"][key], moved[key])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["teachers=[missing.pt]"], "teacher checkpoint not found: missing.pt"),
        ([], "balancer 'gor' needs at least one teacher"),
        (["balancer.name=gorr"], "unknown balancer 'gorr' (did you mean 'gor'?)"),
        (["quant.bits=W5A5"], "quant.bits"),
        (["quant.method=lsqq"], "unknown quantizer 'lsqq'"),
    ],
)
def test_distill_errors_are_one_line(capsys, npz_root, tmp_path, extra, message):
    code, _, err = cli(capsys, "distill", *tiny_overrides(npz_root, tmp_path / "e", *extra))
    assert code == EXIT_USER_ERROR and message in err and len(err.strip().splitlines()) == 1


def test_teacher_with_other_classes_is_refused(capsys, npz_root, fashion_root, tmp_path):
    fashion_teacher, _ = pipeline.train(
        load_config(
            overrides=[
                f"data.root={fashion_root}",
                "model.name=resnet8",
                f"out={tmp_path / 't'}",
                "train.epochs=1",
                "train.batch_size=16",
            ]
        )
    )
    argv = tiny_overrides(npz_root, tmp_path / "s", f"teachers=[{fashion_teacher / 'last.pt'}]")
    code, _, err = cli(capsys, "distill", *argv)
    assert code == EXIT_USER_ERROR
    assert "was trained for 10 classes and 1 input channels, but data 'npz' has 3 classes" in err


def test_teacher_of_another_task_family_is_refused(capsys, fp32_run, fashion_root, tmp_path):
    teacher = fp32_run / "last.pt"
    capsys.readouterr()
    code, _, err = cli(
        capsys,
        "distill",
        "task=detection",
        f"data.root={fashion_root}",
        "data.train_limit=8",
        "data.test_limit=4",
        f"teachers=[{teacher}]",
        f"out={tmp_path / 'd'}",
    )
    assert code == EXIT_USER_ERROR and len(err.strip().splitlines()) == 1
    assert f"teacher {teacher} is a classification model, but this run's task is detection" in err


def test_teacher_of_another_input_size_is_refused(capsys, fp32_run, tmp_path):
    root = tmp_path / "npz16"
    root.mkdir()
    for split, n in (("train", 32), ("test", 8)):
        x, y = make_images(n, 3, 16, 1, 0)
        np.savez(root / f"{split}.npz", x=x[..., 0], y=y)
    argv = tiny_overrides(root, tmp_path / "s", f"teachers=[{fp32_run}]")
    capsys.readouterr()
    code, _, err = cli(capsys, "distill", *argv)
    assert code == EXIT_USER_ERROR and len(err.strip().splitlines()) == 1
    assert f"teacher {fp32_run} was trained on 12x12 images, but data 'npz' has 16x16" in err


def test_demo_quick_runs_every_stage(capsys, fashion_root, tmp_path):
    code, stdout, _ = cli(
        capsys, "demo", "--quick", "--out", str(tmp_path / "demo"), f"data.root={fashion_root}"
    )
    assert code == 0
    assert "W4A4 student, QAT-KD-GoR" in stdout and "with the trained one" in stdout
    assert (tmp_path / "demo" / "summary.md").is_file()
    code, stdout, _ = cli(
        capsys, "demo", "--quick", "--out", str(tmp_path / "demo"), f"data.root={fashion_root}"
    )
    assert code == 0 and stdout.count("done before, reusing") == 3


def test_teacher_logit_cache_is_reused_and_matches_live_teachers(npz_root, fp32_run, tmp_path):
    teacher = fp32_run / "last.pt"
    common = ("data.augment=false", f"teachers=[{teacher}]", f"kd.cache_dir={tmp_path / 'c'}")
    live, _ = pipeline.distill(
        load_config(overrides=tiny_overrides(npz_root, tmp_path / "l", *common))
    )
    cached, _ = pipeline.distill(
        load_config(overrides=tiny_overrides(npz_root, tmp_path / "c1", *common, "kd.cache=true"))
    )
    files = list((tmp_path / "c").iterdir())
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again, _ = pipeline.distill(
        load_config(overrides=tiny_overrides(npz_root, tmp_path / "c2", *common, "kd.cache=true"))
    )
    assert files[0].stat().st_mtime_ns == stamp  # read, not recomputed
    a, b, c = (load_checkpoint(run)["model"] for run in (live, cached, again))
    for key in a:
        assert torch.equal(b[key], c[key])
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_teacher_logit_cache_refuses_augmented_data(npz_root, fp32_run, tmp_path):
    overrides = tiny_overrides(npz_root, tmp_path / "x", f"teachers=[{fp32_run}]", "kd.cache=true")
    with pytest.raises(QatkdError, match=r"kd\.cache=true needs data\.augment=false"):
        pipeline.distill(load_config(overrides=overrides))


def test_ptq_calibrates_on_images_as_they_are_whatever_the_checkpoint_trained_with(
    fp32_run: Path, tmp_path: Path
):
    """Two copies of one checkpoint, one recorded as trained with augmentation: PTQ calibrates
    both on the plain images, so their quantizers come out the same."""
    state = load_checkpoint(fp32_run / "last.pt")
    assert state["config"]["data"]["augment"] is True
    plain = tmp_path / "plain.pt"
    torch.save(
        {
            **state,
            "config": {**state["config"], "data": {**state["config"]["data"], "augment": False}},
        },
        plain,
    )
    runs = [
        pipeline.ptq(ckpt, ["quant.bits=W4A4", f"out={tmp_path / name}"])[0]
        for name, ckpt in (("a", fp32_run / "last.pt"), ("b", plain))
    ]
    a, b = (load_checkpoint(run / "last.pt") for run in runs)
    assert a["config"]["data"]["augment"] is False
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
