"""The model's input normalization, ``(x − mean) / std`` per channel: the one implementation
that training, the analyses, input optimization and predictions all use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ChannelNormalization"]


@dataclass(frozen=True)
class ChannelNormalization:
    """Per-channel ``(x − mean) / std`` of ``(B, C, H, W)`` images in [0, 1], and its inverse.

    ``mean`` and ``std`` have one value per channel (a single value is repeated).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, mean: Sequence[float], std: Sequence[float], channels: int) -> ChannelNormalization:
        """Validated and expanded to ``channels`` values.

        Raises:
            ValueError: a length is neither 1 nor ``channels``, or a std is not positive.
        """
        means, stds = [float(v) for v in mean], [float(v) for v in std]
        for what, values in (("mean", means), ("std", stds)):
            if len(values) not in (1, channels):
                raise ValueError(
                    f"normalization {what} has {len(values)} values for {channels} channels"
                )
        if any(not s > 0 for s in stds):
            raise ValueError(f"normalization std must be positive, got {stds}")
        return cls(tuple(means * (channels // len(means))), tuple(stds * (channels // len(stds))))

    @classmethod
    def identity(cls, channels: int) -> ChannelNormalization:
        return cls((0.0,) * channels, (1.0,) * channels)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        return mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` pixels in [0, 1] → the model's input space."""
        mean, std = self._stats(x)
        # An inference-mode batch norm is (x − mean) / sqrt(var) in one fused pass (and one in
        # the backward), where the plain expression makes two of each: input optimization
        # calls this at every step.
        out: Tensor = nn.functional.batch_norm(x, mean, std.square(), None, None, False, 0.0, 0.0)
        return out

    def denormalize(self, x: Tensor) -> Tensor:
        """The model's input space → pixels (the inverse of :meth:`normalize`)."""
        mean, std = self._stats(x)
        return x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
