"""The shared plumbing: layer descriptions and activation capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepscope.analysis.hooks import Where, capture_activations, eval_mode
from deepscope.analysis.layers import (
    LayerKind,
    finite_or_raise,
    layer_from_module,
    select_layers,
    weight_layers,
)


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.act = nn.ReLU()  # called twice: its activation is ambiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_weight_layers_describe_conv_geometry() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1),
        nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=4),
        nn.Flatten(),
        nn.LazyLinear(10),
    )
    with pytest.raises(ValueError, match=r"layer '3' \(LazyLinear\) has no weights"):
        weight_layers(model)
    model(torch.zeros(1, 3, 8, 8))  # materializes the lazy layer
    layers = weight_layers(model)
    assert [layer.name for layer in layers] == ["0", "1", "3"]
    assert [layer.kind for layer in layers] == [
        LayerKind.CONV2D,
        LayerKind.CONV2D,
        LayerKind.LINEAR,
    ]
    assert layers[0].stride == (2, 2) and layers[0].padding == (1, 1)
    assert layers[1].padding == (2, 2) and layers[1].groups == 4 and layers[1].in_channels == 8


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect"])
def test_apply_is_the_layer_without_bias(mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode=mode)
    layer = layer_from_module("c", conv)
    assert layer is not None
    x = torch.randn(2, 4, 9, 7)
    expected = conv(x) - conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer.apply(x), expected)


def test_select_layers_lists_valid_names() -> None:
    layers = weight_layers(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert [layer.name for layer in select_layers(layers, ["2"])] == ["2"]
    with pytest.raises(ValueError, match=r"unknown layer\(s\) 'fc9'; weight layers are: 0, 2"):
        select_layers(layers, ["fc9"])


def test_non_finite_weights_are_named() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '1' has non-finite values .* weight"):
        finite_or_raise(weight_layers(model))


def test_model_without_weight_layers() -> None:
    with pytest.raises(ValueError, match="no Linear or Conv2d layers"):
        weight_layers(nn.Sequential(nn.ReLU()))


def test_capture_inputs_and_outputs_then_hooks_removed() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with capture_activations(model, ["0", "2"], Where.INPUT, clone=False) as cap:
        model(x)
    assert torch.equal(cap["0"], x)
    torch.testing.assert_close(cap["2"], torch.relu(model[0](x)))
    with capture_activations(model, ["1"], Where.OUTPUT) as cap:
        out = model(x)
    torch.testing.assert_close(model[2](cap["1"]), out)
    assert _no_hooks(model)


def test_hooks_removed_when_the_body_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(RuntimeError, match="boom"), capture_activations(model, ["0", "1"]):
        model(torch.randn(1, 3))
        raise RuntimeError("boom")
    assert _no_hooks(model)


def test_unknown_layer_lists_valid_names() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with (
        pytest.raises(ValueError, match=r"unknown layer\(s\) 'conv1'; valid layers are: 0, 1"),
        capture_activations(model, ["conv1"]),
    ):
        pass


def test_reused_module_is_refused() -> None:
    model = Reused()
    with (
        pytest.raises(ValueError, match="'act' is called 2 times in one forward pass"),
        capture_activations(model, ["act"]) as _,
    ):
        model(torch.randn(1, 4))
    assert _no_hooks(model)


def test_in_place_overwrite_is_detected() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True))
    x = torch.randn(8, 3)
    before_relu = model[0](x).detach()
    with capture_activations(model, ["0"], Where.OUTPUT, clone=True) as cap:
        model(x)
    # clone=True keeps the value the layer produced, and reports the overwrite.
    torch.testing.assert_close(cap["0"].detach(), before_relu)
    assert cap.modified_in_place() == ["0"]
    with capture_activations(model, ["0"], Where.OUTPUT, clone=False) as cap:
        model(x)
    with pytest.raises(ValueError, match="overwritten by a later in-place operation"):
        cap["0"]


def test_eval_mode_restores_each_submodule() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Dropout())
    model.train()
    model[1].eval()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not model[0].training
        raise RuntimeError
    assert model.training and model[0].training and not model[1].training
