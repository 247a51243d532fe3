"""Params pieces that several analyses share. Ranges are checked here; names that depend on the
model (layer names) are checked where the model is, in the worker."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationInfo, field_validator

from deepscope.analyses.registry import DEFAULT_MAX_STEPS, AnalysisParams

__all__ = ["MAX_IMAGE_INDEX", "FromImagesParams", "LayerParams", "OptimizingParams"]

#: The largest dataset index a job may name (the worker checks the dataset's own length).
MAX_IMAGE_INDEX = 100_000_000


class LayerParams(AnalysisParams):
    layers: list[str] | None = Field(
        default=None, description="weight layers to analyze, by module name; all when omitted"
    )


class OptimizingParams(AnalysisParams):
    """Parameters shared by the analyses that optimize an input."""

    steps: int = Field(default=200, ge=1, description="optimization steps (at most max_steps)")
    lr: float = Field(default=0.05, gt=0, le=10)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

    @field_validator("steps")
    @classmethod
    def _at_most_max_steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_steps", DEFAULT_MAX_STEPS)
        if value is not None and value > limit:
            raise ValueError(f"steps must be at most {limit} (this deployment's limit)")
        return value


class FromImagesParams(OptimizingParams):
    """Analyses that start from (or rebuild) dataset images at named layers."""

    images: list[Annotated[int, Field(ge=0, le=MAX_IMAGE_INDEX)]] = Field(
        default_factory=lambda: [0],
        min_length=1,
        max_length=16,
        description="indices of the dataset's images to start from / reconstruct",
    )
    layers: list[str] = Field(min_length=1, max_length=16, description="module names")
