"""Feature KD's reading side: named submodules, the hooks that keep their outputs, and the
ensemble's `with_features` (design §1.5)."""

import re

import pytest
import torch
from torch import nn

from qatkd.distill import TeacherEnsemble
from qatkd.distill.features import SHOWN_NAMES, FeatureHooks, named_module
from qatkd.errors import QatkdError


def two_stage(width: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, width), nn.ReLU()),  # "0" ("0.0", "0.1")
        nn.Linear(width, 2),  # "1"
    )


def test_named_module_returns_the_submodule_of_that_name() -> None:
    model = two_stage()
    assert named_module(model, "0.0", "the student") is model[0][0]
    assert named_module(model, "1", "the student") is model[1]


def test_a_missing_module_names_the_owner_a_close_match_and_the_modules_it_has() -> None:
    model = two_stage()
    message = (
        "teacher 1 (b.pt) has no module '0.2' to read a feature from (kd.features) "
        "(did you mean '0.1'?); its modules: 0, 0.0, 0.1, 1"
    )
    with pytest.raises(QatkdError, match=f"^{re.escape(message)}$"):
        named_module(model, "0.2", "teacher 1 (b.pt)")


def test_a_model_with_many_modules_lists_only_the_first_ones() -> None:
    model = nn.Sequential(*[nn.Identity() for _ in range(SHOWN_NAMES + 1)])
    with pytest.raises(QatkdError) as error:
        named_module(model, "neck", "the student")
    shown = str(error.value).split("; its modules: ")[1]
    assert shown == ", ".join(str(i) for i in range(SHOWN_NAMES)) + ", ..."
    model = nn.Sequential(*[nn.Identity() for _ in range(SHOWN_NAMES)])  # all fit: no "..."
    with pytest.raises(QatkdError, match=rf"its modules: 0, 1, .*, {SHOWN_NAMES - 1}$"):
        named_module(model, "neck", "the student")


def test_hooks_keep_each_named_output_of_the_latest_forward() -> None:
    model = two_stage()
    hooks = FeatureHooks(model, ["0", "0.0"], "the student")
    assert hooks.outputs == {}
    for x in (torch.randn(5, 4), torch.randn(2, 4)):  # the second forward replaces the first
        model(x)
        hidden = model[0][0](x)
        assert sorted(hooks.outputs) == ["0", "0.0"]
        torch.testing.assert_close(hooks.outputs["0.0"], hidden, rtol=0, atol=0)
        torch.testing.assert_close(hooks.outputs["0"], hidden.relu(), rtol=0, atol=0)


def test_every_name_is_checked_before_any_hook_is_put_on() -> None:
    model = two_stage()
    with pytest.raises(QatkdError, match=r"^the student has no module 'neck'"):
        FeatureHooks(model, ["0", "neck"], "the student")
    assert not any(m._forward_hooks for m in model.modules())


def test_remove_takes_the_hooks_off_and_forgets_the_outputs() -> None:
    model = two_stage()
    hooks = FeatureHooks(model, ["0", "1"], "the student")
    model(torch.randn(3, 4))
    hooks.remove()
    assert hooks.outputs == {}
    assert not any(m._forward_hooks for m in model.modules())
    model(torch.randn(3, 4))
    assert hooks.outputs == {}


def test_with_features_gives_each_teachers_logits_and_named_features() -> None:
    teachers = [two_stage(3), two_stage(5)]
    ensemble = TeacherEnsemble(teachers, names=["a.pt", "b.pt"], features=["0"])
    x = torch.randn(6, 4)
    outputs = ensemble.with_features(x)
    assert len(outputs) == 2
    for teacher, output, logits in zip(teachers, outputs, ensemble(x), strict=True):
        torch.testing.assert_close(output.logits, logits, rtol=0, atol=0)
        assert list(output.features) == ["0"]
        torch.testing.assert_close(output.features["0"], teacher[0](x), rtol=0, atol=0)
        # ordinary tensors, which the student's feature loss may save for its backward
        assert not output.logits.is_inference()
        assert not output.features["0"].is_inference()
    assert outputs[0].features["0"].shape == (6, 3) and outputs[1].features["0"].shape == (6, 5)


def test_a_feature_a_teacher_lacks_names_that_teacher() -> None:
    teachers = [two_stage(), nn.Sequential(nn.Linear(4, 2))]
    with pytest.raises(QatkdError, match=r"^teacher 1 \(b.pt\) has no module '0.0'"):
        TeacherEnsemble(teachers, names=["a.pt", "b.pt"], features=["0.0"])
