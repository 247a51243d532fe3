"""``activation_maximization``: an image per class logit, or per channel of a layer, that the
network responds to most (Olah et al. 2017), all targets in one batched optimization."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from deepscope.analyses.optimized import OptimizedImagesMetrics
from deepscope.analyses.params import OptimizingParams
from deepscope.analyses.registry import AnalysisSpec, Resource, register_analysis

__all__ = ["MAX_TARGET", "ActivationMaximizationMetrics", "ActivationMaximizationParams"]

#: The largest class or channel index a target may name (the worker checks the model's own).
MAX_TARGET = 1_000_000


class ActivationMaximizationParams(OptimizingParams):
    """``activation_maximization``: an image per class logit (or per channel of a layer)."""

    analysis: Literal["activation_maximization"] = "activation_maximization"
    steps: int = Field(default=512, ge=1, description="Adam steps (Lucent's default 512)")
    targets: list[Annotated[int, Field(ge=0, le=MAX_TARGET)]] | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="classes or channels; all if omitted",
    )
    layer: str | None = Field(
        default=None, description="maximize channels of this module; the logits when omitted"
    )
    param: Literal["fft", "pixel"] = "fft"
    decorrelate: bool = True
    alpha_weight: float = Field(
        default=4.0, ge=0, le=1e6, description="α-norm prior weight (α = 2)"
    )
    tv_weight: float = Field(
        default=0.02, ge=0, le=1e6, description="total variation weight (β = 2)"
    )
    batchnorm_weight: float | None = Field(
        default=None, ge=0, le=1e6, description="DeepInversion BN prior; auto when the model has BN"
    )


class ActivationMaximizationMetrics(OptimizedImagesMetrics):
    layer: str | None = Field(description="the layer whose channels were maximized; null: logits")


SPEC = register_analysis(
    AnalysisSpec(
        name="activation_maximization",
        summary="an image per class logit (or channel) that maximizes it",
        params=ActivationMaximizationParams,
        metrics=ActivationMaximizationMetrics,
        compute="deepscope.analyses.activation_maximization.compute:run",
        resource=Resource.GPU,
        generates_images=True,
    )
)
