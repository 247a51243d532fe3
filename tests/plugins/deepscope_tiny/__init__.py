"""A small analysis registered from outside deepscope (``DEEPSCOPE_ANALYSIS_PLUGINS=
deepscope_tiny``): the Frobenius norm of every weight layer. The registry test shows that it
reaches the CLI, the OpenAPI schema, the workers, the report and ``check``'s gates without any
change to deepscope itself."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from deepscope.analyses import AnalysisParams, AnalysisSpec, register_analysis
from deepscope.contract import Metrics, Table


class WeightNormsParams(AnalysisParams):
    analysis: Literal["weight_norms"] = "weight_norms"
    scale: float = Field(default=1.0, gt=0, le=100, description="multiplies every norm")
    hold_s: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description="seconds the job waits before it computes (a job of a known length, for "
        "the tests that stop workers in the middle of one)",
    )


class LayerNorm(BaseModel):
    name: str
    frobenius_norm: float


class WeightNormsMetrics(Metrics):
    layers: list[LayerNorm]

    def tables(self) -> list[Table]:
        rows = [[layer.name, f"{layer.frobenius_norm:.4g}"] for layer in self.layers]
        return [Table("Weight norms (a plugin's table)", ["layer", "‖W‖_F"], rows)]


SPEC = register_analysis(
    AnalysisSpec(
        name="weight_norms",
        summary="the Frobenius norm of every weight layer (a plugin)",
        params=WeightNormsParams,
        metrics=WeightNormsMetrics,
        compute="deepscope_tiny.compute:run",
        layer_metrics=("frobenius_norm",),
    )
)
