"""Image parametrizations: trainable tensors → images ``(B, C, H, W)`` in the input range [0, 1].

* :class:`PixelParam`: one value per pixel.
* :class:`FFTParam`: the image's 2-D real spectrum, scaled by ``1/f`` so that every frequency
  band starts with comparable energy and plain gradient steps do not favour high frequencies;
  for 3 channels, a fixed color-decorrelation matrix (the square root of the ImageNet color
  covariance, as in Olah et al. 2017) maps decorrelated to RGB channels. 1 channel and more than
  3 channels are supported, without decorrelation.
* :class:`LowResParam`: a low-resolution parametrization upsampled to the full size (octaves).

Any ``H × W`` works (non-square, odd, 28 × 28): the spectrum uses ``rfft2``/``irfft2`` with the
exact output size. Every parametrization can start from given images (caricatures, inversions);
random starts draw from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from enum import StrEnum

import torch
from torch import Tensor, nn

from deepscope.analysis.optimize.rng import Generators, RandomSource

__all__ = [
    "FFTParam",
    "ImageParam",
    "LowResParam",
    "ParamKind",
    "PixelParam",
    "Squash",
    "image_param",
]

# sqrt of the ImageNet RGB covariance (Olah et al. 2017), columns scaled to unit max norm.
_COLOR_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64
)
_COLOR = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()
# Shrinks the spectrum's output so that sigmoid starts far from saturation (Lucid's constant).
_FFT_GAIN = 4.0
_EPS = 1e-3


class ParamKind(StrEnum):
    """How the image is parametrized."""

    PIXEL = "pixel"
    FFT = "fft"


class Squash(StrEnum):
    """How an unbounded value becomes a pixel in [0, 1]."""

    SIGMOID = "sigmoid"
    CLAMP = "clamp"


def _check_shape(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    if len(shape) != 4 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"image shape must be positive (B, C, H, W), got {tuple(shape)}")
    b, c, h, w = (int(s) for s in shape)
    return b, c, h, w


def _check_init(init: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    if tuple(init.shape) != shape:
        raise ValueError(f"init images have shape {tuple(init.shape)}, expected {shape}")
    if not torch.isfinite(init).all():
        raise ValueError("init images contain NaN or infinite values")
    return init.detach().to(torch.float32).clamp(0.0, 1.0)


def _randn(shape: tuple[int, ...], generator: Generators, device: torch.device) -> Tensor:
    # One draw per image (see rng.py), made on the generators' device and then moved, so a seed
    # gives the same start on any device.
    return RandomSource(generator, shape[0]).randn(*shape[1:]).to(device)


def _clamp01(x: Tensor) -> Tensor:
    """Clamp to [0, 1] in value, identity in gradient (straight-through).

    ``Tensor.clamp`` has zero gradient AT the bounds, so a pixel projected onto 0 or 1 would
    never move again; this one keeps receiving gradient and moves back when it should.
    """
    return x + (x.clamp(0.0, 1.0) - x).detach()


class ImageParam(nn.Module, ABC):
    """A trainable image batch. Calling it returns ``(B, C, H, W)`` in [0, 1]."""

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.shape: tuple[int, int, int, int] = _check_shape(shape)

    @abstractmethod
    def forward(self) -> Tensor:
        """The images ``(B, C, H, W)`` in [0, 1]."""

    def constrain_(self) -> None:
        """Project the parameters back to their feasible set (after an optimizer step)."""


class PixelParam(ImageParam):
    """One parameter per pixel.

    ``SIGMOID``: image = sigmoid(p). ``CLAMP``: image = p, kept in [0, 1] by projecting after
    every step (projected gradient ascent), which can reach 0 and 1 exactly.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        *,
        init: Tensor | None = None,
        sd: float = 0.01,
        squash: Squash | str = Squash.SIGMOID,
        generator: Generators = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(shape)
        self.squash = Squash(squash)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if init is not None:
            x = _check_init(init, self.shape).to(dev)
            value = torch.logit(x.clamp(_EPS, 1 - _EPS)) if self.squash is Squash.SIGMOID else x
        else:
            noise = sd * _randn(self.shape, generator, dev)
            value = noise if self.squash is Squash.SIGMOID else (0.5 + noise).clamp(0, 1)
        self.pixels = nn.Parameter(value)

    def forward(self) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1]."""
        if self.squash is Squash.SIGMOID:
            return torch.sigmoid(self.pixels)
        return _clamp01(self.pixels)

    def constrain_(self) -> None:
        """Clamp the pixels to [0, 1] (CLAMP only)."""
        if self.squash is Squash.CLAMP:
            with torch.no_grad():
                self.pixels.clamp_(0.0, 1.0)


def _spectrum_scale(height: int, width: int, decay_power: float) -> Tensor:
    """``(H, W // 2 + 1)``: ``1 / max(f, 1/max(H, W)) ** decay_power``."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    freq = torch.sqrt(fx * fx + fy * fy).clamp_min(1.0 / max(height, width))
    return (1.0 / freq**decay_power).to(torch.float32)


class FFTParam(ImageParam):
    """Decorrelated Fourier parametrization (Olah et al. 2017).

    Parameters: the real and imaginary parts of ``rfft2`` of each channel, ``(B, C, H, W//2+1,
    2)``, multiplied by a ``1/f`` scale before the inverse transform. With ``decorrelate`` and
    3 channels, the channels are decorrelated color components mapped to RGB by a fixed matrix.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        *,
        init: Tensor | None = None,
        sd: float = 0.01,
        decay_power: float = 1.0,
        decorrelate: bool = True,
        squash: Squash | str = Squash.SIGMOID,
        generator: Generators = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(shape)
        self.scale: Tensor
        self.color: Tensor
        _, channels, height, width = self.shape
        self.squash = Squash(squash)
        self.decorrelate = decorrelate and channels == 3
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # The gain is folded into the spectrum scale: one pass less over the images per step.
        scale = _spectrum_scale(height, width, decay_power) / _FFT_GAIN
        self.register_buffer("scale", scale.to(dev))
        self.register_buffer("color", _COLOR.to(torch.float32).to(dev))
        spec_shape = (*self.shape[:2], height, width // 2 + 1, 2)
        if init is not None:
            value = self._spectrum_of(_check_init(init, self.shape).to(dev))
        else:
            value = sd * _randn(spec_shape, generator, dev)
        self.spectrum = nn.Parameter(value)

    def _linear_image(self) -> Tensor:
        """The unsquashed image ``(B, C, H, W)``, color-mixed, centered near 0."""
        height, width = self.shape[2], self.shape[3]
        spec = torch.view_as_complex(self.spectrum) * self.scale
        image: Tensor = torch.fft.irfft2(spec, s=(height, width), norm="ortho")
        if self.decorrelate:
            # out[d] = Σ_c color[d, c] image[c], as one broadcast matmul (einsum permutes).
            image = torch.matmul(self.color, image.flatten(2)).view_as(image)
        return image

    def _spectrum_of(self, images: Tensor) -> Tensor:
        """Parameters whose image is ``images`` exactly (inverse of :meth:`forward`)."""
        if self.squash is Squash.SIGMOID:
            z = torch.logit(images.clamp(_EPS, 1 - _EPS))
        else:
            z = images - 0.5
        if self.decorrelate:
            inverse = torch.linalg.inv(self.color.to(torch.float64)).to(z.dtype)
            z = torch.matmul(inverse, z.flatten(2)).view_as(z)
        spec = torch.fft.rfft2(z, norm="ortho") / self.scale
        return torch.view_as_real(spec).contiguous()

    def forward(self) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1]."""
        z = self._linear_image()
        if self.squash is Squash.SIGMOID:
            return torch.sigmoid(z)
        return _clamp01(z + 0.5)


class LowResParam(ImageParam):
    """``clamp(upsample(low()) + detail, 0, 1)`` at ``size``: coarse-to-fine octaves.

    ``detail`` ``(B, C, H, W)`` is a fixed high-frequency residual (the part of the previous
    octave's image that the low resolution cannot hold), or None.
    """

    def __init__(
        self, low: ImageParam, size: tuple[int, int], detail: Tensor | None = None
    ) -> None:
        b, c = low.shape[:2]
        super().__init__((b, c, int(size[0]), int(size[1])))
        self.low = low
        self.detail: Tensor | None
        if detail is not None and tuple(detail.shape) != self.shape:
            raise ValueError(f"detail has shape {tuple(detail.shape)}, expected {self.shape}")
        self.register_buffer("detail", None if detail is None else detail.detach().clone())

    def forward(self) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1]."""
        low: Tensor = self.low()
        if low.shape[2:] != self.shape[2:]:
            low = nn.functional.interpolate(
                low, size=self.shape[2:], mode="bilinear", align_corners=False
            )
        detail = self.detail
        if detail is None:
            return low
        return _clamp01(low + detail)

    def constrain_(self) -> None:
        """Constrain the low-resolution parameters."""
        self.low.constrain_()


def image_param(
    kind: ParamKind | str,
    shape: tuple[int, int, int, int],
    *,
    init: Tensor | None = None,
    sd: float = 0.01,
    squash: Squash | str = Squash.SIGMOID,
    decorrelate: bool = True,
    decay_power: float = 1.0,
    generator: Generators = None,
    device: torch.device | str | None = None,
) -> ImageParam:
    """A :class:`PixelParam` or :class:`FFTParam` of ``shape`` ``(B, C, H, W)``.

    Args:
        init: start from these images ``(B, C, H, W)`` in [0, 1] instead of noise.
        sd: standard deviation of the random start (in parameter units).
        squash: sigmoid (smooth, never exactly 0/1) or clamp.
        decorrelate: color decorrelation (FFT, 3 channels only).
        decay_power: exponent of the ``1/f`` spectrum scale (FFT).
        generator: the source of the random start: one generator, or one per image.
        device: where the parameters live.

    Raises:
        ValueError: unknown kind (lists the valid ones), bad shape, or ``init`` of another shape.
    """
    try:
        param_kind = ParamKind(kind)
    except ValueError:
        valid = ", ".join(k.value for k in ParamKind)
        raise ValueError(f"unknown parametrization {kind!r}; valid: {valid}") from None
    if not math.isfinite(sd) or sd < 0:
        raise ValueError(f"sd must be finite and >= 0, got {sd}")
    if param_kind is ParamKind.PIXEL:
        return PixelParam(
            shape, init=init, sd=sd, squash=squash, generator=generator, device=device
        )
    return FFTParam(
        shape,
        init=init,
        sd=sd,
        decay_power=decay_power,
        decorrelate=decorrelate,
        squash=squash,
        generator=generator,
        device=device,
    )
