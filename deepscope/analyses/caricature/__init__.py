"""``caricature``: DeepDream from dataset images on named layers, with octaves: what each layer
amplifies in an image (Olah et al. 2017)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from deepscope.analyses.optimized import OptimizedImagesMetrics
from deepscope.analyses.params import FromImagesParams
from deepscope.analyses.registry import AnalysisSpec, Resource, register_analysis

__all__ = ["CaricatureMetrics", "CaricatureParams"]


class CaricatureParams(FromImagesParams):
    """``caricature``: DeepDream on named layers, starting from dataset images."""

    analysis: Literal["caricature"] = "caricature"
    steps: int = Field(default=64, ge=1, description="steps per octave")
    lr: float = Field(default=0.002, gt=0, le=10)
    octaves: int = Field(default=3, ge=1, le=8)
    octave_scale: float = Field(default=1.4, ge=1.0, le=3.0)
    tv_weight: float = Field(default=0.05, ge=0, le=1e6)


class CaricatureMetrics(OptimizedImagesMetrics):
    images: list[int] = Field(description="the dataset indices of the source images")


SPEC = register_analysis(
    AnalysisSpec(
        name="caricature",
        summary="DeepDream from dataset images: what each named layer amplifies",
        params=CaricatureParams,
        metrics=CaricatureMetrics,
        compute="deepscope.analyses.caricature.compute:run",
        resource=Resource.GPU,
        generates_images=True,
    )
)
