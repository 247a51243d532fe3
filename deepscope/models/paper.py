"""The paper's networks (Pattichis & Pattichis 2024), registered in the architecture registry.

* ``fcnn1``: one fully connected layer followed by a SELU;
* ``fcnn5``: five fully connected layers (784→256→256→128→32→10), SELU between them;
* ``resnet18_gray``: torchvision's ResNet18 with a 1-channel first convolution.

The FCNNs are ``nn.Sequential`` with fixed child names (``flatten``, ``fc1``, ``selu1``, ...):
the exact-inverse code walks the children in order, and the analyses hook modules by name. Each
SELU is its own instance and nothing is in place, so every activation can be captured.
"""

from __future__ import annotations

from collections import OrderedDict
from math import prod

from torch import nn

from deepscope.models.registry import register_model, replace_first_conv

__all__ = ["FCNN5_WIDTHS", "fcnn1", "fcnn5", "resnet18_gray"]

#: Hidden widths of ``fcnn5`` (the paper's).
FCNN5_WIDTHS: tuple[int, ...] = (256, 256, 128, 32)


def _in_features(input_shape: tuple[int, int, int]) -> int:
    if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(f"input_shape must be a positive (C, H, W) triple, got {input_shape!r}")
    return prod(int(d) for d in input_shape)


def _check_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")


@register_model(
    "fcnn1",
    input_shape=(1, 28, 28),
    invertible=True,
    description="paper: Flatten → Linear(784, 10) → SELU",
)
def fcnn1(
    *, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)
) -> nn.Sequential:
    """Input (N, C, H, W) → logits (N, num_classes): ``flatten, fc1, selu1``."""
    _check_classes(num_classes)
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(_in_features(input_shape), num_classes),
            selu1=nn.SELU(),
        )
    )


@register_model(
    "fcnn5",
    input_shape=(1, 28, 28),
    invertible=True,
    description="paper: 5 Linear layers 784→256→256→128→32→10, SELU between",
)
def fcnn5(
    *, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)
) -> nn.Sequential:
    """Input (N, C, H, W) → logits (N, num_classes).

    Children: ``flatten, fc1, selu1, fc2, selu2, fc3, selu3, fc4, selu4, fc5`` (no activation
    after ``fc5``).
    """
    _check_classes(num_classes)
    widths = (_in_features(input_shape), *FCNN5_WIDTHS, num_classes)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    last = len(widths) - 1
    for i in range(1, last + 1):
        layers[f"fc{i}"] = nn.Linear(widths[i - 1], widths[i])
        if i < last:
            layers[f"selu{i}"] = nn.SELU()
    return nn.Sequential(layers)


@register_model(
    "resnet18_gray",
    input_shape=(1, 28, 28),
    description="paper: torchvision ResNet18 with a 1-channel conv1",
)
def resnet18_gray(*, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Input (N, in_channels, H, W) → logits (N, num_classes).

    ``conv1`` is ``Conv2d(in_channels, 64, 7, stride 2, padding 3, bias=False)``; the rest is
    torchvision's ResNet18 (whose blocks use in-place ReLUs, reused within a block).
    """
    import torchvision

    _check_classes(num_classes)
    model: nn.Module = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    return replace_first_conv(model, in_channels)
