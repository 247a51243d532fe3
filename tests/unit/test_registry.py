"""The architecture registry, the paper's networks and the top-down network."""

from __future__ import annotations

from typing import TypeVar

import pytest
import torch
from torch import nn

from deepscope.analysis.hooks import Where, capture_activations
from deepscope.models.registry import (
    accepted_kwargs,
    get_model,
    get_model_spec,
    list_models,
    register_model,
    replace_first_conv,
)
from deepscope.models.topdown import TopDownNet

M = TypeVar("M", bound=nn.Module)

FCNN5_CHILDREN = [
    "flatten",
    "fc1",
    "selu1",
    "fc2",
    "selu2",
    "fc3",
    "selu3",
    "fc4",
    "selu4",
    "fc5",
]


def sub(model: nn.Module, name: str, kind: type[M]) -> M:
    """The submodule ``name`` of ``model``, checked to be a ``kind``."""
    module = model.get_submodule(name)
    assert isinstance(module, kind), f"{name} is a {type(module).__name__}"
    return module


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- registry ---------------------------------------------------------------------------------


def test_list_models_sorted_and_complete() -> None:
    import torchvision

    names = list_models()
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in ("fcnn1", "fcnn5", "resnet18_gray", "topdown"):
        assert name in names
    # Every torchvision classification architecture, under its own name.
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)


def test_specs() -> None:
    assert get_model_spec("fcnn1").invertible
    assert get_model_spec("fcnn5").invertible
    assert not get_model_spec("resnet18_gray").invertible
    assert not get_model_spec("resnet50").invertible
    assert get_model_spec("fcnn5").input_shape == (1, 28, 28)
    assert get_model_spec("topdown").input_shape == (1, 28, 28)
    assert get_model_spec("vit_b_16").input_shape == (3, 224, 224)
    assert get_model_spec("inception_v3").input_shape == (3, 299, 299)
    assert {"num_classes", "in_channels"} <= accepted_kwargs("resnet50")
    assert accepted_kwargs("fcnn1") == {"num_classes", "input_shape"}


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet5'") as info:
        get_model("resnet5")
    message = str(info.value)
    assert "did you mean" in message
    assert "'resnet50'" in message
    assert "deepscope list-archs" in message
    with pytest.raises(ValueError, match="unknown architecture"):
        get_model_spec("zzzzzz")


def test_bad_kwargs_are_named() -> None:
    with pytest.raises(ValueError, match="width") as info:
        get_model("fcnn1", width=3)
    assert "num_classes" in str(info.value)  # lists what it takes
    with pytest.raises(ValueError, match="bogus"):
        get_model("resnet18", bogus=1)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("fcnn1", input_shape=(1, 28, 28))(lambda: nn.Identity())


def test_register_rejects_bad_input_shape() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        register_model("bad_shape_model", input_shape=(1, 0, 28))


# -- the paper's networks ---------------------------------------------------------------------


def test_fcnn1_structure() -> None:
    model = get_model("fcnn1")
    assert isinstance(model, nn.Sequential)
    assert [name for name, _ in model.named_children()] == ["flatten", "fc1", "selu1"]
    fc1 = sub(model, "fc1", nn.Linear)
    assert (fc1.in_features, fc1.out_features) == (784, 10)
    assert isinstance(model.get_submodule("selu1"), nn.SELU)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_fcnn5_structure() -> None:
    model = get_model("fcnn5")
    assert isinstance(model, nn.Sequential)
    assert [name for name, _ in model.named_children()] == FCNN5_CHILDREN
    shapes = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]
    assert shapes == [(784, 256), (256, 256), (256, 128), (128, 32), (32, 10)]
    selus = [m for m in model if isinstance(m, nn.SELU)]
    assert len(selus) == 4
    assert len({id(m) for m in selus}) == 4  # separate instances, hookable by name
    assert not any(m.inplace for m in selus)
    assert isinstance(list(model)[-1], nn.Linear)  # no activation after fc5
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_fcnn_kwargs_size_the_layers() -> None:
    model = get_model("fcnn5", num_classes=4, input_shape=(3, 8, 8))
    assert sub(model, "fc1", nn.Linear).in_features == 192
    assert sub(model, "fc5", nn.Linear).out_features == 4
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 4)
    # A JSON round trip turns the tuple into a list; that must work too.
    assert sub(get_model("fcnn1", input_shape=[1, 8, 8]), "fc1", nn.Linear).in_features == 64
    with pytest.raises(ValueError, match="input_shape"):
        get_model("fcnn1", input_shape=(1, 28))


def test_resnet18_gray() -> None:
    model = get_model("resnet18_gray").eval()
    conv = sub(model, "conv1", nn.Conv2d)
    assert (conv.in_channels, conv.out_channels) == (1, 64)
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert conv.bias is None
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    rgb = get_model("resnet18_gray", in_channels=3, num_classes=5)
    assert sub(rgb, "conv1", nn.Conv2d).in_channels == 3


# -- torchvision in_channels adaptation -------------------------------------------------------


def test_torchvision_resnet18_in_channels() -> None:
    reference = sub(get_model("resnet18"), "conv1", nn.Conv2d)
    model = get_model("resnet18", in_channels=1, num_classes=7).eval()
    conv = sub(model, "conv1", nn.Conv2d)
    assert conv.in_channels == 1
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(conv, attr) == getattr(reference, attr)
    assert (conv.bias is None) == (reference.bias is None)
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 7)


def test_torchvision_efficientnet_in_channels() -> None:
    model = get_model("efficientnet_b0", in_channels=2, num_classes=3).eval()
    first = sub(model, "features.0.0", nn.Conv2d)
    assert (first.in_channels, first.out_channels, first.stride) == (2, 32, (2, 2))
    # Only the first convolution changed.
    assert sub(model, "features.1.0.block.0.0", nn.Conv2d).in_channels == 32
    assert model(torch.rand(1, 2, 64, 64)).shape == (1, 3)


def test_replace_first_conv_errors() -> None:
    with pytest.raises(ValueError, match="no Conv2d"):
        replace_first_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 1)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        replace_first_conv(grouped, 3)
    assert sub(replace_first_conv(grouped, 6), "0", nn.Conv2d).in_channels == 6


def test_no_pretrained_weights() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        get_model("resnet18", weights="DEFAULT")


# -- the top-down network ---------------------------------------------------------------------


@pytest.mark.parametrize("side", [28, 32])
def test_topdown_forward(side: int) -> None:
    model = get_model("topdown").eval()
    assert isinstance(model, TopDownNet)
    assert model(torch.rand(2, 1, side, side)).shape == (2, 10)


def test_topdown_stages_see_coarse_to_fine() -> None:
    model = get_model("topdown", width=8, num_classes=3).eval()
    names = ["stage1.conv1", "stage2.conv1", "stage3.conv1"]
    with capture_activations(model, names, where=Where.INPUT) as capture:
        model(torch.rand(2, 1, 28, 28))
    assert capture["stage1.conv1"].shape == (2, 1, 7, 7)
    assert capture["stage2.conv1"].shape == (2, 1 + 8, 14, 14)
    assert capture["stage3.conv1"].shape == (2, 1 + 8, 28, 28)


def test_topdown_stage1_input_is_the_average_pooled_image() -> None:
    model = get_model("topdown", width=4).eval()
    x = torch.rand(1, 1, 28, 28)
    with capture_activations(model, ["stage1.conv1"], where=Where.INPUT) as capture:
        model(x)
    expected = x.reshape(1, 1, 7, 4, 7, 4).mean(dim=(3, 5))
    torch.testing.assert_close(capture["stage1.conv1"], expected)


def test_topdown_modules_hookable_once() -> None:
    model = get_model("topdown", width=4, in_channels=3).eval()
    names = [n for n, _ in model.named_modules() if n]
    assert all(not getattr(m, "inplace", False) for m in model.modules())
    # capture_activations refuses any module called twice in one pass.
    with capture_activations(model, names) as capture:
        model(torch.rand(1, 3, 16, 16))
    assert set(names) <= set(capture.calls)


def test_topdown_rejects_bad_sizes() -> None:
    model = get_model("topdown")
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 1, 30, 28))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(1, 3, 28, 28))
