"""Image priors for input optimization: per-image penalties ``(B,)`` to MINIMIZE.

Each regularizer reads the parametrized images ``(B, C, H, W)`` in [0, 1] (before the random
transforms and the model's normalization) and, for the batch-norm prior, the per-image channel
statistics of the inputs of the model's BatchNorm2d layers (:data:`LayerStats`, computed during
the same forward pass by :func:`input_statistics`). Penalties are per image so that the images
of a batch stay independent problems.

* :class:`AlphaNorm` — Mahendran & Vedaldi's α-norm ``mean |(x − 0.5) / 0.5|^α`` (α = 6 keeps
  pixels in range without flattening them; α = 2 is the plain L2 decay).
* :class:`TotalVariation` — ``mean ((∂x)² + (∂y)²)^{β/2} / V^β`` (β = 2), with
  ``V = 0.5 / 6.5`` the typical gradient of a natural image in [0, 1] units (M&V's ``B / 6.5``),
  so that a natural image scores about 1.
* :class:`BlurPenalty` — ``mean (x − blur(x))²``, high-frequency energy.
* :class:`BatchNormPrior` — DeepInversion (Yin et al. 2020):
  ``Σ_l w_l (‖μ_l(x) − μ_bn,l‖₂ + ‖σ²_l(x) − σ²_bn,l‖₂)`` over BatchNorm2d layers, the first
  layer weighted ×10. The statistics are per image (over H × W) rather than over the batch as in
  the paper, so that each target's image is its own problem and batching does not change it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deepscope.analysis.optimize.transforms import gaussian_blur

__all__ = [
    "AlphaNorm",
    "BatchNormPrior",
    "BlurPenalty",
    "LayerStats",
    "Regularizer",
    "TotalVariation",
    "batchnorm_layers",
    "batchnorm_prior",
    "input_statistics",
    "l2",
]

LayerStats = Mapping[str, tuple[Tensor, Tensor]]
"""Per layer name: the per-image, per-channel ``(mean, variance)`` of its input, ``(B, C)``."""

_TV_SCALE = 0.5 / 6.5


class Regularizer(ABC):
    """A weighted per-image penalty.

    ``layers``: modules whose input statistics it reads (their inputs are hooked).
    """

    weight: float
    layers: tuple[str, ...] = ()

    @abstractmethod
    def penalty(self, images: Tensor, stats: LayerStats) -> Tensor:
        """Unweighted penalty ``(B,)`` of ``images`` ``(B, C, H, W)`` in [0, 1]."""

    def __call__(self, images: Tensor, stats: LayerStats) -> Tensor:
        """``weight * penalty``, ``(B,)``."""
        return self.weight * self.penalty(images, stats)


def _check_weight(weight: float) -> None:
    if not weight >= 0:
        raise ValueError(f"regularizer weight must be >= 0, got {weight}")


@dataclass(frozen=True)
class AlphaNorm(Regularizer):
    """``mean |(x − center) / scale|^α`` per image (α = 6: Mahendran & Vedaldi)."""

    weight: float
    alpha: float = 6.0
    center: float = 0.5
    scale: float = 0.5

    def __post_init__(self) -> None:
        _check_weight(self.weight)
        if self.alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {self.alpha}")

    def penalty(self, images: Tensor, stats: LayerStats) -> Tensor:
        """``(B,)``."""
        if self.alpha == 2.0:
            value: Tensor = _CenteredSquare.apply(images, self.center)
            return value / self.scale**2
        z = ((images - self.center) / self.scale).flatten(1)
        return z.abs().pow(self.alpha).mean(dim=1)


class _CenteredSquare(torch.autograd.Function):
    """``mean (x − c)²`` per image, ``(B, ...) → (B,)``, with a one-pass backward.

    The regularizers run on every image at every step; autograd's graph for the plain
    expression makes several full passes over the batch, which shows next to a small network.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, center: float) -> Tensor:
        d = x.flatten(1) - center
        ctx.save_for_backward(d)
        ctx.shape = x.shape
        value: Tensor = torch.linalg.vector_norm(d, dim=1).square() / d.shape[1]
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (d,) = ctx.saved_tensors
        return (d * (2.0 * grad / d.shape[1])[:, None]).reshape(ctx.shape), None


class _SquaredGradient(torch.autograd.Function):
    """``mean over (C, H−1, W−1) of (∂x)² + (∂y)²`` per image (forward differences), with a
    hand-written backward (about a third of autograd's passes over the batch)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        dy = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
        dx = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
        ctx.save_for_backward(dx, dy)
        ctx.shape = x.shape
        count = dx[0].numel()
        norm_x = torch.linalg.vector_norm(dx.flatten(1), dim=1)
        norm_y = torch.linalg.vector_norm(dy.flatten(1), dim=1)
        value: Tensor = (norm_x.square() + norm_y.square()) / count
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        dx, dy = ctx.saved_tensors
        coef = (2.0 / dx[0].numel()) * grad[:, None, None, None]
        gx, gy = dx * coef, dy * coef
        out = torch.zeros(ctx.shape, dtype=dx.dtype, device=dx.device)
        out[:, :, :-1, :-1] -= gx + gy
        out[:, :, :-1, 1:] += gx
        out[:, :, 1:, :-1] += gy
        return out


def l2(weight: float) -> AlphaNorm:
    """L2 decay of the image around gray: :class:`AlphaNorm` with α = 2."""
    return AlphaNorm(weight, alpha=2.0)


@dataclass(frozen=True)
class TotalVariation(Regularizer):
    """``mean ((∂x)² + (∂y)²)^{β/2} / V^β`` per image (β = 2: Mahendran & Vedaldi)."""

    weight: float
    beta: float = 2.0
    scale: float = _TV_SCALE

    def __post_init__(self) -> None:
        _check_weight(self.weight)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def penalty(self, images: Tensor, stats: LayerStats) -> Tensor:
        """``(B,)``; 0 for images of one row or column."""
        if images.shape[2] < 2 or images.shape[3] < 2:
            return images.new_zeros(images.shape[0])
        if self.beta == 2.0:
            value: Tensor = _SquaredGradient.apply(images)
            return value / self.scale**2
        dy = images[:, :, 1:, :-1] - images[:, :, :-1, :-1]
        dx = images[:, :, :-1, 1:] - images[:, :, :-1, :-1]
        sq = (dx.pow(2) + dy.pow(2)) / self.scale**2
        # The eps keeps the gradient of |∇x|^β finite at flat regions when β < 2.
        sq = (sq + 1e-8).pow(self.beta / 2)
        return sq.flatten(1).mean(dim=1)


@dataclass(frozen=True)
class BlurPenalty(Regularizer):
    """``mean (x − blur_σ(x))²`` per image: energy above the blur's cut-off."""

    weight: float
    sigma: float = 1.0

    def __post_init__(self) -> None:
        _check_weight(self.weight)
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")

    def penalty(self, images: Tensor, stats: LayerStats) -> Tensor:
        """``(B,)``."""
        blurred = gaussian_blur(images, self.sigma).detach()
        return (images - blurred).pow(2).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class BatchNormPrior(Regularizer):
    """DeepInversion's feature-statistics prior on the inputs of BatchNorm2d layers.

    Attributes:
        weight: overall weight.
        layers: BatchNorm2d module names, in model order.
        means, variances: each layer's running statistics ``(C,)``.
        first_weight: multiplier of the first layer's term (10 in the paper).
    """

    weight: float
    layers: tuple[str, ...] = ()
    means: tuple[Tensor, ...] = field(default=(), repr=False)
    variances: tuple[Tensor, ...] = field(default=(), repr=False)
    first_weight: float = 10.0

    _ref_mean: Tensor = field(init=False, repr=False)
    _ref_var: Tensor = field(init=False, repr=False)
    _segments: Tensor = field(init=False, repr=False)
    _layer_weights: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_weight(self.weight)
        if not len(self.layers) == len(self.means) == len(self.variances):
            raise ValueError("batch-norm prior needs one mean and one variance per layer")
        if not self.layers:
            raise ValueError("batch-norm prior needs at least one layer")
        # All layers' statistics side by side, so that the penalty is a handful of tensor
        # operations per step instead of a dozen per layer.
        sizes = [int(m.numel()) for m in self.means]
        device = self.means[0].device
        segments = torch.zeros(sum(sizes), len(sizes), device=device)
        start = 0
        for i, size in enumerate(sizes):
            segments[start : start + size, i] = 1.0
            start += size
        weights = torch.ones(len(sizes), device=device)
        weights[0] = self.first_weight
        object.__setattr__(self, "_ref_mean", torch.cat([m.reshape(-1) for m in self.means]))
        object.__setattr__(self, "_ref_var", torch.cat([v.reshape(-1) for v in self.variances]))
        object.__setattr__(self, "_segments", segments)
        object.__setattr__(self, "_layer_weights", weights)

    def penalty(self, images: Tensor, stats: LayerStats) -> Tensor:
        """``(B,)``: per-image ``Σ_l w_l (‖μ − μ_bn‖₂ + ‖σ² − σ²_bn‖₂)``.

        A BatchNorm that the forward pass did not reach contributes nothing.
        """
        batch = images.shape[0]
        means: list[Tensor] = []
        variances: list[Tensor] = []
        for name, ref_m, ref_v in zip(self.layers, self.means, self.variances, strict=True):
            if name not in stats:
                # Equal to the reference: zero difference.
                means.append(ref_m.reshape(1, -1).to(images).expand(batch, -1))
                variances.append(ref_v.reshape(1, -1).to(images).expand(batch, -1))
                continue
            mean, var = stats[name]  # (B, C) each
            means.append(mean.float())
            variances.append(var.float())
        ref_mean = self._ref_mean.to(images.device)
        ref_var = self._ref_var.to(images.device)
        d_mean = (torch.cat(means, dim=1) - ref_mean).square()
        d_var = (torch.cat(variances, dim=1) - ref_var).square()
        segments = self._segments.to(images.device)
        # sqrt(s + ε): the norm with a finite gradient where a layer matches exactly.
        norms = (d_mean @ segments + 1e-12).sqrt() + (d_var @ segments + 1e-12).sqrt()
        return norms @ self._layer_weights.to(images.device)


class _SpatialStats(torch.autograd.Function):
    """``x → (x, mean, var)``: the input passed through, plus its per-image, per-channel mean
    and biased variance over ``H × W``.

    Written by hand because the prior runs on every BatchNorm input at every step, and on a
    CPU its cost would otherwise rival the network's own elementwise work:

    * forward: a mean and a vector norm (two vectorized reductions; ``torch.var_mean`` is a
      Welford loop, ~10x slower);
    * backward: the gradient of the statistics is ``a·x + c`` with per-(image, channel) ``a, c``,
      computed as an inference-mode batch norm over ``B·C`` channels (the fastest fused
      per-channel affine map), and the gradient arriving through the passed-through output is
      added to it in place, instead of autograd summing two fresh full-size tensors.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, c, h, w = x.shape
        flat = x.reshape(b * c, h * w)
        mean = flat.mean(dim=1)
        # Cancellation in E[x²] − mean² matters only when |mean| > ~300 std, far from what a
        # BatchNorm input looks like.
        square = torch.linalg.vector_norm(flat, dim=1).square() / (h * w)
        var = (square - mean * mean).clamp_min(0.0)
        mean = mean.reshape(b, c)
        ctx.save_for_backward(x, mean)
        ctx.set_materialize_grads(False)
        return x.view_as(x), mean, var.reshape(b, c)

    @staticmethod
    def backward(
        ctx: Any, grad_x: Tensor | None, grad_mean: Tensor | None, grad_var: Tensor | None
    ) -> Tensor | None:
        if grad_mean is None and grad_var is None:
            return grad_x
        x, mean = ctx.saved_tensors
        b, c, h, w = x.shape
        n = h * w
        # d mean/dx = 1/n; d var/dx = 2 (x - mean) / n.
        g_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        g_var = torch.zeros_like(mean) if grad_var is None else grad_var
        a = (2.0 / n) * g_var
        shift = g_mean / n - a * mean
        zeros = torch.zeros(b * c, device=x.device, dtype=x.dtype)
        ones = torch.ones(b * c, device=x.device, dtype=x.dtype)
        grad = nn.functional.batch_norm(
            x.reshape(1, b * c, h, w),
            zeros,
            ones,
            a.reshape(-1).to(x.dtype),
            shift.reshape(-1).to(x.dtype),
            False,
            0.0,
            0.0,
        ).reshape(b, c, h, w)
        if grad_x is not None:
            grad.add_(grad_x)  # ours, fresh: safe to accumulate in place
        return grad


def input_statistics(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x', mean, var)`` of a ``(B, C, H, W)`` activation: per-image, per-channel mean and
    biased variance over ``H × W`` (``(B, C)`` each), and ``x'``, ``x`` passed through.

    Feeding ``x'`` on instead of ``x`` lets the backward pass fold the statistics' gradient into
    the one that arrives through ``x'`` (one full-size tensor fewer per layer and step).
    """
    if x.dim() != 4:
        raise ValueError(f"input statistics need a (B, C, H, W) tensor, got {tuple(x.shape)}")
    out, mean, var = _SpatialStats.apply(x)
    return out, mean, var


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm2d modules of ``model`` that track running statistics."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        and module.running_mean is not None
        and module.running_var is not None
    ]


def batchnorm_prior(model: nn.Module, weight: float, first_weight: float = 10.0) -> BatchNormPrior:
    """The :class:`BatchNormPrior` of every BatchNorm2d layer of ``model``.

    Raises:
        ValueError: the model has no BatchNorm2d layer with running statistics.
    """
    names = batchnorm_layers(model)
    if not names:
        raise ValueError("the model has no BatchNorm2d layer with running statistics")
    modules = dict(model.named_modules())
    means: list[Tensor] = []
    variances: list[Tensor] = []
    for name in names:
        bn = modules[name]
        assert isinstance(bn.running_mean, Tensor) and isinstance(bn.running_var, Tensor)
        means.append(bn.running_mean.detach().float())
        variances.append(bn.running_var.detach().float())
    return BatchNormPrior(weight, tuple(names), tuple(means), tuple(variances), first_weight)
