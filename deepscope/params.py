"""Analysis kinds and their parameters: one pydantic model per analysis, validated up front.

Torch-free so that the API (which never imports torch) and the CLI validate the same way. Ranges
are checked here; names that depend on the model (layer names) are checked by the worker, which
has the model. ``parse_params`` is the one entry point.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator

__all__ = [
    "DEFAULT_MAX_STEPS",
    "AnalysisKind",
    "AnalysisParams",
    "ResidualsParams",
    "SignalSpaceParams",
    "parse_params",
]

#: Upper bound on optimization steps unless the deployment sets another (DEEPSCOPE_MAX_STEPS).
DEFAULT_MAX_STEPS = 5000


class AnalysisKind(StrEnum):
    """The analyses of DESIGN.md."""

    SIGNAL_SPACE = "signal_space"
    RESIDUALS = "residuals"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[str] | None = Field(
        default=None, description="weight layers to analyze, by module name; all when omitted"
    )


class SignalSpaceParams(_Params):
    """``signal_space``: SVD of every Linear / Conv2d layer."""

    analysis: Literal[AnalysisKind.SIGNAL_SPACE] = AnalysisKind.SIGNAL_SPACE
    view: Literal["kernels", "filters", "operator"] = Field(
        default="kernels",
        description="Conv2d matrix: kernels (each 2-D kernel a row, the paper's), filters "
        "(each output filter a row) or operator (exact singular values of the convolution on "
        "the layer's input size, circular boundary)",
    )
    vectors: int = Field(
        default=16, ge=0, le=256, description="top singular directions rendered per layer"
    )
    images: bool = Field(default=True, description="render per-layer PNGs (spectrum, vectors)")


class ResidualsParams(_Params):
    """``residuals``: what each layer keeps (row space) and loses (null space)."""

    analysis: Literal[AnalysisKind.RESIDUALS] = AnalysisKind.RESIDUALS
    inputs: Literal["class_averages", "samples"] = Field(
        default="class_averages",
        description="class averages of the dataset, or the first samples of each class",
    )
    samples_per_class: int = Field(default=1, ge=1, le=64)
    rtol: float = Field(default=1e-5, gt=0, le=0.1, description="CG tolerance for conv layers")
    max_iter: int = Field(default=500, ge=1, le=10_000)


AnalysisParams = Annotated[
    SignalSpaceParams | ResidualsParams,
    Field(discriminator="analysis"),
]
_adapter: TypeAdapter[SignalSpaceParams | ResidualsParams] = TypeAdapter(AnalysisParams)


def _check_steps(value: int, info: ValidationInfo) -> int:
    limit = (info.context or {}).get("max_steps", DEFAULT_MAX_STEPS)
    if value > limit:
        raise ValueError(f"steps must be at most {limit} (this deployment's limit)")
    return value


def parse_params(
    analysis: str, params: dict[str, Any] | None = None, *, max_steps: int = DEFAULT_MAX_STEPS
) -> SignalSpaceParams | ResidualsParams:
    """Validate ``params`` for ``analysis``.

    Raises:
        ValueError: unknown analysis (lists the valid ones) or invalid parameters (pydantic's
            ValidationError, a ValueError, names each bad field).
    """
    valid = [kind.value for kind in AnalysisKind]
    if analysis not in valid:
        raise ValueError(f"unknown analysis {analysis!r}; valid analyses: {', '.join(valid)}")
    payload = {**(params or {}), "analysis": analysis}
    return _adapter.validate_python(payload, context={"max_steps": max_steps})


# Re-exported for the optimization analyses' ``steps`` fields.
steps_validator = field_validator("steps")(_check_steps)
