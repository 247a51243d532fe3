"""``signal_space``: the SVD of every Linear and Conv2d layer (Pattichis & Pattichis 2024).

Each layer is a linear map between signal spaces; its singular values give its rank, its
condition number and how evenly it uses its input directions. Conv layers have three views:
``kernels`` (each 2-D kernel a row: the paper's), ``filters`` (each output filter a row) and
``operator`` (the exact singular values of the convolution on the layer's input size).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from deepscope.analyses.params import LayerParams
from deepscope.analyses.registry import AnalysisSpec, register_analysis
from deepscope.contract.result import LayerValues, Metrics, summary_tables
from deepscope.contract.tables import Table, fmt

__all__ = ["LayerSpectrum", "SignalSpaceMetrics", "SignalSpaceParams", "SpectrumSummary"]


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
    """A bounded summary of a layer's singular values (all of them are in the ``.npz``)."""

    count: int = Field(description="how many singular values the matrix has (min(m, n))")
    max: float
    min: float
    profile: Profile = Field(
        description="values at up to 256 evenly spaced indices (all when count ≤ 256)"
    )
    top: list[float] = Field(description="the largest k, descending")
    bottom: list[float] = Field(description="the smallest k, ascending")
    quantiles: dict[str, float]
    histogram: Histogram


class LayerSpectrum(BaseModel):
    name: str
    kind: str
    view: str
    matrix_shape: list[int] = Field(description="[rows, columns] of the matrix analyzed")
    rank: int
    condition_number: float | None = Field(description="σ₁/σₙ; null when unbounded (σₙ = 0)")
    stable_rank: float = Field(description="‖W‖²_F / ‖W‖²₂")
    spectral_norm: float = Field(description="σ₁")
    spectrum: SpectrumSummary
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
        table = Table("Signal spaces: one row per layer", columns, rows, note)
        return [*summary_tables(self, frozenset({"layers"})), table]

    def layer_values(self) -> LayerValues:
        return {
            layer.name: {
                "rank": float(layer.rank),
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
