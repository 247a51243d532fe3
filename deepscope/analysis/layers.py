"""The weight layers that the vector-space analyses read: Linear and Conv2d.

A :class:`WeightLayer` is a plain description (name, weight, convolution geometry) so that the
analyses work the same on an eager module, an unflattened ``torch.export`` program or a
TorchScript module: the loaders in :mod:`deepscope.models.loading` build these for every format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor, nn

__all__ = [
    "LayerKind",
    "WeightLayer",
    "finite_or_raise",
    "layer_from_module",
    "select_layers",
    "weight_layers",
]


class LayerKind(StrEnum):
    """The layer types whose weights are a linear map."""

    LINEAR = "linear"
    CONV2D = "conv2d"


@dataclass(frozen=True)
class WeightLayer:
    """One Linear or Conv2d layer, format-independent.

    Attributes:
        name: the module's qualified name (``layer1.0.conv1``), the same for every file format.
        kind: linear or conv2d.
        weight: Linear ``(out, in)``; Conv2d ``(C_out, C_in // groups, k_h, k_w)``.
        bias: ``(out,)`` / ``(C_out,)`` or None.
        stride, padding, dilation, groups, padding_mode: Conv2d geometry (defaults for Linear).
    """

    name: str
    kind: LayerKind
    weight: Tensor
    bias: Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def in_channels(self) -> int:
        """Input features (Linear) or input channels (Conv2d)."""
        if self.kind is LayerKind.LINEAR:
            return int(self.weight.shape[1])
        return int(self.weight.shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        """Output features (Linear) or output channels (Conv2d)."""
        return int(self.weight.shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """``(k_h, k_w)``; ``(1, 1)`` for Linear."""
        if self.kind is LayerKind.LINEAR:
            return (1, 1)
        return (int(self.weight.shape[2]), int(self.weight.shape[3]))

    def apply(self, x: Tensor) -> Tensor:
        """The layer's linear part (no bias) on ``x``: ``(B, in)`` or ``(B, C_in, H, W)``."""
        if self.kind is LayerKind.LINEAR:
            return x @ self.weight.to(x.dtype).T
        if self.padding_mode != "zeros":
            # Non-zero padding modes pad explicitly, as nn.Conv2d does.
            p_h, p_w = self.padding
            x = nn.functional.pad(x, (p_w, p_w, p_h, p_h), mode=self.padding_mode)
            padding: tuple[int, int] = (0, 0)
        else:
            padding = self.padding
        return nn.functional.conv2d(
            x, self.weight.to(x.dtype), None, self.stride, padding, self.dilation, self.groups
        )


def _pair(
    value: int | str | Sequence[int], kernel: tuple[int, int], dilation: Sequence[int]
) -> tuple[int, int]:
    if isinstance(value, str):
        if value == "valid":
            return (0, 0)
        # "same" (stride 1 only in PyTorch): total padding d*(k-1) on each axis. An odd total is
        # split unevenly by PyTorch, which a (pad_h, pad_w) pair cannot describe: say so.
        totals = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
        if totals[0] % 2 or totals[1] % 2:
            raise ValueError(
                f"padding='same' with kernel {kernel} and dilation {tuple(dilation)} pads "
                "asymmetrically, which deepscope does not model; use explicit padding"
            )
        return (totals[0] // 2, totals[1] // 2)
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def layer_from_module(name: str, module: nn.Module) -> WeightLayer | None:
    """A :class:`WeightLayer` for an eager ``nn.Linear`` / ``nn.Conv2d``; None for other modules.

    Raises:
        ValueError: the layer has no materialized weight (a lazy module never run).
    """
    if isinstance(module, nn.Linear | nn.Conv2d):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or isinstance(
            weight, nn.parameter.UninitializedParameter
        ):
            raise ValueError(f"layer {name!r} ({type(module).__name__}) has no weights")
    if isinstance(module, nn.Linear):
        return WeightLayer(name, LayerKind.LINEAR, module.weight.detach(), _bias(module))
    if isinstance(module, nn.Conv2d):
        kernel = (int(module.kernel_size[0]), int(module.kernel_size[1]))
        dilation = (int(module.dilation[0]), int(module.dilation[1]))
        return WeightLayer(
            name,
            LayerKind.CONV2D,
            module.weight.detach(),
            _bias(module),
            stride=(int(module.stride[0]), int(module.stride[1])),
            padding=_pair(module.padding, kernel, dilation),
            dilation=dilation,
            groups=int(module.groups),
            padding_mode=str(module.padding_mode),
        )
    return None


def _bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, Tensor) else None


def weight_layers(model: nn.Module) -> list[WeightLayer]:
    """Every Linear and Conv2d layer of an eager ``model``, in ``named_modules`` order.

    Raises:
        ValueError: the model has no Linear or Conv2d layer, or one of them has no weights.
    """
    layers = [
        layer
        for name, module in model.named_modules()
        if (layer := layer_from_module(name, module)) is not None
    ]
    if not layers:
        raise ValueError("the model has no Linear or Conv2d layers to analyze")
    return layers


def select_layers(layers: Sequence[WeightLayer], names: Sequence[str] | None) -> list[WeightLayer]:
    """The layers named in ``names`` (all when None), in model order.

    Raises:
        ValueError: a name is not a weight layer; the message lists the valid names.
    """
    if names is None:
        return list(layers)
    by_name = {layer.name: layer for layer in layers}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        valid = ", ".join(by_name)
        raise ValueError(
            f"unknown layer(s) {', '.join(map(repr, unknown))}; weight layers are: {valid}"
        )
    wanted = set(names)
    return [layer for layer in layers if layer.name in wanted]


def finite_or_raise(layers: Sequence[WeightLayer]) -> None:
    """Raise ValueError naming the first layer whose weight or bias holds NaN or Inf."""
    for layer in layers:
        for label, tensor in (("weight", layer.weight), ("bias", layer.bias)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"layer {layer.name!r} has non-finite values (NaN or Inf) in its {label}"
                )
