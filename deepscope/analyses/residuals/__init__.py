"""``residuals``: what each layer keeps of its input (the projection onto its row space) and
what it loses (the residual in its null space), for class averages or samples."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deepscope.analyses.params import LayerParams
from deepscope.analyses.registry import AnalysisSpec, register_analysis
from deepscope.contract.result import LayerValues, Metrics, summary_tables
from deepscope.contract.tables import Table, fmt

__all__ = ["ClassResidual", "LayerResiduals", "ResidualsMetrics", "ResidualsParams"]


class ResidualsParams(LayerParams):
    """``residuals``: what each layer keeps (row space) and loses (null space)."""

    analysis: Literal["residuals"] = "residuals"
    inputs: Literal["class_averages", "samples"] = Field(
        default="class_averages",
        description="class averages of the dataset, or the first samples of each class",
    )
    samples_per_class: int = Field(default=1, ge=1, le=64)
    rtol: float = Field(
        default=1e-5,
        gt=0,
        le=0.1,
        description="conv layers solved by CG stop when projection_error_bound (an upper "
        "bound on ‖p̂ − Px‖/‖x‖) is at most rtol; also the CGLS fallback's tolerance",
    )
    max_iter: int = Field(default=500, ge=1, le=10_000)


class ClassResidual(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    class_: str = Field(alias="class", serialization_alias="class")
    input_norm: float
    residual_norm: float
    lost_fraction: float = Field(description="‖x − P_row(W)x‖² / ‖x‖²")
    projection_error_bound: float | None = Field(
        default=None,
        description="certified upper bound on ‖p̂ − P_row(W)x‖ / ‖x‖ of the computed projection "
        "p̂ (0 where it is exact; null where nothing is certified: the CGLS fallback)",
    )
    projection_relative_error: float | None = Field(
        default=None,
        description="‖WᵀW(p̂ − x)‖ / ‖WᵀWx‖, the normal equations' residual (not an error of "
        "the projection: an ill-conditioned layer can have a small one and a large error)",
    )


class LayerResiduals(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    input_shape: list[int]
    iterations: int | None = None
    method: str | None = Field(
        default=None,
        description="how the projection was found: exact (Linear), injective, surjective "
        "(exact or CG), zero map, or rank-deficient (CGLS)",
    )
    sigma_min: float | None = Field(
        default=None, description="the smallest singular value of a conv layer's map, if found"
    )
    classes: list[ClassResidual]


class ResidualsMetrics(Metrics):
    inputs: str
    layers: list[LayerResiduals]

    def tables(self) -> list[Table]:
        summary = []
        for layer in self.layers:
            lost = [c.lost_fraction for c in layer.classes]
            worst = max(layer.classes, key=lambda c: c.lost_fraction, default=None)
            summary.append(
                [
                    layer.name,
                    layer.kind,
                    fmt(layer.input_shape),
                    fmt(sum(lost) / len(lost) if lost else None),
                    fmt(max(lost) if lost else None),
                    fmt(worst.class_ if worst else None),
                ]
            )
        tables = [
            Table(
                "Residuals: share of each layer's input it cannot see (null space)",
                [
                    "layer",
                    "kind",
                    "input",
                    "mean lost fraction",
                    "max lost fraction",
                    "worst class",
                ],
                summary,
                "lost fraction ‖x − P_row(W)x‖² / ‖x‖²",
            )
        ]
        for layer in self.layers:
            extra = [
                k
                for k in (layer.classes[0].model_extra or {} if layer.classes else {})
                if k != "row_residual_norms"
            ]
            rows = [
                [
                    c.class_,
                    fmt(c.input_norm),
                    fmt(c.residual_norm),
                    fmt(c.lost_fraction),
                    fmt(c.projection_error_bound),
                    *[fmt((c.model_extra or {}).get(k)) for k in extra],
                ]
                for c in layer.classes
            ]
            columns = ["class", "input norm", "residual norm", "lost fraction", "error bound"]
            tables.append(
                Table(
                    f"{layer.name}: per class",
                    columns + [k.replace("_", " ") for k in extra],
                    rows,
                )
            )
        return [*summary_tables(self, frozenset({"layers"})), *tables]

    def layer_values(self) -> LayerValues:
        out: LayerValues = {}
        for layer in self.layers:
            lost = [c.lost_fraction for c in layer.classes]
            if not lost:
                continue
            out[layer.name] = {
                "lost_fraction_max": max(lost),
                "lost_fraction_mean": sum(lost) / len(lost),
            }
        return out


SPEC = register_analysis(
    AnalysisSpec(
        name="residuals",
        summary="what each layer keeps (row space) and loses (null space) of class inputs",
        params=ResidualsParams,
        metrics=ResidualsMetrics,
        compute="deepscope.analyses.residuals.compute:run",
        layer_metrics=("lost_fraction_max", "lost_fraction_mean"),
    )
)
