"""Singular values of a Conv2d layer's operator with its real boundary (zero padding and others).

:func:`conv_operator_spectrum` gives the spectrum of the map ``x ↦ conv(pad(x))`` on one input
size (:class:`~deepscope.analysis.conv_operator.ConvOperator`) for any boundary:

* ``circular`` (circular-shaped layers): every value, exactly, through the 2-D FFT
  (:func:`deepscope.analysis.signal_space.conv_operator_singular_values`);
* small operators (``min(m, n) ≤ max_dense``): every value from the SVD of the dense matrix;
* large ones: the ``k`` largest and ``k`` smallest, with an error bound each. The largest come
  from block Lanczos on the Gram of the smaller side (``AᵀA`` or ``AAᵀ``). The smallest are the
  hard part: a square conv's smallest singular values crowd towards 0 (``σ_min/σ_max ≈ 10⁻⁵`` on
  16×16 for resnet18's convs), so Lanczos on the Gram would need ~``σ_max/σ_min`` steps, and a
  circulant preconditioner does not change that (see :mod:`deepscope.analysis.precondition`).
  Where an exact inverse exists (dense LU/Cholesky for small operators, the boundary-corrected
  circulant inverse for square stride-1 "same" convs), they come from shift-invert: Lanczos on
  ``G⁻¹``, whose largest eigenvalues ``1/σ_min²`` are well separated. Elsewhere (rectangular
  operators, which are well conditioned in practice) from Lanczos on ``G``, flagged when it did
  not converge.

Every reported value is re-evaluated with the operator itself: for a unit Ritz vector ``v`` of
the Gram ``G``, ``σ = ‖A v‖`` (or ``‖Aᵀv‖``) and ``ρ = ‖G v − σ² v‖``; some eigenvalue of ``G``
lies in ``[σ² − ρ, σ² + ρ]`` (Bauer–Fike for symmetric matrices), which gives each value's bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

import torch
from torch import Tensor

from deepscope.analysis.conv_operator import (
    ConvOperator,
    LayerPadding,
    OperatorPadding,
    conv_output_hw,
    dense_operator_matrix,
    layer_padding,
    operator_padding_note,
    resolve_operator_padding,
)
from deepscope.analysis.krylov import block_lanczos, sq_norms
from deepscope.analysis.layers import WeightLayer
from deepscope.analysis.precondition import (
    BoundaryCorrectedInverse,
    DenseGramInverse,
    DenseSquareInverse,
    GramInverse,
    square_same_conv,
)

__all__ = [
    "Extremes",
    "OperatorSpectrum",
    "OperatorStructure",
    "SpectrumMethod",
    "conv_operator_spectrum",
    "gram_inverse",
    "largest_singular_values",
    "operator_spectrum_metrics",
    "rounding_allowance",
    "smallest_singular_values",
]

_F64 = torch.float64
_EPS64 = float(torch.finfo(_F64).eps)

#: Operators whose smaller side is at most this are decomposed densely by default.
DEFAULT_MAX_DENSE = 2048
#: Entries of a dense matrix (8 bytes each) above which the dense route is refused.
DEFAULT_MAX_DENSE_ENTRIES = 1 << 26
#: Memory for a Lanczos basis, in float64 entries (512 MiB).
DEFAULT_LANCZOS_ENTRIES = 1 << 26
#: Boundary unknowns above which the boundary-corrected inverse is not built (its LU is r×r).
DEFAULT_MAX_BOUNDARY = 16384


class SpectrumMethod(StrEnum):
    """How the singular values of an operator are computed."""

    AUTO = "auto"  # fft for circular, dense when small, extremes otherwise
    FFT = "fft"  # every value, exact: circular boundary only
    DENSE = "dense"  # every value: SVD of the dense matrix
    EXTREMES = "extremes"  # the k largest and k smallest, matrix-free


@dataclass(frozen=True)
class OperatorSpectrum:
    """The singular values of one Conv2d layer's operator on one input size.

    Attributes:
        name: the layer.
        padding: the boundary of the operator; layer_padding: the layer's own.
        note: a warning when ``padding`` is not the layer's own boundary, else None.
        input_hw, output_hw: ``(H, W)`` and ``(H_out, W_out)``.
        matrix_shape: ``(C_out·H_out·W_out, C_in·H·W)``.
        method: ``fft``, ``dense`` or ``extremes``; detail: how the extremes were found (e.g.
            ``"Lanczos on AᵀA; smallest by shift-invert, dense LU"``), "" otherwise.
        complete: every one of the ``min(m, n)`` values was computed (``singular_values``).
        singular_values: all values, descending, float64, when ``complete``; else None.
        largest: ``(k,)`` the largest values, descending.
        smallest: ``(k,)`` the smallest of the ``min(m, n)`` values, ascending
            (``smallest[0] = σ_min``).
        largest_error, smallest_error: ``(k,)`` bounds on each value's error: some singular value
            lies within it (0 where exact: FFT, or structural zeros; rounding-level for dense).
        structural_zeros: how many of the ``min(m, n)`` values are exactly 0 because inputs are
            never read or outputs read nothing (e.g. a 1×1 stride-2 conv skips 3 of 4 pixels).
        converged: the extremes met their tolerance (always True for fft and dense).
        sigma_max, sigma_min: ``largest[0]`` and ``smallest[0]``.
        condition_number: ``σ_max / σ_min`` (``math.inf`` when ``σ_min`` is 0).
        frobenius_norm: ``‖A‖_F`` (exact; None for reflect/replicate extremes, where padding
            copies make it expensive).
        stable_rank: ``‖A‖_F² / σ_max²`` (None without ``frobenius_norm``).
    """

    name: str
    padding: OperatorPadding
    layer_padding: LayerPadding
    note: str | None
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    matrix_shape: tuple[int, int]
    method: SpectrumMethod
    detail: str
    complete: bool
    singular_values: Tensor | None
    largest: Tensor
    smallest: Tensor
    largest_error: Tensor
    smallest_error: Tensor
    structural_zeros: int
    converged: bool
    frobenius_norm: float | None

    @property
    def sigma_max(self) -> float:
        """The largest singular value."""
        return float(self.largest[0])

    @property
    def sigma_min(self) -> float:
        """The smallest of the ``min(m, n)`` singular values."""
        return float(self.smallest[0])

    @property
    def condition_number(self) -> float:
        """``σ_max / σ_min``; ``math.inf`` when ``σ_min`` is 0."""
        return self.sigma_max / self.sigma_min if self.sigma_min > 0 else math.inf

    @property
    def stable_rank(self) -> float | None:
        """``‖A‖_F² / σ_max²``."""
        if self.frobenius_norm is None or self.sigma_max == 0:
            return None
        return self.frobenius_norm**2 / self.sigma_max**2


@dataclass
class OperatorStructure:
    """An operator with its structural zeros removed, and the side its Gram is taken on.

    Attributes:
        op: the operator.
        zero_rows, zero_cols: bool ``out_shape`` / ``in_shape``, see
            :meth:`ConvOperator.structural_zeros`.
        m_eff, n_eff: rows and columns that are not structurally zero.
        side: ``"input"`` (Gram ``AᵀA``) when ``n_eff ≤ m_eff``, else ``"output"`` (``AAᵀ``).
        mask: float64 0/1 over the side's shape (None when nothing is excluded).
    """

    op: ConvOperator
    zero_rows: Tensor
    zero_cols: Tensor
    m_eff: int
    n_eff: int
    side: str
    mask: Tensor | None

    @classmethod
    def of(cls, op: ConvOperator) -> OperatorStructure:
        """Find the structural zeros of ``op`` and pick the smaller side."""
        zero_rows, zero_cols = op.structural_zeros()
        m_eff = op.m - int(zero_rows.sum())
        n_eff = op.n - int(zero_cols.sum())
        side = "input" if n_eff <= m_eff else "output"
        excluded = zero_cols if side == "input" else zero_rows
        mask = None if not bool(excluded.any()) else (~excluded).to(_F64)
        return cls(op, zero_rows, zero_cols, m_eff, n_eff, side, mask)

    @property
    def dim(self) -> int:
        """The Gram's dimension on its side (structural zeros excluded)."""
        return min(self.m_eff, self.n_eff)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The side's vector shape."""
        return self.op.in_shape if self.side == "input" else self.op.out_shape

    def gram(self, v: Tensor) -> Tensor:
        """``AᵀA v`` (input side) or ``AAᵀ v`` (output side), in ``v``'s dtype."""
        if self.side == "input":
            return self.op.gram_input(v)
        return self.op.gram_output(v)

    def image_norms(self, v: Tensor) -> Tensor:
        """``‖A v‖`` (input side) or ``‖Aᵀ v‖`` (output side) per vector: ``(b,)``."""
        image = self.op.forward(v) if self.side == "input" else self.op.adjoint(v)
        return sq_norms(image).sqrt()


def gram_inverse(
    structure: OperatorStructure,
    *,
    max_dense: int = DEFAULT_MAX_DENSE,
    max_dense_entries: int = DEFAULT_MAX_DENSE_ENTRIES,
    max_boundary: int = DEFAULT_MAX_BOUNDARY,
    rectangular: bool = True,
) -> GramInverse | None:
    """An exact inverse of the side's Gram, or None where none is affordable.

    Square operators (the ill-conditioned ones): dense LU when the side has at most
    ``max_dense`` unknowns, else the boundary-corrected circulant inverse for stride-1 "same"
    convs without structural zeros. Rectangular ones (with ``rectangular``): Cholesky of the
    dense Gram when small. None otherwise, and when the Gram is singular.
    """
    op = structure.op
    small = structure.dim <= max_dense and op.m * op.n <= max_dense_entries
    square = op.m == op.n and structure.mask is None and structure.m_eff == structure.n_eff
    try:
        if square and not small and square_same_conv(op):
            return BoundaryCorrectedInverse(op, max_boundary=max_boundary)
        if small and (square or rectangular):
            dense = dense_operator_matrix(
                op.layer,
                (op.in_shape[1], op.in_shape[2]),
                op.padding,
                device=op.device,
                max_entries=max_dense_entries,
            )
            if square:
                return DenseSquareInverse(op, dense)
            keep = None if structure.mask is None else structure.mask > 0
            return DenseGramInverse(op, dense, structure.side, keep)
    except ValueError:
        # Singular (or an unusable circulant): no exact inverse, the caller falls back.
        return None
    return None


@dataclass(frozen=True)
class Extremes:
    """Singular values at one end with their bounds, and the Ritz vectors (side shape)."""

    values: Tensor  # (k,) ascending for the bottom, descending for the top
    errors: Tensor  # (k,)
    vectors: Tensor  # (k, *side_shape)
    converged: bool
    steps: int


def rounding_allowance(op: ConvOperator, sigma_max: float) -> float:
    """The rounding to allow in one float64 ``AᵀA v`` or ``AAᵀ v`` with ``‖v‖ = 1``.

    Each entry of ``A v`` sums ``fan_in`` products and each of ``Aᵀ u`` ``fan_out``; rounding
    errors of random sign add like a random walk, ``≈ (√fan_in + √fan_out)·eps·σ_max²``. (The
    worst case replaces ``σ_max`` by ``‖|A|‖``, the norm of the entrywise absolute value, which
    for random-sign weights is ~25× larger and would swamp the ``σ_min² ≈ 10⁻¹²`` of a square
    512-channel conv.)
    """
    layer = op.layer
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    fan_in = layer.in_channels // layer.groups * taps
    strides = layer.stride[0] * layer.stride[1]
    fan_out = max(1, layer.out_channels // layer.groups * taps // strides)
    return (math.sqrt(fan_in) + math.sqrt(fan_out)) * _EPS64 * sigma_max**2


def _evaluate(
    structure: OperatorStructure, vectors: Tensor, sigma_max: float | None = None
) -> tuple[Tensor, Tensor]:
    """``σ = ‖A v‖`` per unit vector and the bound from ``ρ = ‖G v − σ² v‖`` (Bauer–Fike).

    ``sigma_max`` scales the rounding allowance added to ``ρ`` (the largest of these ``σ`` when
    None: the vectors are the top ones).
    """
    v = vectors / sq_norms(vectors).sqrt().clamp_min(1e-300).view(-1, 1, 1, 1)
    if structure.mask is not None:
        v = v * structure.mask
    sigma = structure.image_norms(v)
    lam = sigma.pow(2)
    rho = sq_norms(structure.gram(v) - lam.view(-1, 1, 1, 1) * v).sqrt()
    # ρ is itself computed in float64: add what its rounding may hide.
    scale = float(sigma.max()) if sigma_max is None else sigma_max
    rho = rho + rounding_allowance(structure.op, scale)
    low = (lam - rho).clamp_min(0).sqrt()
    high = (lam + rho).sqrt()
    return sigma, torch.maximum(sigma - low, high - sigma)


def _basis_cap(structure: OperatorStructure, lanczos_entries: int) -> int:
    size = max(1, math.prod(structure.shape))
    return max(1, lanczos_entries // size)


def largest_singular_values(
    structure: OperatorStructure,
    k: int,
    *,
    tol: float = 1e-10,
    lanczos_entries: int = DEFAULT_LANCZOS_ENTRIES,
    seed: int = 0,
) -> Extremes:
    """The ``k`` largest singular values (descending) by block Lanczos on the side's Gram."""
    op = structure.op
    k = min(k, structure.dim)
    pairs = block_lanczos(
        structure.gram,
        structure.shape,
        k=k,
        which="largest",
        block=max(2, min(k, 8)),
        tol=tol,
        max_vectors=_basis_cap(structure, lanczos_entries),
        dtype=_F64,
        device=op.device,
        mask=structure.mask,
        seed=seed,
    )
    sigma, err = _evaluate(structure, pairs.vectors)
    order = sigma.argsort(descending=True)
    return Extremes(sigma[order], err[order], pairs.vectors[order], pairs.converged, pairs.steps)


def smallest_singular_values(
    structure: OperatorStructure,
    k: int,
    inverse: GramInverse | None,
    *,
    tol: float = 1e-10,
    lanczos_entries: int = DEFAULT_LANCZOS_ENTRIES,
    refine: int = 2,
    sigma_max: float | None = None,
    seed: int = 1,
) -> Extremes:
    """The ``k`` smallest singular values of the side (ascending), structural zeros excluded.

    With ``inverse``: shift-invert, block Lanczos on ``G⁻¹`` for its largest eigenvalues, then
    ``refine`` steps of block inverse iteration with a Rayleigh–Ritz on the block. The bound on
    ``σ_min`` comes from ``‖G v − σ² v‖``, in which a Ritz vector's small leftover along the
    large eigenvalues (``λ_max/λ_min ≈ 10¹⁰`` for a square conv) is magnified by ``λ_max``;
    each inverse iteration divides that leftover by ``λ_i/λ_min``, leaving rounding only.
    Without: block Lanczos on ``G`` for its smallest, which converges only for well-conditioned
    ``G`` (``converged`` says whether it did). ``sigma_max`` (an estimate of the largest
    singular value) scales the rounding allowance of the bounds; without it the operator's
    :meth:`~ConvOperator.norm_upper_bound` is used, which can be far larger.
    """
    op = structure.op
    k = min(k, structure.dim)
    operator = inverse.apply if inverse is not None else structure.gram
    pairs = block_lanczos(
        operator,
        structure.shape,
        k=k,
        which="largest" if inverse is not None else "smallest",
        block=max(2, min(k, 8)),
        tol=tol,
        max_vectors=_basis_cap(structure, lanczos_entries),
        dtype=_F64,
        device=op.device,
        mask=structure.mask,
        seed=seed,
    )
    vectors = pairs.vectors
    if inverse is not None:
        for _ in range(refine):
            # One step of iterative refinement against the exact G: the inverse's own rounding
            # (its LU meets cond ≈ 10⁶) would otherwise stay in the vectors.
            solved = inverse.apply(vectors)
            solved = solved + inverse.apply(vectors - structure.gram(solved))
            vectors = _rayleigh_ritz(structure, solved)
    scale = structure.op.norm_upper_bound() if sigma_max is None else sigma_max
    sigma, err = _evaluate(structure, vectors, scale)
    order = sigma.argsort()
    return Extremes(sigma[order], err[order], vectors[order], pairs.converged, pairs.steps)


def _rayleigh_ritz(structure: OperatorStructure, block: Tensor) -> Tensor:
    """The Ritz vectors of the side's Gram in the span of ``block`` ``(k, *shape)``."""
    if structure.mask is not None:
        block = block * structure.mask
    flat = block.reshape(block.shape[0], -1)
    q = torch.linalg.qr(flat.T).Q.T  # (k, N) orthonormal
    basis = q.reshape(block.shape)
    projected = q @ structure.gram(basis).reshape(q.shape[0], -1).T
    _, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    ritz: Tensor = (rotation.T @ q).reshape(block.shape)
    return ritz


def _frobenius(op: ConvOperator) -> float | None:
    """``‖A‖_F``: with zero (or non-wrapping circular) padding each tap of an output pixel reads
    a distinct input entry, so it is the conv with ``w²`` on all-ones summed; None for padding
    that copies pixels (two taps may then read the same entry and their weights add)."""
    if op.padding in (OperatorPadding.REFLECT, OperatorPadding.REPLICATE):
        return None
    layer = op.layer
    if op.padding is OperatorPadding.CIRCULAR:
        (k_h, k_w), (d_h, d_w) = layer.kernel_size, layer.dilation
        if d_h * (k_h - 1) >= op.in_shape[1] or d_w * (k_w - 1) >= op.in_shape[2]:
            return None  # a kernel wider than the input wraps onto itself
    squared = op.weight(_F64).pow(2)
    ones = torch.ones((1, *op.in_shape), dtype=_F64, device=op.device)
    return math.sqrt(float(op._forward(ones, squared).sum()))


def conv_operator_spectrum(
    layer: WeightLayer,
    input_hw: tuple[int, int],
    padding: OperatorPadding | str | None = None,
    *,
    k: int = 6,
    method: SpectrumMethod | str = SpectrumMethod.AUTO,
    tol: float = 1e-10,
    max_dense: int = DEFAULT_MAX_DENSE,
    max_dense_entries: int = DEFAULT_MAX_DENSE_ENTRIES,
    max_boundary: int = DEFAULT_MAX_BOUNDARY,
    lanczos_entries: int = DEFAULT_LANCZOS_ENTRIES,
) -> OperatorSpectrum:
    """Singular values of a Conv2d layer as the map it is on a ``C_in × H × W`` input.

    Args:
        layer: a Conv2d layer (any stride, padding, dilation, groups, padding mode).
        input_hw: ``(H, W)`` of its input.
        padding: the boundary (``zero``, ``circular``, ``reflect``, ``replicate``); None for the
            layer's own (:func:`~deepscope.analysis.conv_operator.layer_padding`), which is the
            layer's actual map. ``zero`` is exactly ``F.conv2d`` with the layer's stride,
            padding, dilation and groups.
        k: how many of the largest and of the smallest values to report.
        method: ``auto`` (``fft`` for circular, ``dense`` when ``min(m, n) ≤ max_dense``,
            else ``extremes``), or one of them forced.
        tol: Lanczos stops when each wanted Ritz residual is ``≤ tol·θ_max``.
        max_dense: the largest smaller side decomposed densely under ``auto``.
        max_dense_entries: refuse a dense matrix with more entries (8 bytes each).
        max_boundary: the largest boundary system the shift-invert of square convs may factor.
        lanczos_entries: memory for a Lanczos basis, in float64 entries.

    Returns:
        An :class:`OperatorSpectrum` (float64 values on the CPU).

    Raises:
        ValueError: not a Conv2d layer; bad sizes; a padding the layer cannot have (e.g.
            ``circular`` for a layer whose output is not the stride-reduced input, say a "valid"
            3×3 conv); ``fft`` for a boundary that is not circular; ``dense`` beyond
            ``max_dense_entries``; an operator whose Lanczos basis would not fit in
            ``lanczos_entries``; ``k < 1``.
    """
    # Imported here: signal_space imports this module for its operator view.
    from deepscope.analysis.signal_space import conv_operator_singular_values

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    chosen = resolve_operator_padding(layer, padding, input_hw)
    try:
        how = SpectrumMethod(method)
    except ValueError:
        valid = ", ".join(m.value for m in SpectrumMethod)
        raise ValueError(f"unknown method {method!r}; valid methods are: {valid}") from None
    op = ConvOperator(layer, input_hw, padding=chosen)
    shape = (op.m, op.n)
    count = min(shape)
    if how is SpectrumMethod.AUTO:
        if chosen is OperatorPadding.CIRCULAR:
            how = SpectrumMethod.FFT
        elif count <= max_dense and op.m * op.n <= max_dense_entries:
            how = SpectrumMethod.DENSE
        else:
            how = SpectrumMethod.EXTREMES
    common = partial(
        OperatorSpectrum,
        name=layer.name,
        padding=chosen,
        layer_padding=layer_padding(layer),
        note=operator_padding_note(layer, chosen),
        input_hw=(int(input_hw[0]), int(input_hw[1])),
        output_hw=conv_output_hw(layer, input_hw),
        matrix_shape=shape,
    )
    if how in (SpectrumMethod.FFT, SpectrumMethod.DENSE):
        kk = min(k, count)
        if how is SpectrumMethod.FFT:
            if chosen is not OperatorPadding.CIRCULAR:
                raise ValueError(
                    f"layer {layer.name!r}: the fft method is exact for the circular boundary "
                    f"only, not {chosen.value}; use dense or extremes"
                )
            values = conv_operator_singular_values(layer, input_hw).cpu()
            rounding = 0.0
            structural = 0
        else:
            matrix = dense_operator_matrix(layer, input_hw, chosen, max_entries=max_dense_entries)
            tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
            values = torch.linalg.svdvals(tall).cpu()
            # The SVD is backward stable: its values are exact for a matrix within
            # ~max(m, n)·eps·‖A‖ of A, so (Weyl) each is within that of the true one.
            rounding = float(values[0]) * max(shape) * _EPS64
            structure = OperatorStructure.of(op)
            structural = count - structure.dim
        return common(
            method=how,
            detail="",
            complete=True,
            singular_values=values,
            largest=values[:kk],
            smallest=values.flip(0)[:kk],
            largest_error=torch.full((kk,), rounding, dtype=_F64),
            smallest_error=torch.full((kk,), rounding, dtype=_F64),
            structural_zeros=structural,
            converged=True,
            frobenius_norm=float(values.pow(2).sum().sqrt()),
        )

    structure = OperatorStructure.of(op)
    cap = _basis_cap(structure, lanczos_entries)
    if cap < 2 * max(2, min(k, 8)):
        raise ValueError(
            f"layer {layer.name!r}: the operator on {input_hw[0]}×{input_hw[1]} has "
            f"{math.prod(structure.shape)} unknowns on its smaller side, too large for a Lanczos "
            f"basis within {lanczos_entries} entries"
        )
    structural = count - structure.dim
    top = largest_singular_values(structure, k, tol=tol, lanczos_entries=lanczos_entries)
    inverses = partial(
        gram_inverse,
        structure,
        max_dense=max_dense,
        max_dense_entries=max_dense_entries,
        max_boundary=max_boundary,
    )
    # Rectangular operators are well conditioned in practice: Lanczos on G first, the dense
    # inverse only if that did not converge.
    inverse = inverses(rectangular=False)
    sigma_max = float(top.values[0])
    bottom = smallest_singular_values(
        structure, k, inverse, tol=tol, lanczos_entries=lanczos_entries, sigma_max=sigma_max
    )
    if not bottom.converged and inverse is None:
        inverse = inverses()
        if inverse is not None:
            bottom = smallest_singular_values(
                structure,
                k,
                inverse,
                tol=tol,
                lanczos_entries=lanczos_entries,
                sigma_max=sigma_max,
            )
    kk = min(k, count)
    zeros = torch.zeros(min(structural, kk), dtype=_F64)
    smallest = torch.cat((zeros, bottom.values.cpu()))[:kk]
    smallest_error = torch.cat((zeros, bottom.errors.cpu()))[:kk]
    gram_name = "AᵀA" if structure.side == "input" else "AAᵀ"
    how_bottom = (
        f"shift-invert Lanczos with {inverse.method}"
        if inverse is not None
        else f"Lanczos on {gram_name}"
    )
    return common(
        method=SpectrumMethod.EXTREMES,
        detail=f"largest by block Lanczos on {gram_name}; smallest by {how_bottom}",
        complete=False,
        singular_values=None,
        largest=top.values.cpu(),
        smallest=smallest,
        largest_error=top.errors.cpu(),
        smallest_error=smallest_error,
        structural_zeros=structural,
        converged=top.converged and (bottom.converged or structural >= kk),
        frobenius_norm=_frobenius(op),
    )


def operator_spectrum_metrics(spec: OperatorSpectrum) -> dict[str, object]:
    """A JSON-ready summary of an :class:`OperatorSpectrum` (no inf/NaN: null instead)."""
    cond = spec.condition_number
    return {
        "name": spec.name,
        "padding": spec.padding.value,
        "layer_padding": spec.layer_padding.mode.value,
        "padding_amount": list(spec.layer_padding.amount),
        "note": spec.note,
        "input_hw": list(spec.input_hw),
        "output_hw": list(spec.output_hw),
        "matrix_shape": list(spec.matrix_shape),
        "method": spec.method.value,
        "detail": spec.detail,
        "complete": spec.complete,
        "singular_values": (
            None if spec.singular_values is None else spec.singular_values.tolist()
        ),
        "largest": spec.largest.tolist(),
        "smallest": spec.smallest.tolist(),
        "largest_error": spec.largest_error.tolist(),
        "smallest_error": spec.smallest_error.tolist(),
        "structural_zeros": spec.structural_zeros,
        "converged": spec.converged,
        "spectral_norm": spec.sigma_max,
        "sigma_min": spec.sigma_min,
        "condition_number": None if math.isinf(cond) else cond,
        "frobenius_norm": spec.frobenius_norm,
        "stable_rank": spec.stable_rank,
    }
