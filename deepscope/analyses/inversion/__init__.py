"""``inversion``: rebuild images from their representation at each named layer (Mahendran &
Vedaldi 2015): what a layer's representation still knows about its input."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from deepscope.analyses.optimized import OptimizedImagesMetrics
from deepscope.analyses.params import FromImagesParams
from deepscope.analyses.registry import AnalysisSpec, Resource, register_analysis

__all__ = ["InversionMetrics", "InversionParams"]


class InversionParams(FromImagesParams):
    """``inversion``: reconstruct images from their representation at each named layer."""

    analysis: Literal["inversion"] = "inversion"
    steps: int = Field(default=400, ge=1)
    param: Literal["fft", "pixel"] = "pixel"
    alpha: float = Field(default=6.0, ge=1, le=20, description="α-norm exponent (M&V: 6)")
    alpha_weight: float = Field(default=1e-3, ge=0, le=1e6)
    beta: float = Field(default=2.0, ge=1, le=4, description="TV exponent (M&V: 2)")
    tv_weight: float = Field(default=5e-3, ge=0, le=1e6)


class InversionMetrics(OptimizedImagesMetrics):
    images: list[int] = Field(description="the dataset indices of the source images")


SPEC = register_analysis(
    AnalysisSpec(
        name="inversion",
        summary="images rebuilt from their representation at each named layer",
        params=InversionParams,
        metrics=InversionMetrics,
        compute="deepscope.analyses.inversion.compute:run",
        resource=Resource.GPU,
        generates_images=True,
    )
)
