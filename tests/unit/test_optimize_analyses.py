"""The three analyses on small models: a fcnn5-like MLP trained on scikit-learn's digits
(8 × 8 resized to 28 × 28) in seconds, a random injective Linear layer, a small CNN."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import cast

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from deepscope.analysis.optimize import activation_maximization, caricature, inversion
from deepscope.models.registry import get_model

NORM = ((0.5,), (0.5,))


def _fcnn5() -> nn.Sequential:
    return cast(nn.Sequential, get_model("fcnn5"))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(data.target)


@pytest.fixture(scope="module")
def trained_fcnn5(digits: tuple[torch.Tensor, torch.Tensor]) -> nn.Sequential:
    x, y = digits
    torch.manual_seed(0)
    model = _fcnn5()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    xn = (x - 0.5) / 0.5
    for _ in range(8):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(xn[idx]), y[idx])
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xn).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95
    return model


def test_activation_maximization_draws_each_class(trained_fcnn5: nn.Sequential) -> None:
    result = activation_maximization(
        trained_fcnn5, input_shape=(1, 28, 28), normalization=NORM, steps=96
    )
    assert result.images.shape == (10, 1, 28, 28)
    assert [m["target"] for m in result.metrics] == list(range(10))
    for m in result.metrics:
        assert m["final_objective"] > m["initial_objective"]
    correct = sum(m["predicted_class"] == m["target"] for m in result.metrics)
    assert correct >= 8
    json.dumps(result.metrics)
    assert result.history.shape == (96, 10)


def test_batched_targets_equal_separate_runs(trained_fcnn5: nn.Sequential) -> None:
    kwargs = {"input_shape": (1, 28, 28), "normalization": NORM, "steps": 24}
    batched = activation_maximization(trained_fcnn5, targets=[1, 3, 5], **kwargs)  # type: ignore[arg-type]
    chunked = activation_maximization(trained_fcnn5, targets=[1, 3, 5], batch_size=2, **kwargs)  # type: ignore[arg-type]
    for k, target in enumerate([1, 3, 5]):
        alone = activation_maximization(trained_fcnn5, targets=[target], **kwargs)  # type: ignore[arg-type]
        assert torch.allclose(batched.images[k], alone.images[0], atol=1e-4)
        assert torch.allclose(chunked.images[k], alone.images[0], atol=1e-4)


def test_activation_maximization_of_layer_channels_and_errors(
    trained_fcnn5: nn.Sequential,
) -> None:
    result = activation_maximization(
        trained_fcnn5, input_shape=(1, 28, 28), layer="selu4", normalization=NORM, steps=20
    )
    assert len(result.metrics) == 32  # targets=None: every feature of the layer
    assert all(m["layer"] == "selu4" for m in result.metrics)
    assert sum(m["final_objective"] > m["initial_objective"] for m in result.metrics) >= 30
    with pytest.raises(ValueError, match=r"unknown layer.*'selu9'.*valid layers are: flatten, fc1"):
        activation_maximization(trained_fcnn5, input_shape=(1, 28, 28), layer="selu9", steps=1)
    with pytest.raises(ValueError, match="target 10 out of range: 10 classes"):
        activation_maximization(trained_fcnn5, input_shape=(1, 28, 28), targets=[10], steps=1)
    with pytest.raises(ValueError, match="steps must be positive"):
        activation_maximization(trained_fcnn5, input_shape=(1, 28, 28), steps=0)


def test_inversion_of_an_injective_first_layer_recovers_the_input(
    digits: tuple[torch.Tensor, torch.Tensor],
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(), fc1=nn.Linear(784, 1024), relu=nn.ReLU(), out=nn.Linear(1024, 10)
        )
    )
    images = digits[0][:2]
    result = inversion(model, images, layers=["fc1", "out"], normalization=NORM)
    assert result.images.shape == (4, 1, 28, 28)
    by_layer = {(m["target"], m["image"]): m for m in result.metrics}
    for i in range(2):
        first = by_layer[("fc1", i)]
        assert first["image_error"] < 0.05
        assert first["representation_error"] < 0.05
        # 10 numbers cannot pin down 784 pixels: the deep reconstruction differs from the input.
        assert by_layer[("out", i)]["image_error"] > first["image_error"]
    json.dumps(result.metrics)


def test_inversion_layers_batched_equal_separate(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _fcnn5()
    image = digits[0][3]
    both = inversion(model, image, layers=["fc1", "selu3"], normalization=NORM, steps=20)
    alone = inversion(model, image, layers=["selu3"], normalization=NORM, steps=20)
    assert torch.allclose(both.images[1], alone.images[0], atol=1e-4)


def test_caricature_amplifies_each_layer_on_a_fixed_size_mlp(
    trained_fcnn5: nn.Sequential, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images = digits[0][:2]
    result = caricature(
        trained_fcnn5, images, layers=["selu1", "selu3"], normalization=NORM, steps=16
    )
    assert result.images.shape == (4, 1, 28, 28)
    assert [(m["target"], m["image"]) for m in result.metrics] == [
        ("selu1", 0),
        ("selu1", 1),
        ("selu3", 0),
        ("selu3", 1),
    ]
    for m in result.metrics:
        assert m["final_objective"] > m["initial_objective"]
    assert result.history.shape == (16 * 3, 4)  # three octaves
    # A caricature, not a new image: it stays close to its source.
    change = (result.images - images.repeat(2, 1, 1, 1)).abs().mean()
    assert 0.01 < change < 0.3
    with pytest.raises(ValueError, match="octaves must be >= 1"):
        caricature(trained_fcnn5, images, layers=["selu1"], octaves=0)


def test_caricature_on_a_cnn_with_non_square_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3, padding=1),
            bn=nn.BatchNorm2d(8),
            relu=nn.ReLU(inplace=True),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(8, 4),
        )
    )
    coarse = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    image = F.interpolate(coarse, size=(20, 28), mode="bilinear", align_corners=False)
    result = caricature(model, image, layers=["bn"], steps=8, octaves=2)
    assert result.images.shape == (1, 3, 20, 28)
    assert result.metrics[0]["final_objective"] > result.metrics[0]["initial_objective"]
    assert result.metrics[0]["amplification"] > 1


@pytest.mark.parametrize("channels", [3, 5])
def test_activation_maximization_on_a_batchnorm_cnn_non_square(channels: int) -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8)
    model = nn.Sequential(
        OrderedDict(
            conv=conv,
            bn=bn,
            relu=nn.ReLU(inplace=True),
            pool=nn.AdaptiveAvgPool2d(2),
            flatten=nn.Flatten(),
            fc=nn.Linear(32, 4),
        )
    )
    with torch.no_grad():  # running statistics of noise inputs: a reachable prior
        noise = conv(torch.rand(32, channels, 20, 28))
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(noise.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(noise.var(dim=(0, 2, 3)))
    mean, std = [0.5] * channels, [0.25] * channels
    result = activation_maximization(
        model, input_shape=(channels, 20, 28), normalization=(mean, std), steps=24
    )
    assert result.images.shape == (4, channels, 20, 28)
    for m in result.metrics:
        assert m["final_objective"] > m["initial_objective"]
    assert result.warnings == []  # the in-place ReLU follows 'bn', not a hooked layer
