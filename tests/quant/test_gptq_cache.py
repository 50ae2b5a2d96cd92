"""GPTQ's start read from the cache is the start GPTQ computes, and every input of GPTQ changes
the key: a changed weight, grid, batch or stage list is a miss, never another start."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qatkd.quant import QuantConfig, calibrate, prepare
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
    assert not gptq_cached(first, _batches(), STAGES, tmp_path)  # computed, and stored
    assert gptq_cached(second, _batches(), STAGES, tmp_path)  # read
    _assert_same_state(first, live)
    _assert_same_state(second, live)
    assert not torch.equal(second[0].weight, _model()[0].weight)  # GPTQ did move the weights
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]


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


@pytest.mark.parametrize("content", [b"not a torch file", None], ids=["corrupt", "other layers"])
def test_a_file_that_cannot_be_used_is_computed_again_and_replaced(tmp_path, content):
    model = _model()
    assert not gptq_cached(copy.deepcopy(model), _batches(), STAGES, tmp_path)
    (path,) = tmp_path.iterdir()
    if content is None:  # the right key, layers that do not fit the model
        torch.save({"key": gptq_key(model, _batches(), STAGES), "layers": {"0": {}}}, path)
    else:
        path.write_bytes(content)
    live = copy.deepcopy(model)
    gptq(live, _batches(), STAGES)
    assert not gptq_cached(model, _batches(), STAGES, tmp_path)
    _assert_same_state(model, live)
    assert gptq_cached(_model(), _batches(), STAGES, tmp_path)  # replaced: read from now on
