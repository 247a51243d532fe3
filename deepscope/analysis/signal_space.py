"""Signal spaces of Linear and Conv2d layers: SVD, rank, condition number, stable rank.

A layer is a linear map between signal spaces (Pattichis & Pattichis 2024): the SVD of its
matrix gives the row space (what the layer sees), the rank and the condition number. A Linear
layer's matrix is its weight ``W`` (out × in). A Conv2d layer has three views
(:class:`ConvView`):

* ``kernels`` (the paper's): each 2-D kernel is one row, ``(C_out·C_in/groups) × (k_h·k_w)``;
* ``filters``: each output channel's 3-D filter is one row, ``C_out × (C_in/groups·k_h·k_w)``;
* ``operator``: the convolution itself as a map on a ``C_in × H × W`` input, with a boundary
  (:class:`~deepscope.analysis.conv_operator.OperatorPadding`). ``circular``:
  :func:`conv_operator_singular_values` gives its exact singular values for any size through
  the 2-D FFT (Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers", ICLR 2019);
  it is the layer's map only for circular padding, and the circular counterpart of a
  zero-padded layer has singular values that differ by up to ~40% of σ_max on small inputs.
  ``zero`` (and ``reflect``/``replicate``): the layer's real map, exactly ``F.conv2d`` with its
  stride, padding, dilation and groups; every value from the dense matrix when
  ``min(m, n) ≤ max_dense``, else only the ``k`` largest and ``k`` smallest, matrix-free by
  block Lanczos with the conv and its adjoint
  (:func:`deepscope.analysis.operator_spectrum.conv_operator_spectrum`): such a
  :class:`LayerSpectrum` is *partial* (``stats`` None, ``extremes`` set), and what needs every
  value (rank, quantiles) is not reported for it.
  :func:`deepscope.analysis.conv_operator.layer_padding` tells which boundary a layer has.

Every SVD runs in float64 so that condition numbers are exact; the rank tolerance comes from
the weights' own dtype (numpy's ``matrix_rank`` rule ``σ_max · max(m, n) · eps``), because
singular values below it are rounding noise of the stored weights (for the operator view,
``max(m, n)`` of its per-frequency blocks: see :func:`signal_space`).

Speed: the floor is ``torch.linalg.svdvals`` on each matrix. Each matrix is decomposed in its
tall orientation (σ(A) = σ(Aᵀ); MKL's wide path is several times slower), converted to float64
straight into the column-major layout LAPACK reads, in one reused buffer; on a GPU the
singular values of all layers come back in one transfer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from deepscope.analysis.conv_operator import (
    OperatorPadding,
    conv_output_hw,
    dense_operator_matrix,
    operator_padding_note,
    resolve_operator_padding,
)
from deepscope.analysis.hooks import eval_mode
from deepscope.analysis.layers import LayerKind, WeightLayer
from deepscope.analysis.operator_spectrum import (
    DEFAULT_LANCZOS_ENTRIES,
    OperatorSpectrum,
    SpectrumMethod,
    conv_operator_spectrum,
)
from deepscope.analysis.operator_spectrum import (
    DEFAULT_MAX_DENSE as _INVERSE_MAX_DENSE,
)

__all__ = [
    "DEFAULT_EXTREMES",
    "DEFAULT_MAX_DENSE",
    "ConvView",
    "LayerSpectrum",
    "SpectrumStats",
    "conv_input_hw",
    "conv_operator_singular_values",
    "layer_matrix",
    "layer_spectrum_metrics",
    "signal_space",
    "spectrum_stats",
    "top_singular_directions",
]


#: The operator view's largest ``min(m, n)`` decomposed densely (every singular value): a
#: 4096×4096 float64 SVD takes seconds; beyond it only the extremes are computed.
DEFAULT_MAX_DENSE = 4096
#: How many of the largest and of the smallest singular values a partial spectrum reports.
DEFAULT_EXTREMES = 16


class ConvView(StrEnum):
    """How a Conv2d weight is read as a linear map (Linear layers ignore the view)."""

    KERNELS = "kernels"
    FILTERS = "filters"
    OPERATOR = "operator"


def _as_view(view: ConvView | str) -> ConvView:
    try:
        return ConvView(view)
    except ValueError:
        valid = ", ".join(v.value for v in ConvView)
        raise ValueError(f"unknown view {view!r}; valid views are: {valid}") from None


def _eps(dtype: torch.dtype) -> float:
    # Integer or quantized weights have no finfo; float64's eps is then the SVD's own precision.
    return (
        float(torch.finfo(dtype).eps)
        if dtype.is_floating_point
        else float(torch.finfo(torch.float64).eps)
    )


def _to_float64(matrix: Tensor, workspace: Tensor | None = None) -> Tensor:
    """``matrix`` ``(m, n)`` as float64, with its tall orientation laid out column-major.

    LAPACK reads column-major; :func:`_svdvals` decomposes ``matrix`` when ``m ≥ n`` and
    ``matrix.mT`` otherwise, so that one is made column-major during the dtype conversion
    (one copy at most) instead of by a second, transposing copy inside the SVD. With
    ``workspace`` (1-D float64 on the same device, at least ``m·n`` long) the result is a view
    of it: reusing one buffer for every layer avoids faulting in fresh pages for each one.
    """
    rows, cols = matrix.shape
    tall = rows >= cols
    if matrix.dtype == torch.float64 and (matrix.mT if tall else matrix).is_contiguous():
        return matrix
    if workspace is None:
        workspace = torch.empty(rows * cols, dtype=torch.float64, device=matrix.device)
    if tall:
        out = workspace[: rows * cols].view(cols, rows).mT
    else:
        out = workspace[: rows * cols].view(rows, cols)
    return out.copy_(matrix)


def _svdvals(matrix: Tensor) -> Tensor:
    """Singular values (descending) of ``(..., m, n)``, decomposing the tall orientation.

    σ(A) = σ(Aᵀ), and LAPACK's tall path (QR, then the SVD of the small R) is several times
    faster than its wide path (LQ) in MKL: on resnet50's filter matrices 512×4608 the wide call
    takes ~5× longer than the same values from the 4608×512 transpose.
    """
    if matrix.shape[-2] < matrix.shape[-1]:
        matrix = matrix.mT
    if matrix.shape[-1] == 1:
        # A single column's one singular value is its norm (1×1 convs in the kernels view);
        # LAPACK's QR would only cost more.
        norm: Tensor = torch.linalg.vector_norm(matrix, dim=(-2, -1))
        return norm.unsqueeze(-1)
    values: Tensor = torch.linalg.svdvals(matrix)
    return values


def _weight_matrix(layer: WeightLayer, view: ConvView) -> Tensor:
    """The view's matrix of the weight in its own dtype: a reshape, no copy when contiguous."""
    weight = layer.weight
    if layer.kind is LayerKind.LINEAR:
        return weight
    if view is ConvView.KERNELS:
        return weight.reshape(-1, weight.shape[2] * weight.shape[3])
    if view is ConvView.FILTERS:
        return weight.reshape(weight.shape[0], -1)
    raise ValueError(
        f"layer {layer.name!r}: the operator view of a convolution has no small matrix; "
        "use conv_operator_singular_values(layer, input_hw)"
    )


def layer_matrix(layer: WeightLayer, view: ConvView = ConvView.KERNELS) -> Tensor:
    """The layer's weight as a 2-D float64 matrix (a copy, on the weight's device).

    Linear: ``W`` ``(out, in)`` whatever the view. Conv2d (weight ``(C_out, C_in/g, k_h, k_w)``):
    ``kernels`` → ``(C_out·C_in/g, k_h·k_w)``, row ``o·(C_in/g) + c`` is kernel ``[o, c]``
    flattened; ``filters`` → ``(C_out, C_in/g·k_h·k_w)``, row ``o`` is filter ``o`` flattened.

    Raises:
        ValueError: ``view`` is ``operator`` for a Conv2d layer (use
            :func:`conv_operator_singular_values`), or an unknown view.
    """
    return _to_float64(_weight_matrix(layer, _as_view(view)))


def _used_phases(size: int, dilation: int, stride: int) -> list[int]:
    """Polyphase components (tap offset mod stride) that hold at least one kernel tap."""
    return sorted({(a * dilation) % stride for a in range(size)})


def _dense_polyphase_kernel(layer: WeightLayer, grid_hw: tuple[int, int]) -> Tensor:
    """The stride-1 circular kernel on the polyphase grid, wrapped to it.

    Only the polyphase components that some tap reaches are kept (a 1×1 stride-2 conv reads
    one of the four): the others are zero columns of every frequency block, which add only
    zero singular values, and dropping them makes each block up to s² times smaller.

    Returns ``(C_out, C_in/g · P, G_h, G_w)`` float64, ``grid_hw = (G_h, G_w)``, ``P`` the
    number of used components (at most ``s_h·s_w``).
    """
    weight = layer.weight.to(torch.float64)
    c_out, c_in_g, k_h, k_w = weight.shape
    (d_h, d_w), (s_h, s_w) = layer.dilation, layer.stride
    # Dilation: the dense kernel with zeros between the taps.
    dense_h, dense_w = d_h * (k_h - 1) + 1, d_w * (k_w - 1) + 1
    # Polyphase: tap row A = s·q + r feeds phase r at offset q, so pad to whole periods.
    q_h, q_w = -(-dense_h // s_h), -(-dense_w // s_w)
    dense = weight.new_zeros((c_out, c_in_g, q_h * s_h, q_w * s_w))
    dense[:, :, :dense_h:d_h, :dense_w:d_w] = weight
    phases = dense.reshape(c_out, c_in_g, q_h, s_h, q_w, s_w).permute(0, 1, 3, 5, 2, 4)
    rows, cols = _used_phases(k_h, d_h, s_h), _used_phases(k_w, d_w, s_w)
    if len(rows) < s_h:
        phases = phases[:, :, rows]
    if len(cols) < s_w:
        phases = phases[:, :, :, cols]
    phases = phases.reshape(c_out, c_in_g * len(rows) * len(cols), q_h, q_w)
    g_h, g_w = grid_hw
    if q_h > g_h or q_w > g_w:
        # A kernel larger than the (circular) input wraps around it: taps that land on the same
        # pixel modulo (G_h, G_w) add up. rfft2's s= would truncate instead.
        n_h, n_w = -(-q_h // g_h), -(-q_w // g_w)
        phases = nn.functional.pad(phases, (0, n_w * g_w - q_w, 0, n_h * g_h - q_h))
        phases = phases.reshape(c_out, -1, n_h, g_h, n_w, g_w).sum(dim=(2, 4))
    return phases


def _check_hw(layer: WeightLayer, input_hw: tuple[int, int]) -> tuple[int, int]:
    if layer.kind is not LayerKind.CONV2D:
        raise ValueError(f"layer {layer.name!r} is {layer.kind.value}, not a conv2d layer")
    if len(input_hw) != 2 or any(int(v) != v or v < 1 for v in input_hw):
        raise ValueError(
            f"layer {layer.name!r}: input_hw must be two positive ints, got {input_hw}"
        )
    h, w = int(input_hw[0]), int(input_hw[1])
    s_h, s_w = layer.stride
    if h % s_h or w % s_w:
        raise ValueError(
            f"layer {layer.name!r}: input {h}×{w} is not divisible by the stride {s_h}×{s_w}; "
            "the circular strided operator is defined for divisible sizes only"
        )
    return h, w


def conv_operator_singular_values(layer: WeightLayer, input_hw: tuple[int, int]) -> Tensor:
    """Exact singular values of a Conv2d layer's kernel as a CIRCULAR map on ``C_in × H × W``.

    The boundary is CIRCULAR whatever the layer's own (Sedghi et al. 2019): the 2-D DFT
    block-diagonalizes the convolution, so its singular values are those of the
    ``C_out × C_in`` matrices ``K̂[:, :, u, v]`` (FFT of the kernel zero-padded to H×W) over the
    H·W frequencies, all decomposed in one batched call. The layer's padding amount is not
    checked here (see :func:`signal_space` and
    :func:`~deepscope.analysis.conv_operator.resolve_operator_padding`, which refuse layers the
    circular operator does not describe). A zero-padded layer (``padding_mode="zeros"``) is a
    different, Toeplitz operator: its values differ from these through the pixels near the
    border (resnet18's ``layer3.0.conv1`` on 2×2: σ_max 1.83 circular, 1.13 zero-padded);
    :func:`~deepscope.analysis.operator_spectrum.conv_operator_spectrum` computes those.

    * stride s > 1: exact through the polyphase decomposition. The strided circular conv is a
      stride-1 circular conv on the ``(H/s) × (W/s)`` polyphase components of the input, with
      ``C_in·s²`` channels and kernel size ``ceil(k/s)``; splitting the input into components
      is a permutation, so it keeps singular values. H and W must be divisible by s.
    * the padding offset is a circular shift of the input, an orthogonal map: it does not change
      singular values.
    * dilation: the dense dilated kernel. groups: the union of the groups' values.
    * a kernel larger than the input wraps (folds) around it modulo H, W.

    Only half the spectrum is decomposed: for a real kernel ``K̂(−f) = conj(K̂(f))``, whose
    singular values coincide.

    Args:
        layer: a Conv2d layer.
        input_hw: ``(H, W)`` of the layer's input.

    Returns:
        ``(H_out·W_out·min(C_out, C_in·s_h·s_w),)`` float64 on the weight's device, descending,
        where ``H_out = H / s_h``, ``W_out = W / s_w``: every singular value of the
        ``(C_out·H_out·W_out) × (C_in·H·W)`` operator.

    Raises:
        ValueError: not a Conv2d layer, non-positive sizes, or H, W not divisible by the stride.
    """
    h, w = _check_hw(layer, input_hw)
    s_h, s_w = layer.stride
    g_h, g_w = h // s_h, w // s_w
    kernel = _dense_polyphase_kernel(layer, (g_h, g_w))
    c_out, c_in_phases = kernel.shape[:2]
    groups = layer.groups
    spectrum = torch.fft.rfft2(kernel, s=(g_h, g_w))  # (C_out, C_in', G_h, G_w//2+1) complex
    blocks = spectrum.reshape(groups, c_out // groups, c_in_phases, g_h, -1).permute(0, 3, 4, 1, 2)
    values = _svdvals(blocks)  # (groups, G_h, G_w//2+1, min(block))
    # rfft2 keeps columns 0..G_w//2; columns 1..(G_w-1)//2 stand for their conjugate partner
    # G_w - v as well, so they count twice.
    paired = values[:, :, 1 : (g_w - 1) // 2 + 1]
    # Dropped polyphase components (zero columns) leave these zero values per block.
    block_rows, block_cols = c_out // groups, layer.in_channels // groups * s_h * s_w
    zeros = groups * g_h * g_w * (min(block_rows, block_cols) - values.shape[-1])
    everything = torch.cat((values.reshape(-1), paired.reshape(-1), values.new_zeros(zeros)))
    return everything.sort(descending=True).values


def _operator_shape(layer: WeightLayer, input_hw: tuple[int, int]) -> tuple[int, int]:
    out_h, out_w = conv_output_hw(layer, input_hw)
    h, w = input_hw
    return (layer.out_channels * out_h * out_w, layer.in_channels * h * w)


def _operator_block_dim(layer: WeightLayer) -> int:
    s_h, s_w = layer.stride
    g = layer.groups
    return max(layer.out_channels // g, layer.in_channels * s_h * s_w // g)


@dataclass(frozen=True)
class SpectrumStats:
    """Summary of a spectrum.

    Attributes:
        singular_values: ``(min(m, n),)`` float64, descending.
        rank: values above the tolerance ``σ_max · max(m, n) · eps``.
        condition_number: ``σ_max / σ_min`` over the ``min(m, n)`` values; ``math.inf`` when
            ``σ_min`` is zero at the weights' precision (below the tolerance, so rank-deficient).
        stable_rank: ``‖W‖_F² / ‖W‖_2² = Σσ² / σ_1²`` (0 for the zero matrix).
        spectral_norm: ``σ_1``.
    """

    singular_values: Tensor
    rank: int
    condition_number: float
    stable_rank: float
    spectral_norm: float


def spectrum_stats(
    singular_values: Tensor,
    matrix_shape: tuple[int, int],
    eps: float,
    *,
    tolerance_dim: int | None = None,
) -> SpectrumStats:
    """Rank, condition number, stable rank and spectral norm from all singular values.

    Args:
        singular_values: ``(min(m, n),)`` descending, every singular value of the matrix.
        matrix_shape: ``(m, n)``.
        eps: machine epsilon of the weights' dtype (``torch.finfo(weight.dtype).eps``).
        tolerance_dim: the dimension in the rank tolerance ``σ_max · dim · eps``; ``max(m, n)``
            by default. The operator view passes its per-frequency block size, the matrices
            actually decomposed (see :func:`signal_space`).

    Raises:
        ValueError: ``singular_values`` is not 1-D of length ``min(m, n)``, or it is empty.
    """
    m, n = matrix_shape
    count = min(m, n)
    if singular_values.ndim != 1 or singular_values.numel() != count or count == 0:
        raise ValueError(
            f"expected {count} singular values for a {m}×{n} matrix, "
            f"got a tensor of shape {tuple(singular_values.shape)}"
        )
    s = singular_values.to(torch.float64)
    summary = torch.stack((s.max(), s.min(), s.dot(s))).tolist()  # one transfer, not three
    sigma_max, sigma_min, sum_sq = summary
    tolerance = sigma_max * (max(m, n) if tolerance_dim is None else tolerance_dim) * eps
    rank = int((s > tolerance).sum()) if sigma_max > 0 else 0
    # A σ_min below the tolerance is zero at the weights' precision: the ratio would only
    # measure rounding noise, so the matrix counts as singular.
    condition = sigma_max / sigma_min if rank == count and sigma_min > 0 else math.inf
    stable_rank = sum_sq / sigma_max**2 if sigma_max > 0 else 0.0
    return SpectrumStats(s, rank, condition, stable_rank, sigma_max)


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer's spectrum in one view.

    ``matrix_shape`` is the matrix of the view; for the operator ``(C_out·H_out·W_out, C_in·H·W)``.
    A Linear layer's matrix is ``W`` in every view; ``view`` records the view asked for.
    ``padding`` is the operator's boundary (None outside the operator view and for Linear
    layers); ``note`` a warning when that is not the layer's own boundary.

    Exactly one of ``stats`` (every singular value) and ``extremes`` (a non-circular operator
    too large for the dense SVD: its ``k`` largest and ``k`` smallest values with error bounds,
    ``extremes.complete`` False) is set.
    """

    name: str
    kind: LayerKind
    view: ConvView
    matrix_shape: tuple[int, int]
    stats: SpectrumStats | None
    padding: OperatorPadding | None = None
    note: str | None = None
    extremes: OperatorSpectrum | None = None

    @property
    def complete(self) -> bool:
        """Every singular value was computed (``stats`` is set)."""
        return self.stats is not None

    @property
    def spectral_norm(self) -> float:
        """``σ_max``, from whichever spectrum there is."""
        if self.stats is not None:
            return self.stats.spectral_norm
        assert self.extremes is not None
        return self.extremes.sigma_max


def signal_space(
    layers: Sequence[WeightLayer],
    view: ConvView = ConvView.KERNELS,
    input_hw: Mapping[str, tuple[int, int]] | None = None,
    *,
    operator_padding: OperatorPadding | str | None = OperatorPadding.CIRCULAR,
    max_dense: int = DEFAULT_MAX_DENSE,
    k: int = DEFAULT_EXTREMES,
    lanczos_entries: int = DEFAULT_LANCZOS_ENTRIES,
) -> list[LayerSpectrum]:
    """The spectrum of every layer in ``layers``, in order.

    The SVDs run in float64 on the weights' device; the singular values come back on the CPU
    (one device-to-host transfer for all layers).

    The rank tolerance is ``σ_max · max(m, n) · eps(weight dtype)``. For the operator view the
    dimension is that of the per-frequency blocks of the circular operator,
    ``max(C_out, C_in·s²) / groups`` (for every boundary, so that circular and zero-padded ranks
    compare): the circular operator is the direct sum of those blocks under a unitary change of
    basis, and ``max(m, n)`` of the full ``C·H·W``-sized operator would call every value under
    ~2% of σ_max zero for float32 weights at 56×56.

    Args:
        layers: Linear and Conv2d layers (see :func:`deepscope.analysis.layers.weight_layers`).
        view: how Conv2d layers are read.
        input_hw: ``{name: (H, W)}`` of each Conv2d layer's input; required for the operator
            view (see :func:`conv_input_hw`), ignored otherwise.
        operator_padding: the operator view's boundary: ``circular`` (exact at any size by
            FFT; the default), ``zero``, ``reflect``, ``replicate``, or None for each layer's
            own (:func:`~deepscope.analysis.conv_operator.layer_padding`). Each
            :class:`LayerSpectrum` carries a ``note`` where this is not the layer's own.
        max_dense: a non-circular operator with ``min(m, n) ≤ max_dense`` is decomposed
            densely (every value); a larger one gets only its ``k`` largest and ``k`` smallest
            values, by block Lanczos with the conv and its adjoint as matrix-vector products
            (:func:`~deepscope.analysis.operator_spectrum.conv_operator_spectrum`), and its
            :class:`LayerSpectrum` is partial.
        k: how many of the largest and of the smallest values a partial spectrum has (≥ 1).
        lanczos_entries: memory for one Lanczos basis, in float64 entries (8 bytes each).

    Raises:
        ValueError: unknown view or padding; operator view without the input size of a Conv2d
            layer; the conditions of :func:`conv_operator_singular_values`; ``circular`` for a
            layer whose padding is not "same"-shaped (the circular operator is not its map); a
            padding mode the layer cannot have (e.g. ``reflect`` wider than the input); a
            non-circular operator so large that a Lanczos basis of a few blocks does not fit in
            ``lanczos_entries``; ``k < 1``.
    """
    view = _as_view(view)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    sizes: dict[str, tuple[int, int]] = {}
    paddings: dict[str, OperatorPadding] = {}
    if view is ConvView.OPERATOR:
        hw = input_hw or {}
        missing = [
            layer.name
            for layer in layers
            if layer.kind is LayerKind.CONV2D and layer.name not in hw
        ]
        if missing:
            raise ValueError(
                "the operator view needs input_hw for conv layer(s) "
                + ", ".join(map(repr, missing))
            )
        for layer in layers:
            if layer.kind is LayerKind.CONV2D:
                paddings[layer.name] = resolve_operator_padding(
                    layer, operator_padding, hw[layer.name]
                )
                sizes[layer.name] = (
                    _check_hw(layer, hw[layer.name])
                    if paddings[layer.name] is OperatorPadding.CIRCULAR
                    else (int(hw[layer.name][0]), int(hw[layer.name][1]))
                )

    matrices: list[Tensor | None] = [
        None
        if view is ConvView.OPERATOR and layer.kind is LayerKind.CONV2D
        else _weight_matrix(layer, view)
        for layer in layers
    ]
    # One float64 buffer per device, sized for the largest matrix, holds each converted matrix
    # in turn (the SVD copies its input, so the buffer is free again once it returns).
    largest: dict[torch.device, int] = {}
    for matrix in matrices:
        if matrix is None:
            continue
        largest[matrix.device] = max(largest.get(matrix.device, 0), matrix.numel())
    workspaces = {
        device: torch.empty(numel, dtype=torch.float64, device=device)
        for device, numel in largest.items()
    }

    values: list[Tensor] = []
    shapes: list[tuple[int, int]] = []
    tolerance_dims: list[int | None] = []
    partial: dict[str, OperatorSpectrum] = {}
    for layer, matrix in zip(layers, matrices, strict=True):
        if matrix is None:
            padding = paddings[layer.name]
            shape = _operator_shape(layer, sizes[layer.name])
            if padding is OperatorPadding.CIRCULAR:
                values.append(conv_operator_singular_values(layer, sizes[layer.name]))
            elif min(shape) <= max_dense:
                values.append(_dense_operator_values(layer, sizes[layer.name], padding))
            else:
                partial[layer.name] = _extreme_operator_values(
                    layer, sizes[layer.name], padding, k, max_dense, lanczos_entries
                )
                # A placeholder keeps the lists aligned; partial layers get no SpectrumStats.
                values.append(torch.empty(0, dtype=torch.float64))
            shapes.append(shape)
            tolerance_dims.append(_operator_block_dim(layer))
        else:
            values.append(_svdvals(_to_float64(matrix, workspaces[matrix.device])))
            shapes.append((int(matrix.shape[0]), int(matrix.shape[1])))
            tolerance_dims.append(None)

    if any(v.device.type != "cpu" for v in values):
        # One synchronizing copy for every layer instead of several per layer.
        host = torch.cat([v.reshape(-1) for v in values]).cpu()
        values = list(torch.split(host, [v.numel() for v in values]))

    return [
        LayerSpectrum(
            layer.name,
            layer.kind,
            view,
            shape,
            None
            if layer.name in partial
            else spectrum_stats(v, shape, _eps(layer.weight.dtype), tolerance_dim=dim),
            padding=paddings.get(layer.name),
            note=(
                operator_padding_note(layer, paddings[layer.name])
                if layer.name in paddings
                else None
            ),
            extremes=partial.get(layer.name),
        )
        for layer, v, shape, dim in zip(layers, values, shapes, tolerance_dims, strict=True)
    ]


def _dense_operator_values(
    layer: WeightLayer, hw: tuple[int, int], padding: OperatorPadding
) -> Tensor:
    """Every singular value ``(min(m, n),)`` of a non-circular operator, from its dense matrix."""
    m, n = _operator_shape(layer, hw)
    matrix = dense_operator_matrix(layer, hw, padding, max_entries=max(m * n, 1))
    return _svdvals(matrix)


def _extreme_operator_values(
    layer: WeightLayer,
    hw: tuple[int, int],
    padding: OperatorPadding,
    k: int,
    max_dense: int,
    lanczos_entries: int,
) -> OperatorSpectrum:
    """The ``k`` largest and smallest values of a non-circular operator, matrix-free (Lanczos).

    ``max_dense`` still bounds the dense factorizations the shift-invert for the smallest
    values may use (an exact inverse of the Gram of a small side).
    """
    m, n = _operator_shape(layer, hw)
    try:
        return conv_operator_spectrum(
            layer,
            hw,
            padding,
            k=k,
            method=SpectrumMethod.EXTREMES,
            max_dense=min(max_dense, _INVERSE_MAX_DENSE),
            lanczos_entries=lanczos_entries,
        )
    except ValueError as exc:
        if "Lanczos basis" not in str(exc):
            raise
        # Say which limit, and what the user can do about it.
        raise ValueError(
            f"layer {layer.name!r}: its {padding.value}-padded operator on {hw[0]}×{hw[1]} is "
            f"{m}×{n}, too large even for its extreme singular values: a Lanczos basis of a few "
            f"blocks of vectors of its smaller side does not fit in {lanczos_entries} float64 "
            "entries (8 bytes each); use operator_padding='circular' (exact by FFT at any "
            "size), a smaller input, or leave the layer out"
        ) from None


def top_singular_directions(matrix: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest singular values and right singular vectors of ``matrix`` ``(m, n)``.

    The artifacts render ``σ_i · v_i`` reshaped to the input (first Linear layer) or to the
    kernel shape. Each ``v_i``'s sign is fixed so that its largest-magnitude entry is positive
    (an SVD's signs are arbitrary; results must be reproducible).

    Computed from the Gram matrix of the smaller side (``AᵀA`` or ``AAᵀ``, at most
    ``min(m, n)²``): one BLAS-3 product instead of an SVD of a 262144 × 9 kernels matrix. Its
    rounding error in ``v_i`` is about ``eps · (σ_1 / σ_i)²`` (eps of the weights' dtype), far
    below what a picture shows for the leading directions these are.

    Returns:
        ``(σ[:k], Vh[:k])``: ``(k',)`` and ``(k', n)`` float64, ``k' = min(k, m, n)``.

    Raises:
        ValueError: ``matrix`` is not 2-D or ``k < 1``.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    # The Gram product in the weights' own precision (float32: half the memory traffic of a
    # float64 copy of a 262144 × 9 matrix), its eigendecomposition in float64.
    a = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    m, n = a.shape
    k = min(k, m, n)
    if m >= n:
        # AᵀA = V Σ² Vᵀ: the right vectors directly.
        lam, vecs = torch.linalg.eigh((a.mT @ a).double())
        sigma = lam.flip(0)[:k].clamp_min(0).sqrt()
        vh = vecs.flip(1)[:, :k].mT
    else:
        # AAᵀ = U Σ² Uᵀ, and v_i = Aᵀu_i / σ_i.
        lam, vecs = torch.linalg.eigh((a @ a.mT).double())
        sigma = lam.flip(0)[:k].clamp_min(0).sqrt()
        u = vecs.flip(1)[:, :k]
        vh = (a.double().mT @ u).mT / torch.where(sigma > 0, sigma, 1.0)[:, None]
    peak = vh.gather(1, vh.abs().argmax(dim=1, keepdim=True))
    return sigma, vh * torch.where(peak < 0, -1.0, 1.0).to(vh.dtype)


def layer_spectrum_metrics(ls: LayerSpectrum) -> dict[str, object]:
    """The JSON-ready ``metrics.layers[]`` entry of the ``signal_space`` analysis for one layer.

    Operator-view conv layers also carry ``padding`` (the boundary) and ``padding_note`` (a
    warning when it is not the layer's own, else null). A partial spectrum (``ls.extremes``)
    has no ``singular_values`` and a null ``rank``, and carries ``extremes``: how its values
    were found, their error bounds and whether Lanczos converged.
    """
    if ls.stats is None:
        return _partial_metrics(ls)
    stats = ls.stats
    out: dict[str, object] = {
        "name": ls.name,
        "kind": ls.kind.value,
        "view": ls.view.value,
        "matrix_shape": list(ls.matrix_shape),
        "singular_values": stats.singular_values.tolist(),
        "rank": stats.rank,
        # JSON has no inf: a singular matrix's condition number is null.
        "condition_number": (
            None if math.isinf(stats.condition_number) else stats.condition_number
        ),
        "stable_rank": stats.stable_rank,
        "spectral_norm": stats.spectral_norm,
    }
    if ls.padding is not None:
        out["padding"] = ls.padding.value
        out["padding_note"] = ls.note
    return out


def _partial_metrics(ls: LayerSpectrum) -> dict[str, object]:
    """:func:`layer_spectrum_metrics` of a partial (extremes-only) operator spectrum.

    Only what the extremes determine: ``σ_max``, ``σ_min`` and their ratio; the stable rank
    ``‖A‖_F² / σ_max²`` (``‖A‖_F`` is exact without the spectrum: the conv of ``w²`` on ones)
    where the boundary allows. The rank needs every value and is null.
    """
    spec = ls.extremes
    assert spec is not None
    cond = spec.condition_number
    sigma_min, sigma_min_error = spec.sigma_min, float(spec.smallest_error[0])
    out: dict[str, object] = {
        "name": ls.name,
        "kind": ls.kind.value,
        "view": ls.view.value,
        "matrix_shape": list(ls.matrix_shape),
        "rank": None,
        "condition_number": None if math.isinf(cond) else cond,
        "stable_rank": spec.stable_rank,
        "spectral_norm": spec.sigma_max,
        "extremes": {
            "k": int(spec.largest.numel()),
            "method": "lanczos",
            "detail": spec.detail,
            "converged": spec.converged,
            # Certified: Lanczos converged and some singular value provably lies within
            # 0.1% of σ_min (3 significant digits); else an estimate, off by its bound at most.
            "sigma_min_certified": spec.converged and sigma_min_error <= 1e-3 * sigma_min,
            "sigma_min_error": sigma_min_error,
            "largest_error": spec.largest_error.tolist(),
            "smallest_error": spec.smallest_error.tolist(),
            "structural_zeros": spec.structural_zeros,
            "frobenius_norm": spec.frobenius_norm,
        },
    }
    if ls.padding is not None:
        out["padding"] = ls.padding.value
        out["padding_note"] = ls.note
    return out


def conv_input_hw(
    model: nn.Module, input_shape: Sequence[int], device: torch.device | str | None = None
) -> dict[str, tuple[int, int]]:
    """``{name: (H, W)}`` of every Conv2d layer's input for one ``(C, H, W)`` input.

    Runs one forward pass of zeros (eval mode restored, no gradients) with a pre-hook on each
    Conv2d that records only the shape. ``device`` defaults to that of the first parameter.
    """
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    sizes: dict[str, tuple[int, int]] = {}
    handles: list[RemovableHandle] = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):

                def record(_m: nn.Module, args: tuple[Tensor, ...], _name: str = name) -> None:
                    sizes[_name] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

                handles.append(module.register_forward_pre_hook(record))
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return sizes
