"""GPTQ's start read from the cache is the start GPTQ computes, and every input of GPTQ changes
the key: a changed weight, grid, batch or stage list is a miss, never another start."""

from __future__ import annotations

import copy
import importlib
from importlib.metadata import PackageNotFoundError
from typing import Any

import pytest
import torch
from torch import nn

from qatkd.quant import QuantConfig, calibrate, gptq_cache, prepare
from qatkd.quant.gptq import gptq
from qatkd.quant.gptq_cache import gptq_cached, gptq_key

STAGES = [["0"], ["2"]]


def _model(bits: str = "W3A16", group_size: int = 32) -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    config = QuantConfig(
        bits=bits, method="lsq", group_size=group_size, init="rtn", first_last_bits=None
    )
    prepare(model, config)
    calibrate(model, [torch.randn(4, 64)], 1)
    return model


def _batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(20, 64, generator=generator) for _ in range(3)]


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_the_cached_start_is_the_live_one(tmp_path):
    live, first, second = _model(), _model(), _model()
    gptq(live, _batches(), STAGES)
    cache = tmp_path / "cache" / "gptq"  # made, with its parents
    assert not gptq_cached(first, _batches(), STAGES, cache)  # computed, and stored
    assert gptq_cached(second, _batches(), STAGES, cache)  # read
    _assert_same_state(first, live)
    _assert_same_state(second, live)
    assert not torch.equal(second[0].weight, _model()[0].weight)  # GPTQ did move the weights
    assert [p.suffix for p in cache.iterdir()] == [".pt"]


def _changed_weight() -> tuple[nn.Module, list[torch.Tensor], list[list[str]]]:
    model = _model()
    with torch.no_grad():
        model[2].weight[0, 0] += 1e-3
    return model, _batches(), STAGES


def _float16_scales() -> tuple[nn.Module, list[torch.Tensor], list[list[str]]]:
    """A setting that no tensor of the state shows: GPTQ's grids get float16 scales (GGUF)."""
    model = _model()
    model[2].weight_quantizer.float16_scale = True
    return model, _batches(), STAGES


def _changed_batch() -> tuple[nn.Module, list[torch.Tensor], list[list[str]]]:
    batches = _batches()
    batches[2][0, 0] += 1e-3
    return _model(), batches, STAGES


@pytest.mark.parametrize(
    "changed",
    [
        _changed_weight,
        lambda: (_model(group_size=64), _batches(), STAGES),  # another grid
        lambda: (_model(bits="W4A16"), _batches(), STAGES),
        _float16_scales,
        _changed_batch,
        lambda: (_model(), _batches()[:2], STAGES),  # fewer batches
        lambda: (_model(), _batches(), [["0", "2"]]),  # other stages
    ],
    ids=["weight", "group size", "bits", "float16 scales", "batch", "batches", "stages"],
)
def test_each_input_of_gptq_changes_the_key(tmp_path, changed):
    assert not gptq_cached(_model(), _batches(), STAGES, tmp_path)
    model, batches, stages = changed()
    assert gptq_key(model, batches, stages) != gptq_key(_model(), _batches(), STAGES)
    live = copy.deepcopy(model)
    gptq(live, batches, stages)
    assert not gptq_cached(model, batches, stages, tmp_path)  # a miss: computed for itself
    _assert_same_state(model, live)


def _activation(cls: type[nn.Module]) -> nn.Module:
    model = _model()
    model[1] = cls()
    return model


def test_the_key_holds_each_modules_class_but_not_train_or_eval_mode():
    """Sigmoid and Tanh have the same (no) settings and state, and one source file."""
    sigmoid, tanh = _activation(nn.Sigmoid), _activation(nn.Tanh)
    assert gptq_key(sigmoid, _batches(), STAGES) != gptq_key(tanh, _batches(), STAGES)
    model = _model()
    assert gptq_key(model.train(), _batches(), STAGES) == gptq_key(model.eval(), _batches(), STAGES)


def test_the_key_holds_the_torch_and_transformers_versions(monkeypatch):
    versions = {"torch": "2.14.1", "transformers": "5.0.0"}

    def installed(package: str) -> str:
        if package not in versions:
            raise PackageNotFoundError(package)
        return versions[package]

    monkeypatch.setattr(gptq_cache, "version", installed)
    before = gptq_key(_model(), _batches(), STAGES)
    for package in list(versions):
        versions[package] += ".post1"
        assert gptq_key(_model(), _batches(), STAGES) != before, package
        before = gptq_key(_model(), _batches(), STAGES)


def test_the_key_holds_the_source_of_the_models_module_classes(tmp_path, monkeypatch):
    """A forward pass edited in place (the Hessians it makes change) is a miss."""
    source = tmp_path / "edited_layers.py"
    source.write_text("from torch import nn\n\nclass Act(nn.ReLU):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    act = importlib.import_module("edited_layers").Act
    before = gptq_key(_activation(act), _batches(), STAGES)
    source.write_text(source.read_text() + "# edited\n")
    assert gptq_key(_activation(act), _batches(), STAGES) != before


class Foreign:
    """Not a tensor or a container: loading it would run arbitrary unpickling."""


def _layers(change: Any) -> Any:
    """The stored file with its layers changed by `change`."""
    return lambda stored: stored | {"layers": change(stored["layers"])}


def _with(layer: str, **entries: torch.Tensor | None) -> Any:
    """The stored file with `layer`'s entries replaced (None: dropped)."""

    def change(layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        state = layers[layer] | entries
        return layers | {layer: {k: v for k, v in state.items() if v is not None}}

    return _layers(change)


@pytest.mark.parametrize(
    "content",
    [
        b"not a torch file",
        lambda stored: [stored],
        lambda stored: stored | {"key": "another"},
        lambda stored: stored | {"made_by": Foreign()},
        _layers(lambda layers: {"0": {}}),
        _layers(lambda layers: layers | {"1": layers["0"]}),
        _with("2", bias=None),
        _with("2", bias=torch.zeros(31)),
        _with("2", bias=torch.zeros(32, dtype=torch.float64)),
    ],
    ids=[
        "corrupt",
        "not a dict",
        "another key",
        "unpickling",
        "other layers",
        "a layer more",
        "an entry less",
        "a shape",
        "a dtype",
    ],
)
def test_a_file_that_cannot_be_used_is_computed_again_and_replaced(tmp_path, content):
    """The key in the file, and every layer, entry, shape and dtype, are checked before any is
    loaded; a file torch would have to unpickle objects from is not read."""
    model = _model()
    assert not gptq_cached(copy.deepcopy(model), _batches(), STAGES, tmp_path)
    (path,) = tmp_path.iterdir()
    if callable(content):
        torch.save(content(torch.load(path, weights_only=True)), path)
    else:
        path.write_bytes(content)
    live = copy.deepcopy(model)
    gptq(live, _batches(), STAGES)
    assert not gptq_cached(model, _batches(), STAGES, tmp_path)
    _assert_same_state(model, live)
    assert gptq_cached(_model(), _batches(), STAGES, tmp_path)  # replaced: read from now on
