"""The top-down (coarse-to-fine) classifier.

It sees the image at a quarter of its resolution first and at higher resolutions in later
stages. For an (N, C, H, W) input (H, W divisible by 4):

* ``stage1`` works on the image average-pooled to (H/4, W/4);
* ``stage2`` on the image pooled to (H/2, W/2) concatenated with ``stage1``'s features upsampled
  ×2;
* ``stage3`` on the full image concatenated with ``stage2``'s features upsampled ×2;
* then global average pooling and ``head`` (Linear → num_classes).

Every module is used once and nothing is in place, so each can be hooked by its name
(``stage1.conv1``, ``stage1.relu1``, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepscope.models.registry import register_model

__all__ = ["Stage", "TopDownNet", "topdown"]


class Stage(nn.Module):
    """Two Conv3x3 + BatchNorm + ReLU blocks: (N, in_ch, h, w) → (N, width, h, w)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(x)))  # type: ignore[no-any-return]


class TopDownNet(nn.Module):
    """Coarse-to-fine classifier: (N, in_channels, H, W) → logits (N, num_classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError(
                f"num_classes, in_channels and width must be positive, "
                f"got {num_classes}, {in_channels}, {width}"
            )
        self.in_channels = in_channels
        self.pool4 = nn.AvgPool2d(4)
        self.pool2 = nn.AvgPool2d(2)
        self.stage1 = Stage(in_channels, width)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.stage2 = Stage(in_channels + width, width)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.stage3 = Stage(in_channels + width, width)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"input height and width must be divisible by 4, got {h}×{w}")
        f1 = self.stage1(self.pool4(x))
        f2 = self.stage2(torch.cat([self.pool2(x), self.up1(f1)], dim=1))
        f3 = self.stage3(torch.cat([x, self.up2(f2)], dim=1))
        return self.head(self.flatten(self.gap(f3)))  # type: ignore[no-any-return]


@register_model(
    "topdown",
    input_shape=(1, 28, 28),
    description="coarse-to-fine CNN: stages at 1/4, 1/2 and full resolution",
)
def topdown(*, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> TopDownNet:
    """Build a :class:`TopDownNet`; input (N, in_channels, H, W) with H, W divisible by 4."""
    return TopDownNet(num_classes=num_classes, in_channels=in_channels, width=width)
