"""``signal_space``: the SVD of every Linear and Conv2d layer (Pattichis & Pattichis 2024).

Each layer is a linear map between signal spaces; its singular values give its rank, its
condition number and how evenly it uses its input directions. Conv layers have three views:
``kernels`` (each 2-D kernel a row: the paper's), ``filters`` (each output filter a row) and
``operator`` (the singular values of the convolution on the layer's input size, with the
boundary of ``padding``: every value when they can be computed, else — a non-circular operator
with ``min(m, n)`` over the dense limit — the ``extremes`` largest and smallest by Lanczos, and
the layer's spectrum says it is partial).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from deepscope.analyses.params import LayerParams
from deepscope.analyses.registry import AnalysisSpec, register_analysis
from deepscope.contract.result import LayerValues, Metrics, summary_tables
from deepscope.contract.tables import Table, fmt

__all__ = [
    "LayerSpectrum",
    "OperatorExtremes",
    "SignalSpaceMetrics",
    "SignalSpaceParams",
    "SpectrumSummary",
]


class SignalSpaceParams(LayerParams):
    """``signal_space``: SVD of every Linear / Conv2d layer."""

    analysis: Literal["signal_space"] = "signal_space"
    view: Literal["kernels", "filters", "operator"] = Field(
        default="kernels",
        description="Conv2d matrix: kernels (each 2-D kernel a row, the paper's), filters "
        "(each output filter a row) or operator (the singular values of the convolution on the "
        "layer's input size, with the boundary of `padding`)",
    )
    padding: Literal["layer", "circular", "zero", "reflect", "replicate"] = Field(
        default="layer",
        description="operator view's boundary: layer (each layer's own: zero for most), "
        "circular (exact by FFT at any size), zero (the layer's real map when it pads with "
        "zeros), reflect or replicate; result.json warns where it is not the layer's own",
    )
    extremes: int = Field(
        default=16,
        ge=1,
        le=128,
        description="operator view, non-circular boundary: an operator with more than 4096 "
        "singular values gets only this many of its largest and of its smallest, by Lanczos "
        "with the conv and its adjoint (its spectrum is then partial: no rank, quantiles or "
        "histogram)",
    )
    vectors: int = Field(
        default=16, ge=0, le=256, description="top singular directions rendered per layer"
    )
    images: bool = Field(
        default=True, description="render pictures (false: metrics and arrays only)"
    )


class Profile(BaseModel):
    indices: list[int] = Field(description="0-based indices into the descending spectrum")
    values: list[float] = Field(description="the singular values at those indices")


class Histogram(BaseModel):
    log10_edges: list[float]
    counts: list[int]
    zeros: int = Field(description="values ≤ 0 (no logarithm)")


class SpectrumSummary(BaseModel):
    """A bounded summary of a layer's singular values (all of them are in the ``.npz``).

    A partial spectrum (``complete`` false: only the largest and smallest were computed) has
    its ``profile`` at the indices of those values only, and no quantiles nor histogram.
    """

    count: int = Field(description="how many singular values the matrix has (min(m, n))")
    complete: bool = Field(
        default=True,
        description="every singular value was computed; false: only `top` and `bottom` "
        "(Lanczos), and what needs the rest (quantiles, histogram, rank) is null",
    )
    max: float
    min: float
    profile: Profile = Field(
        description="values at up to 256 evenly spaced indices (all when count ≤ 256); "
        "partial spectrum: the indices of `top` and `bottom` only"
    )
    top: list[float] = Field(description="the largest k, descending")
    bottom: list[float] = Field(description="the smallest k, ascending")
    quantiles: dict[str, float] | None = Field(description="null for a partial spectrum")
    histogram: Histogram | None = Field(description="null for a partial spectrum")


class OperatorExtremes(BaseModel):
    """How a partial operator spectrum was computed, and how far each value may be off."""

    k: int = Field(description="how many of the largest and of the smallest were computed")
    method: str = Field(description="lanczos")
    detail: str = Field(description="which Gram, and how the smallest were found")
    converged: bool = Field(description="Lanczos met its tolerance at both ends")
    sigma_min_certified: bool = Field(
        description="Lanczos converged, and some singular value provably lies within "
        "0.001·σ_min of `spectrum.min` (3 significant digits); false: it is an estimate, off by "
        "at most `sigma_min_error` from some singular value"
    )
    sigma_min_error: float = Field(description="bound on |σ_min − some singular value|")
    largest_error: list[float] = Field(description="bound per value of `spectrum.top`")
    smallest_error: list[float] = Field(description="bound per value of `spectrum.bottom`")
    structural_zeros: int = Field(
        description="singular values exactly 0 because inputs are never read (e.g. a 1×1 "
        "stride-2 conv skips 3 of 4 pixels)"
    )
    frobenius_norm: float | None = Field(
        description="‖A‖_F, exact (null for reflect/replicate boundaries)"
    )


class LayerSpectrum(BaseModel):
    name: str
    kind: str
    view: str
    matrix_shape: list[int] = Field(description="[rows, columns] of the matrix analyzed")
    rank: int | None = Field(description="null for a partial spectrum (it needs every value)")
    condition_number: float | None = Field(
        description="σ₁/σₙ; null when unbounded (σₙ = 0). Partial spectrum: from the Lanczos "
        "extremes (see `extremes.sigma_min_certified`)"
    )
    stable_rank: float | None = Field(
        description="‖W‖²_F / ‖W‖²₂; null for a partial spectrum of a reflect/replicate operator"
    )
    spectral_norm: float = Field(description="σ₁")
    spectrum: SpectrumSummary
    extremes: OperatorExtremes | None = Field(
        default=None,
        description="operator view, partial spectrum only: how the largest and smallest "
        "values were computed and their error bounds",
    )
    padding: str | None = Field(
        default=None, description="operator view: the boundary of the operator analyzed"
    )
    padding_note: str | None = Field(
        default=None, description="operator view: why this is not the layer's own map, if so"
    )


class SignalSpaceMetrics(Metrics):
    view: str
    layers: list[LayerSpectrum]

    def tables(self) -> list[Table]:
        rows = [
            [
                layer.name,
                layer.kind,
                layer.view,
                fmt(layer.matrix_shape),
                fmt(layer.rank),
                fmt(layer.condition_number, "condition_number"),
                fmt(layer.stable_rank),
                fmt(layer.spectral_norm),
                fmt(layer.spectrum.min),
            ]
            for layer in self.layers
        ]
        columns = [
            "layer",
            "kind",
            "view",
            "matrix",
            "rank",
            "condition number",
            "stable rank",
            "spectral norm",
            "smallest σ",
        ]
        note = (
            "condition number σ₁/σₙ (∞: singular); stable rank ‖W‖²_F/‖W‖²₂; "
            "every singular value is in singular_values.npz"
        )
        partial = [layer.name for layer in self.layers if not layer.spectrum.complete]
        if partial:
            note += (
                "; partial spectrum (largest and smallest by Lanczos, no rank; they are in "
                "extreme_singular_values.npz): " + ", ".join(partial)
            )
        table = Table("Signal spaces: one row per layer", columns, rows, note)
        return [*summary_tables(self, frozenset({"layers"})), table]

    def layer_values(self) -> LayerValues:
        return {
            layer.name: {
                "rank": None if layer.rank is None else float(layer.rank),
                "condition_number": layer.condition_number,
                "stable_rank": layer.stable_rank,
                "spectral_norm": layer.spectral_norm,
                "smallest_singular_value": layer.spectrum.min,
            }
            for layer in self.layers
        }


SPEC = register_analysis(
    AnalysisSpec(
        name="signal_space",
        summary="SVD of every Linear / Conv2d layer: rank, condition number, spectra",
        params=SignalSpaceParams,
        metrics=SignalSpaceMetrics,
        compute="deepscope.analyses.signal_space.compute:run",
        layer_metrics=(
            "rank",
            "condition_number",
            "stable_rank",
            "spectral_norm",
            "smallest_singular_value",
        ),
    )
)
