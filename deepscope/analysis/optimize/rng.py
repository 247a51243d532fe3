"""Seeded per-image random draws for input optimization.

A batch draws either from one ``torch.Generator`` (one draw per image, all from that stream) or
from one generator per image. With one generator per image, image ``k``'s random start and
transforms do not depend on the rest of the batch, so a batched run of K targets gives the same
images as K separate runs with the same per-target generators (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Generators", "RandomSource", "target_generators"]

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the batch, one per image, or None (a generator seeded with 0)."""


class RandomSource:
    """Draws ``(B, *shape)`` tensors, one independent draw per image.

    Draws are made on the generators' device (CPU unless CUDA generators are given) and then
    moved by the caller: a seed gives the same draws whatever device the model is on.
    """

    def __init__(self, generator: Generators, batch: int) -> None:
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}")
        self.batch = batch
        self._single: torch.Generator | None = None
        self._each: list[torch.Generator] = []
        if generator is None:
            self._single = torch.Generator().manual_seed(0)
        elif isinstance(generator, torch.Generator):
            self._single = generator
        else:
            self._each = list(generator)
            if len(self._each) != batch:
                raise ValueError(f"{len(self._each)} generators given for a batch of {batch}")
            devices = {g.device for g in self._each}
            if len(devices) > 1:
                raise ValueError(f"per-image generators are on different devices: {devices}")

    def _draw(self, shape: tuple[int, ...], normal: bool) -> Tensor:
        fn = torch.randn if normal else torch.rand
        if self._single is not None:
            return fn((self.batch, *shape), generator=self._single, device=self._single.device)
        return torch.cat([fn((1, *shape), generator=g, device=g.device) for g in self._each], dim=0)

    def rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1) of shape ``(B, *shape)``, float32."""
        return self._draw(tuple(shape), normal=False)

    def randn(self, *shape: int) -> Tensor:
        """Standard normal of shape ``(B, *shape)``, float32."""
        return self._draw(tuple(shape), normal=True)

    def uniform(self, low: float, high: float, *shape: int) -> Tensor:
        """Uniform [low, high) of shape ``(B, *shape)``, float32."""
        return low + (high - low) * self.rand(*shape)


def target_generators(seed: int, targets: Sequence[int | str]) -> list[torch.Generator]:
    """One CPU generator per target, seeded from ``(seed, target)``.

    A target's draws depend only on the seed and the target (not on the batch it runs in).
    """
    generators = []
    for target in targets:
        key = f"{seed}:{target}".encode()
        # FNV-1a: a stable 63-bit seed (Python's str hash is salted per process).
        h = 0xCBF29CE484222325
        for byte in key:
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        generators.append(torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF))
    return generators
