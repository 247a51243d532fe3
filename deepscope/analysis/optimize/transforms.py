"""Random robustness transforms for input optimization, one random draw PER IMAGE.

Peers draw one jitter/scale/angle for the whole batch (Lucent), which couples the targets of a
batch and weakens the regularization; here every image gets its own draw from a seeded
:class:`~deepscope.analysis.optimize.rng.RandomSource`, on the generator's device, so the same
seed gives the same draws on any device.

Consecutive geometric transforms (:class:`Pad`, :class:`Jitter`, :class:`RandomScale`,
:class:`RandomRotate`) are fused into ONE affine warp per image and a single ``grid_sample`` for
the batch: cheap, one interpolation instead of four, and the output keeps the input size ``H ×
W`` (a model with a fixed input size, like an MLP on 28 × 28, takes it unchanged). Geometry is
in pixel units, so rotations stay rotations on non-square images.

``Pad(p)`` keeps the size too: the image shrinks into a canvas ``p`` pixels wider on each side,
filled with ``fill``; the area that jitter, rotation or shrinking uncovers is filled with the
first ``Pad``'s fill in the fused group, or by reflection when the group has no ``Pad``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from deepscope.analysis.optimize.rng import RandomSource

__all__ = [
    "AffineTransform",
    "Blur",
    "Jitter",
    "Pad",
    "RandomRotate",
    "RandomScale",
    "Transform",
    "apply_transforms",
    "default_transforms",
    "gaussian_blur",
]

# Lucent's defaults (pad 12, jitter 8, jitter 4) are for 224-pixel inputs; other sizes scale.
_REFERENCE_SIZE = 224.0


class Transform(ABC):
    """A random, differentiable map ``(B, C, H, W) → (B, C, H, W)``, one draw per image."""

    @abstractmethod
    def __call__(self, images: Tensor, rng: RandomSource) -> Tensor:
        """Transform ``images`` ``(B, C, H, W)``."""


class AffineTransform(Transform):
    """A transform given by one 3 × 3 matrix per image (fused with its neighbours)."""

    @abstractmethod
    def matrices(self, batch: int, height: int, width: int, rng: RandomSource) -> Tensor:
        """``(B, 3, 3)`` float64: source → output, in pixel units centered on the image."""

    def __call__(self, images: Tensor, rng: RandomSource) -> Tensor:
        """Warp ``images`` ``(B, C, H, W)``."""
        return apply_transforms(images, [self], rng)


def _eye(batch: int) -> Tensor:
    return torch.eye(3, dtype=torch.float64).expand(batch, 3, 3).clone()


@dataclass(frozen=True)
class Pad(AffineTransform):
    """A ``pixels``-wide border of constant ``fill`` (None: reflection), keeping the size."""

    pixels: float
    fill: float | None = 0.5

    def __post_init__(self) -> None:
        if self.pixels < 0:
            raise ValueError(f"pad must be >= 0 pixels, got {self.pixels}")

    def matrices(self, batch: int, height: int, width: int, rng: RandomSource) -> Tensor:
        """Shrink by ``W / (W + 2p)`` across and ``H / (H + 2p)`` down."""
        m = _eye(batch)
        m[:, 0, 0] = width / (width + 2 * self.pixels)
        m[:, 1, 1] = height / (height + 2 * self.pixels)
        return m


@dataclass(frozen=True)
class Jitter(AffineTransform):
    """A shift by up to ``pixels`` in x and in y, uniform, sub-pixel, per image."""

    pixels: float

    def __post_init__(self) -> None:
        if self.pixels < 0:
            raise ValueError(f"jitter must be >= 0 pixels, got {self.pixels}")

    def matrices(self, batch: int, height: int, width: int, rng: RandomSource) -> Tensor:
        """Translations ``(dx, dy)`` drawn from ``[-pixels, pixels]``."""
        shift = rng.uniform(-self.pixels, self.pixels, 2).to(torch.float64)
        m = _eye(batch)
        m[:, 0, 2] = shift[:, 0]
        m[:, 1, 2] = shift[:, 1]
        return m


@dataclass(frozen=True)
class RandomScale(AffineTransform):
    """An isotropic zoom by a factor uniform in ``[low, high]`` about the center."""

    low: float = 0.9
    high: float = 1.1

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got {self.low, self.high}")

    def matrices(self, batch: int, height: int, width: int, rng: RandomSource) -> Tensor:
        """Zooms drawn from ``[low, high]``."""
        scale = rng.uniform(self.low, self.high).to(torch.float64)
        m = _eye(batch)
        m[:, 0, 0] = scale
        m[:, 1, 1] = scale
        return m


@dataclass(frozen=True)
class RandomRotate(AffineTransform):
    """A rotation about the center by an angle uniform in ``[-degrees, degrees]``."""

    degrees: float = 10.0

    def __post_init__(self) -> None:
        if self.degrees < 0:
            raise ValueError(f"rotation must be >= 0 degrees, got {self.degrees}")

    def matrices(self, batch: int, height: int, width: int, rng: RandomSource) -> Tensor:
        """Rotations drawn from ``[-degrees, degrees]``."""
        angle = rng.uniform(-self.degrees, self.degrees).to(torch.float64) * (math.pi / 180)
        cos, sin = torch.cos(angle), torch.sin(angle)
        m = _eye(batch)
        m[:, 0, 0], m[:, 0, 1] = cos, -sin
        m[:, 1, 0], m[:, 1, 1] = sin, cos
        return m


@dataclass(frozen=True)
class Blur(Transform):
    """A Gaussian blur with a standard deviation uniform in ``[sigma_min, sigma_max]`` pixels."""

    sigma_max: float = 1.0
    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(
                f"blur needs 0 <= sigma_min <= sigma_max, got {self.sigma_min, self.sigma_max}"
            )

    def __call__(self, images: Tensor, rng: RandomSource) -> Tensor:
        """Blur each image ``(B, C, H, W)`` with its own sigma (separable, reflect padding)."""
        sigma = rng.uniform(self.sigma_min, self.sigma_max).to(images.device, images.dtype)
        return gaussian_blur(images, sigma)


def gaussian_blur(images: Tensor, sigma: Tensor | float) -> Tensor:
    """Blur ``(B, C, H, W)`` by a Gaussian of std ``sigma`` (scalar or ``(B,)``), same size."""
    b, c, h, w = images.shape
    sig = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).reshape(-1)
    sig = sig.expand(b).clamp_min(1e-3)
    radius = max(1, math.ceil(3 * float(sig.max())))
    radius = min(radius, max(1, min(h, w) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sig[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, k)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, k): one kernel per image and channel
    x = images.reshape(1, b * c, h, w)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect" if w > radius else "replicate")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect" if h > radius else "replicate")
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def _warp(images: Tensor, forward: Tensor, fill: float | None) -> Tensor:
    """Resample ``images`` so that source point ``u`` lands at ``forward @ u``."""
    b, c, h, w = images.shape
    # affine_grid maps output → source in normalized coordinates; convert from pixel units.
    to_pixels = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], dtype=torch.float64))
    to_norm = torch.diag(torch.tensor([2.0 / w, 2.0 / h, 1.0], dtype=torch.float64))
    theta = to_norm @ torch.linalg.inv(forward) @ to_pixels
    theta = theta[:, :2, :].to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    if fill is None:
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
    # Zero padding around (x - fill) is constant padding with `fill` around x.
    out = F.grid_sample(
        images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out + fill


def apply_transforms(images: Tensor, transforms: Sequence[Transform], rng: RandomSource) -> Tensor:
    """Apply ``transforms`` in order to ``images`` ``(B, C, H, W)``; output has the same shape.

    Runs of affine transforms are fused into one warp per image.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    if rng.batch != images.shape[0]:
        raise ValueError(
            f"random source is for {rng.batch} images, the batch has {images.shape[0]}"
        )
    b, _, h, w = images.shape
    forward: Tensor | None = None
    fill: float | None = None
    has_pad = False
    for transform in transforms:
        if isinstance(transform, AffineTransform):
            m = transform.matrices(b, h, w, rng)
            forward = m if forward is None else m @ forward
            if isinstance(transform, Pad) and not has_pad:
                has_pad, fill = True, transform.fill
            continue
        if forward is not None:
            images = _warp(images, forward, fill)
            forward, fill, has_pad = None, None, False
        images = transform(images, rng)
    if forward is not None:
        images = _warp(images, forward, fill)
    return images


def default_transforms(height: int, width: int) -> list[Transform]:
    """Lucent's standard set, sized to the image: at 224 px pad 12, jitter 8, scale 0.9–1.1,
    rotate ±10°, jitter 4; pixel amounts scale with ``min(H, W) / 224`` (at 28 px: 1.5, 1, 0.5).
    """
    f = min(height, width) / _REFERENCE_SIZE
    return [
        Pad(12 * f, fill=0.5),
        Jitter(8 * f),
        RandomScale(0.9, 1.1),
        RandomRotate(10.0),
        Jitter(4 * f),
    ]
