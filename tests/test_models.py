import pytest
import torch
import torchvision

from qatkd.errors import QatkdError
from qatkd.nn import Attention, QuantPoint
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


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "masks",
    [
        {},
        {"need_weights": False},
        {"average_attn_weights": False},
        {"key_padding_mask": torch.tensor([[False] * 6 + [True]] * 3)},
        {"attn_mask": torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.7},
        {"attn_mask": torch.randn(3 * 4, 5, 7, generator=torch.Generator().manual_seed(0))},
    ],
    ids=["weights", "no-weights", "per-head", "padding", "bool-mask", "float-mask-per-head"],
)
def test_split_attention_computes_what_multihead_attention_does(batch_first, bias, masks):
    torch.manual_seed(0)
    packed = torch.nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first).eval()
    split = Attention.from_module(packed).eval()
    assert split.training is False and Attention.splits(packed)
    query, source = torch.randn(3, 5, 16), torch.randn(3, 7, 16)  # batch 3
    if not batch_first:
        query, source = query.transpose(0, 1), source.transpose(0, 1)
    expected, expected_weights = packed(query, source, source, **masks)
    got, weights = split(query, source, source, **masks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_attention_with_its_own_key_width_is_not_split():
    assert not Attention.splits(torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8))
    assert not Attention.splits(torch.nn.MultiheadAttention(16, 4, add_bias_kv=True))
