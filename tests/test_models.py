import pytest
import torch
import torchvision

from qatkd.errors import QatkdError
from qatkd.nn import QuantPoint
from qatkd.tasks.classification.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_registered_models_take_any_channels_and_classes(name: str, channels: int):
    model = build_model(name, channels, 7, [0.5] * channels, [0.25] * channels).eval()
    assert model(torch.rand(2, channels, 28, 28)).shape == (2, 7)


def test_resnet20_depth_and_residual_marks():
    model = build_model("resnet20", 1, 10, [0.5], [0.5])
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19 + 2  # 19 3x3 convs + 2 projection shortcuts
    assert sum(isinstance(m, QuantPoint) for m in model.modules()) == 2 * 9


def test_torchvision_model_adapted_to_one_channel():
    model = build_model("tv:resnet18", 1, 10, [0.5], [0.5]).eval()
    assert model.net.conv1.in_channels == 1
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 10)


def test_normalisation_is_inside_the_model():
    model = build_model("resnet8", 1, 3, [0.5], [0.25])
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model.mean.flatten(), torch.tensor([0.5]))
    model.net = torch.nn.Identity()
    assert torch.allclose(model(x), (x - 0.5) / 0.25)


def test_unknown_model_names_the_choices():
    with pytest.raises(QatkdError, match=r"unknown model 'resnt20' \(did you mean 'resnet20'\?\)"):
        build_model("resnt20", 1, 10, [0.5], [0.5])
    with pytest.raises(QatkdError, match="unknown torchvision model 'nonet'"):
        build_model("tv:nonet", 1, 10, [0.5], [0.5])


def test_torchvision_resnet_residual_adds_are_marked_and_outputs_unchanged():
    torch.manual_seed(0)
    model = build_model("tv:resnet18", 3, 10, [0.0] * 3, [1.0] * 3).eval()
    assert sum(isinstance(m, QuantPoint) for m in model.modules()) == 2 * 8
    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict(model.net.state_dict())
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(model(x), reference(x))
