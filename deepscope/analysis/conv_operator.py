"""A Conv2d layer as the linear map it is on one input size, with a chosen boundary.

The layer ``y = conv(pad(x))`` (no bias) maps ``C_in × H × W`` to ``C_out × H_out × W_out``,
``H_out = ⌊(H + 2p_h − d_h(k_h − 1) − 1) / s_h⌋ + 1`` (likewise W). Its boundary is how ``pad``
fills the border: ``zero`` (``padding_mode="zeros"``, nearly every CNN), ``circular``, ``reflect``
or ``replicate``. :class:`ConvOperator` applies that map and its adjoint to batches, matrix-free;
:func:`dense_operator_matrix` writes its ``(C_out·H_out·W_out) × (C_in·H·W)`` matrix for small
sizes. The circular boundary is special: the 2-D DFT block-diagonalizes it, which gives exact
singular values for any size (:func:`deepscope.analysis.signal_space.conv_operator_singular_values`)
and an exact inverse (:mod:`deepscope.analysis.precondition`).

The circular operator of the FFT route is ``C_out·(H/s_h)·(W/s_w) × C_in·H·W``: it is the layer's
map only when the layer pads circularly by a "same"-like amount, one for which the output is
``(H/s_h, W/s_w)`` for every divisible input (``d(k − 1) + 1 − s ≤ 2p ≤ d(k − 1)`` on each axis:
``k = 3, p = 1``; ``k = 7, s = 2, p = 3``; ``k = 1, p = 0``). :func:`layer_padding` says which
boundary a layer has and whether it is so shaped; :func:`resolve_operator_padding` refuses a
boundary that cannot describe the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor, nn
from torch.nn.grad import conv2d_input

from deepscope.analysis.layers import LayerKind, WeightLayer

__all__ = [
    "ConvOperator",
    "LayerPadding",
    "OperatorPadding",
    "as_operator_padding",
    "conv_output_hw",
    "dense_operator_matrix",
    "full_weight",
    "layer_padding",
    "operator_padding_note",
    "pad_index",
    "resolve_operator_padding",
]

_F64 = torch.float64


class OperatorPadding(StrEnum):
    """The boundary of the operator view: how the layer's padding is filled."""

    CIRCULAR = "circular"
    ZERO = "zero"
    REFLECT = "reflect"
    REPLICATE = "replicate"


#: nn.Conv2d's ``padding_mode`` for each boundary, and back.
_TORCH_MODE = {
    OperatorPadding.ZERO: "zeros",
    OperatorPadding.CIRCULAR: "circular",
    OperatorPadding.REFLECT: "reflect",
    OperatorPadding.REPLICATE: "replicate",
}
_FROM_TORCH = {mode: padding for padding, mode in _TORCH_MODE.items()}


def as_operator_padding(padding: OperatorPadding | str) -> OperatorPadding:
    """``padding`` as an :class:`OperatorPadding`; nn.Conv2d's ``"zeros"`` is accepted too."""
    if isinstance(padding, str) and padding in _FROM_TORCH:
        return _FROM_TORCH[padding]
    try:
        return OperatorPadding(padding)
    except ValueError:
        valid = ", ".join(p.value for p in OperatorPadding)
        raise ValueError(f"unknown padding {padding!r}; valid paddings are: {valid}") from None


@dataclass(frozen=True)
class LayerPadding:
    """A Conv2d layer's own boundary.

    Attributes:
        mode: the boundary as the operator view names it (zero, circular, reflect, replicate).
        padding_mode: nn.Conv2d's spelling (``"zeros"``, ``"circular"``, ...).
        amount: ``(p_h, p_w)`` pixels added on each side.
        circular_shaped: for every input whose H and W the stride divides, the output is
            ``(H/s_h, W/s_w)``: the circular operator has the layer's shape, so it is the layer's
            map (circular layers) or its circular counterpart (others). False for e.g. a 3×3
            conv with padding 0 ("valid") or 2.
    """

    mode: OperatorPadding
    padding_mode: str
    amount: tuple[int, int]
    circular_shaped: bool

    def describe(self) -> str:
        """Human-readable, e.g. ``"zero padding 1×1"``."""
        return f"{self.mode.value} padding {self.amount[0]}×{self.amount[1]}"


def _circular_shaped(size: int, dilation: int, stride: int, pad: int) -> bool:
    span = dilation * (size - 1)
    return span + 1 - stride <= 2 * pad <= span


def layer_padding(layer: WeightLayer) -> LayerPadding:
    """The boundary a Conv2d layer has: its padding mode, amount, and whether it is "same"-like.

    Raises:
        ValueError: not a Conv2d layer, or a padding mode deepscope does not model.
    """
    _require_conv(layer)
    if layer.padding_mode not in _FROM_TORCH:
        valid = ", ".join(_FROM_TORCH)
        raise ValueError(
            f"layer {layer.name!r} has padding mode {layer.padding_mode!r}; "
            f"valid modes are: {valid}"
        )
    shaped = all(
        _circular_shaped(k, d, s, p)
        for k, d, s, p in zip(
            layer.kernel_size, layer.dilation, layer.stride, layer.padding, strict=True
        )
    )
    return LayerPadding(_FROM_TORCH[layer.padding_mode], layer.padding_mode, layer.padding, shaped)


def _require_conv(layer: WeightLayer) -> None:
    if layer.kind is not LayerKind.CONV2D:
        raise ValueError(f"layer {layer.name!r} is {layer.kind.value}, not a conv2d layer")


def conv_output_hw(layer: WeightLayer, input_hw: tuple[int, int]) -> tuple[int, int]:
    """``(H_out, W_out)`` of the layer on a ``(H, W)`` input (the same for every padding mode).

    Raises:
        ValueError: not a Conv2d layer, sizes not two positive ints, or an empty output.
    """
    _require_conv(layer)
    if len(input_hw) != 2 or any(int(v) != v or v < 1 for v in input_hw):
        raise ValueError(
            f"layer {layer.name!r}: input_hw must be two positive ints, got {input_hw}"
        )
    out = []
    for n, k, d, s, p in zip(
        input_hw, layer.kernel_size, layer.dilation, layer.stride, layer.padding, strict=True
    ):
        out.append((int(n) + 2 * p - d * (k - 1) - 1) // s + 1)
    if min(out) < 1:
        raise ValueError(
            f"layer {layer.name!r}: a {input_hw[0]}×{input_hw[1]} input is smaller than its "
            f"{layer.kernel_size[0]}×{layer.kernel_size[1]} kernel (dilation {layer.dilation}, "
            f"padding {layer.padding}): the output would be empty"
        )
    return out[0], out[1]


def resolve_operator_padding(
    layer: WeightLayer, padding: OperatorPadding | str | None, input_hw: tuple[int, int]
) -> OperatorPadding:
    """The boundary to use for ``layer`` on ``input_hw``: ``padding``, or the layer's own if None.

    ``circular`` needs a circular-shaped layer (see :class:`LayerPadding`) and H, W divisible by
    the stride: otherwise the ``C_out·(H/s)·(W/s) × C_in·H·W`` circular operator is not the
    layer's map nor a counterpart of it (a "valid" 3×3 conv outputs ``(H − 2)×(W − 2)``).
    ``reflect`` needs padding smaller than the input, as nn.functional.pad does.

    Raises:
        ValueError: an unknown padding, or one the layer cannot have, saying why.
    """
    own = layer_padding(layer)
    chosen = own.mode if padding is None else as_operator_padding(padding)
    h, w = conv_output_hw(layer, input_hw)
    if chosen is OperatorPadding.CIRCULAR:
        (s_h, s_w), (in_h, in_w) = layer.stride, input_hw
        if not own.circular_shaped:
            raise ValueError(
                f"layer {layer.name!r} ({own.describe()}, kernel "
                f"{layer.kernel_size[0]}×{layer.kernel_size[1]}, stride {s_h}×{s_w}, dilation "
                f"{layer.dilation[0]}×{layer.dilation[1]}) maps a {in_h}×{in_w} input to "
                f"{h}×{w}, not to the stride-reduced size the circular operator has: the "
                "circular operator is not this layer's map; use padding='zero' (its own "
                f"boundary, {own.mode.value}) instead"
            )
        if in_h % s_h or in_w % s_w:
            raise ValueError(
                f"layer {layer.name!r}: input {in_h}×{in_w} is not divisible by the stride "
                f"{s_h}×{s_w}; the circular strided operator is defined for divisible sizes only"
            )
    if chosen is OperatorPadding.REFLECT and (
        layer.padding[0] >= input_hw[0] or layer.padding[1] >= input_hw[1]
    ):
        raise ValueError(
            f"layer {layer.name!r}: reflect padding {layer.padding} needs an input larger than "
            f"the padding, got {input_hw[0]}×{input_hw[1]}"
        )
    return chosen


def operator_padding_note(layer: WeightLayer, padding: OperatorPadding | str) -> str | None:
    """A warning when ``padding`` is not the layer's own boundary (None when it is).

    Shown with a spectrum, it tells the reader that the values describe a counterpart of the
    layer, e.g. the circular operator of a zero-padded conv (its σ differ by up to ~40% of
    σ_max on small inputs).
    """
    own = layer_padding(layer)
    chosen = as_operator_padding(padding)
    if chosen is own.mode:
        return None
    return (
        f"layer {layer.name!r} has {own.describe()}; these are the singular values of its "
        f"{chosen.value}-padded counterpart, which differ from the layer's own map near the border"
    )


def pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """Which input position each of the ``before + n + after`` padded positions copies.

    As ``nn.functional.pad`` fills them for ``circular`` (any amount: it wraps repeatedly),
    ``reflect`` (amount < n) and ``replicate``; -1 marks a zero (``zeros``).
    """
    k = torch.arange(-before, n + after, device=device)
    if mode == "circular":
        return k.remainder(n)
    if mode == "reflect":
        return torch.where(k < 0, -k, torch.where(k >= n, 2 * (n - 1) - k, k))
    if mode == "replicate":
        return k.clamp(0, n - 1)
    return torch.where((k >= 0) & (k < n), k, -1)


def full_weight(layer: WeightLayer, dtype: torch.dtype = _F64) -> Tensor:
    """``(C_out, C_in, k_h, k_w)``: the grouped weight as one dense, block-diagonal weight."""
    weight = layer.weight.detach().to(dtype)
    g = layer.groups
    if g == 1:
        return weight
    c_out, c_in_g = weight.shape[:2]
    out_g = c_out // g
    full = weight.new_zeros((c_out, c_in_g * g, *weight.shape[2:]))
    for i in range(g):
        full[i * out_g : (i + 1) * out_g, i * c_in_g : (i + 1) * c_in_g] = weight[
            i * out_g : (i + 1) * out_g
        ]
    return full


class ConvOperator:
    """The layer's linear part ``A`` (no bias) on ``C_in × H × W`` inputs, and ``Aᵀ``.

    Both act on batches, in the dtype of their argument (weights are cast once per dtype and
    device and cached), so a solver can run its bulk in float32 and its checks in float64.

    Attributes:
        layer: the layer.
        padding: the boundary used (the layer's own unless another was asked for).
        in_shape: ``(C_in, H, W)``; out_shape: ``(C_out, H_out, W_out)``.
        m, n: ``prod(out_shape)`` and ``prod(in_shape)``: the matrix is ``m × n``.
    """

    def __init__(
        self,
        layer: WeightLayer,
        input_hw: tuple[int, int],
        *,
        padding: OperatorPadding | str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        _require_conv(layer)
        self.layer = layer
        h, w = int(input_hw[0]), int(input_hw[1])
        self.padding = (
            layer_padding(layer).mode if padding is None else as_operator_padding(padding)
        )
        if self.padding is OperatorPadding.REFLECT and (
            layer.padding[0] >= h or layer.padding[1] >= w
        ):
            raise ValueError(
                f"layer {layer.name!r}: reflect padding {layer.padding} needs an input larger "
                f"than the padding, got {h}×{w}"
            )
        self.device = torch.device(device) if device is not None else layer.weight.device
        out_h, out_w = conv_output_hw(layer, (h, w))
        self.in_shape = (layer.in_channels, h, w)
        self.out_shape = (layer.out_channels, out_h, out_w)
        self.m = math.prod(self.out_shape)
        self.n = math.prod(self.in_shape)
        self._weights: dict[torch.dtype, Tensor] = {}
        mode = _TORCH_MODE[self.padding]
        self._pad: tuple[Tensor, Tensor] | None = None
        if mode != "zeros":
            # A = conv(no padding) ∘ pad, and these pads copy input pixels, so padᵀ adds each
            # padded pixel back onto the pixel it copies.
            (p_h, p_w) = layer.padding
            self._pad = (
                pad_index(h, p_h, p_h, mode, self.device),
                pad_index(w, p_w, p_w, mode, self.device),
            )

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The weight in ``dtype`` on the operator's device (cached)."""
        cached = self._weights.get(dtype)
        if cached is None:
            cached = self.layer.weight.detach().to(device=self.device, dtype=dtype)
            self._weights[dtype] = cached
        return cached

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` → ``(B, C_out, H_out, W_out)``."""
        return self._forward(x, self.weight(x.dtype))

    def adjoint(self, y: Tensor) -> Tensor:
        """``(B, C_out, H_out, W_out)`` → ``(B, C_in, H, W)``."""
        return self._adjoint(y, self.weight(y.dtype))

    def _forward(self, x: Tensor, weight: Tensor) -> Tensor:
        layer = self.layer
        if self._pad is None:
            return nn.functional.conv2d(
                x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups
            )
        idx_h, idx_w = self._pad
        padded = x.index_select(2, idx_h).index_select(3, idx_w)
        return nn.functional.conv2d(
            padded, weight, None, layer.stride, 0, layer.dilation, layer.groups
        )

    def _adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        layer = self.layer
        c, h, w = self.in_shape
        b = y.shape[0]
        if self._pad is None:
            size = torch.Size((b, c, h, w))
            padding = layer.padding
        else:
            size = torch.Size((b, c, h + 2 * layer.padding[0], w + 2 * layer.padding[1]))
            padding = (0, 0)
        g: Tensor = conv2d_input(  # type: ignore[no-untyped-call]
            size,
            weight,
            y,
            stride=layer.stride,
            padding=padding,
            dilation=layer.dilation,
            groups=layer.groups,
        )
        if self._pad is None:
            return g
        idx_h, idx_w = self._pad
        g = g.new_zeros((b, c, g.shape[2], w)).index_add_(3, idx_w, g)
        return g.new_zeros((b, c, h, w)).index_add_(2, idx_h, g)

    def gram_input(self, x: Tensor) -> Tensor:
        """``AᵀA x`` for ``(B, C_in, H, W)``."""
        return self.adjoint(self.forward(x))

    def gram_output(self, y: Tensor) -> Tensor:
        """``AAᵀ y`` for ``(B, C_out, H_out, W_out)``."""
        return self.forward(self.adjoint(y))

    def _abs_sums(self) -> tuple[Tensor, Tensor]:
        """Row and column sums of ``|A|``: ``(C_out, H_out, W_out)`` and ``(C_in, H, W)``.

        The conv with ``|w|`` applied to all-ones: each tap reads one input pixel per output
        pixel, and padding that copies pixels (reflect, replicate, circular) and reads one pixel
        through several taps is added up by the padding's own adjoint.
        """
        magnitude = self.weight(_F64).abs()
        rows = self._forward(
            torch.ones((1, *self.in_shape), dtype=_F64, device=self.device), magnitude
        )
        cols = self._adjoint(
            torch.ones((1, *self.out_shape), dtype=_F64, device=self.device), magnitude
        )
        return rows[0], cols[0]

    def structural_zeros(self) -> tuple[Tensor, Tensor]:
        """``(zero_rows, zero_columns)``: bool ``out_shape`` and ``in_shape``.

        A zero column is an input entry no output reads (pixels a stride skips, channels whose
        weights are all 0): it lies in the null space whatever the other weights are. A zero row
        is an output that reads nothing (a zero filter, or only padding).
        """
        rows, cols = self._abs_sums()
        return rows == 0, cols == 0

    def norm_upper_bound(self) -> float:
        """``sqrt(‖A‖₁ ‖A‖_∞) ≥ σ_max(A)``: from the largest column and row abs sums."""
        rows, cols = self._abs_sums()
        return math.sqrt(float(rows.max()) * float(cols.max()))


def dense_operator_matrix(
    layer: WeightLayer,
    input_hw: tuple[int, int],
    padding: OperatorPadding | str | None = None,
    *,
    device: torch.device | str | None = None,
    max_entries: int = 1 << 26,
) -> Tensor:
    """The operator's dense ``(C_out·H_out·W_out) × (C_in·H·W)`` float64 matrix.

    Written straight from the weights (no convolution is run): row ``(o, i, j)`` (output channel,
    row, column, in ``reshape`` order) holds ``w[o, c, a, b]`` at the column of the input pixel
    that tap ``(a, b)`` reads through the boundary, summed where several taps read the same pixel
    (reflect, replicate, or a circular kernel larger than the input).

    Raises:
        ValueError: not a Conv2d layer, bad sizes or padding, or more than ``max_entries``
            entries (8 bytes each).
    """
    op = ConvOperator(layer, input_hw, padding=padding, device=device)
    if op.m * op.n > max_entries:
        raise ValueError(
            f"layer {layer.name!r}: the dense operator on {input_hw[0]}×{input_hw[1]} would be "
            f"{op.m}×{op.n} ({op.m * op.n * 8 / 2**30:.1f} GiB in float64), over the limit of "
            f"{max_entries} entries"
        )
    c_out, out_h, out_w = op.out_shape
    c_in, h, w = op.in_shape
    (k_h, k_w), (d_h, d_w), (s_h, s_w) = layer.kernel_size, layer.dilation, layer.stride
    p_h, p_w = layer.padding
    mode = _TORCH_MODE[op.padding]
    dev = op.device
    # Padded position s·i + d·a is at most H + 2p − 1 for every output row i and tap a.
    src_h = pad_index(h, p_h, p_h, mode, dev)
    src_w = pad_index(w, p_w, p_w, mode, dev)
    weight = full_weight(layer).to(dev)
    # (H_out, W_out, H, W, C_out, C_in): each tap scatters a (C_out, C_in) block per output pixel.
    blocks = torch.zeros((out_h, out_w, h, w, c_out, c_in), dtype=_F64, device=dev)
    rows_h = torch.arange(out_h, device=dev)
    rows_w = torch.arange(out_w, device=dev)
    for a in range(k_h):
        read_h = src_h[rows_h * s_h + a * d_h]
        ok_h = read_h >= 0
        for b in range(k_w):
            read_w = src_w[rows_w * s_w + b * d_w]
            ok_w = read_w >= 0
            ih, iw = torch.meshgrid(rows_h[ok_h], rows_w[ok_w], indexing="ij")
            jh, jw = torch.meshgrid(read_h[ok_h], read_w[ok_w], indexing="ij")
            if ih.numel() == 0:
                continue
            values = weight[:, :, a, b].expand(ih.numel(), c_out, c_in)
            blocks.index_put_(
                (ih.reshape(-1), iw.reshape(-1), jh.reshape(-1), jw.reshape(-1)),
                values,
                accumulate=True,
            )
    return blocks.permute(4, 0, 1, 5, 2, 3).reshape(op.m, op.n)
