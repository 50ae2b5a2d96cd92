from pathlib import Path

import pytest

from qatkd.config import (
    Config,
    build_config,
    config_keys,
    config_to_dict,
    dotted,
    load_config,
    parse_override,
    save_config,
    saved_config,
)
from qatkd.errors import QatkdError
from qatkd.tasks.classification.config import ClassificationConfig


def test_defaults_are_valid():
    config = load_config()
    assert config == ClassificationConfig()
    assert config.data.name == "fashion-mnist" and config.model.name == "resnet20"
    assert config.quant is None and config.teachers == []


def test_overrides_are_parsed_as_yaml():
    assert parse_override("teachers=[a.pt, b.pt]") == ("teachers", ["a.pt", "b.pt"])
    assert parse_override("quant=null") == ("quant", None)
    assert parse_override("train.lr=0.05") == ("train.lr", 0.05)
    config = load_config(overrides=["train.epochs=3", "teachers=[a.pt,b.pt]", "quant.bits=W2A2"])
    assert config.train.epochs == 3 and config.teachers == ["a.pt", "b.pt"]
    assert config.quant is not None and config.quant.bits == "W2A2"


def test_file_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.2\nseed: 3\n")
    config = load_config(path, ["train.lr=0.01"])
    assert (config.train.epochs, config.train.lr, config.seed) == (7, 0.01, 3)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(
        QatkdError, match=r"unknown config key 'train.epoch' \(did you mean 'train.epochs'\?\)"
    ):
        load_config(overrides=["train.epoch=3"])


def test_wrong_type_names_key_value_and_rule():
    with pytest.raises(QatkdError, match=r"config key 'train.epochs' = 'many': .*integer"):
        load_config(overrides=["train.epochs=many"])
    with pytest.raises(QatkdError, match=r"config key 'data.name' = 'mnist': .*'fashion-mnist'"):
        load_config(overrides=["data.name=mnist"])
    with pytest.raises(QatkdError, match=r"config key 'train.lr' = -1: .*greater than 0"):
        load_config(overrides=["train.lr=-1"])


def test_bad_files_and_overrides(tmp_path: Path):
    with pytest.raises(QatkdError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(QatkdError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(QatkdError, match="write it as key=value"):
        load_config(overrides=["train.epochs"])
    with pytest.raises(QatkdError, match="'seed' is a value, not a section"):
        load_config(overrides=["seed=1", "seed.x=1"])


def test_saved_config_loads_back_identical(tmp_path: Path):
    config = load_config(overrides=["quant.bits=W4A4", "teachers=[t.pt]", "train.epochs=2"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_config_keys_cover_nested_sections():
    keys = config_keys()
    for key in (
        "data.train_limit",
        "train.optimizer",
        "quant.bits",
        "quant.first_last_bits",
        "balancer.form",
        "balancer.per_teacher",
        "kd.temperature",
        "diag.every",
    ):
        assert key in keys


def test_task_defaults_apply_under_explicit_keys():
    language = load_config(overrides=["task=language", "train.epochs=2"])
    assert language.train.optimizer == "adamw" and language.train.lr == 5e-4
    assert language.train.epochs == 2 and language.balancer.lr == 0.01
    given = load_config(overrides=["task=language", "balancer.lr=0.5"])
    assert given.balancer.lr == 0.5 and given.balancer.name == Config().balancer.name
    assert load_config().balancer.lr is None  # image tasks: the model's learning rate


def test_fine_tuning_defaults_follow_model_init():
    scratch = load_config()
    assert (scratch.train.lr, scratch.train.warmup_epochs) == (0.1, 1.0)
    tuned = load_config(overrides=["model.init=fp32.pt"])
    assert (tuned.train.lr, tuned.train.warmup_epochs) == (0.01, 0.0)
    detector = load_config(overrides=["task=detection", "model.init=fp32.pt"])
    assert (detector.train.lr, detector.train.batch_size) == (0.005, 32)
    given = load_config(overrides=["model.init=fp32.pt", "train.lr=0.05"])
    assert (given.train.lr, given.train.warmup_epochs) == (0.05, 0.0)


def test_each_family_owns_its_data_keys():
    with pytest.raises(QatkdError, match=r"unknown config key 'data.train_files'"):
        load_config(overrides=["data.train_files=[a.txt]"])
    with pytest.raises(QatkdError, match=r"'data.name' = 'npz': .*'text'"):
        load_config(overrides=["task=language", "data.name=npz"])
    assert load_config(overrides=["task=detection", "data.image_size=64"]).data.image_size == 64
    with pytest.raises(QatkdError, match=r"'task' = 'segmentation': unknown task family"):
        load_config(overrides=["task=segmentation"])


def test_configs_saved_with_every_familys_data_keys_still_load():
    """Before each family had its own configuration, every checkpoint saved all data keys."""
    old = load_config().model_dump(mode="json")
    old["data"] |= {"image_size": 96, "train_files": [], "block_size": 128}
    with pytest.raises(QatkdError, match="unknown config key"):
        build_config(old)
    assert build_config(saved_config(old)) == load_config()


def test_dotted_keys_rebuild_the_config_they_came_from():
    tree = config_to_dict(load_config(overrides=["quant.bits=W4A4", "quant.layer_weight_bits={}"]))
    flat = dotted(tree)
    assert flat["train.lr"] == tree["train"]["lr"] and flat["quant.layer_weight_bits"] == {}
    rebuilt: dict = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = rebuilt
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    assert rebuilt == tree
