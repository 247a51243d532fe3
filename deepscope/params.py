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
    "ActivationMaximizationParams",
    "AnalysisKind",
    "AnalysisParams",
    "CaricatureParams",
    "InverseImagesParams",
    "InversionParams",
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
    INVERSE_IMAGES = "inverse_images"
    ACTIVATION_MAXIMIZATION = "activation_maximization"
    CARICATURE = "caricature"
    INVERSION = "inversion"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _LayerParams(_Params):
    layers: list[str] | None = Field(
        default=None, description="weight layers to analyze, by module name; all when omitted"
    )


class SignalSpaceParams(_LayerParams):
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


class ResidualsParams(_LayerParams):
    """``residuals``: what each layer keeps (row space) and loses (null space)."""

    analysis: Literal[AnalysisKind.RESIDUALS] = AnalysisKind.RESIDUALS
    inputs: Literal["class_averages", "samples"] = Field(
        default="class_averages",
        description="class averages of the dataset, or the first samples of each class",
    )
    samples_per_class: int = Field(default=1, ge=1, le=64)
    rtol: float = Field(default=1e-5, gt=0, le=0.1, description="CG tolerance for conv layers")
    max_iter: int = Field(default=500, ge=1, le=10_000)


class _Optimizing(_Params):
    """Parameters shared by the analyses that optimize an input."""

    steps: int = Field(default=200, ge=1, description="optimization steps (at most max_steps)")
    lr: float = Field(default=0.05, gt=0, le=10)
    seed: int = Field(default=0, ge=0)

    @field_validator("steps")
    @classmethod
    def _at_most_max_steps(cls, value: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_steps", DEFAULT_MAX_STEPS)
        if value > limit:
            raise ValueError(f"steps must be at most {limit} (this deployment's limit)")
        return value


InverseMethod = Literal[
    "avg", "min", "avg_min", "avg+training", "min+training", "avg_min+training", "pinv"
]


class InverseImagesParams(_Optimizing):
    """``inverse_images``: the paper's ideal input per class (inverse maps)."""

    analysis: Literal[AnalysisKind.INVERSE_IMAGES] = AnalysisKind.INVERSE_IMAGES
    methods: list[InverseMethod] | None = Field(
        default=None,
        min_length=1,
        description="starts avg / min / avg_min, each optionally '+training' (refined by "
        "optimizing MSE(model(x), target)), and pinv (exact inverse, invertible networks only); "
        "all that apply when omitted",
    )
    target_mode: Literal["minmax", "percentile"] = Field(
        default="minmax", description="target entries at each unit's min/max or 25th/75th pct."
    )
    lr: float = Field(default=0.01, gt=0, le=10)
    optimizer: Literal["adam", "sgd"] = "adam"
    fraction: float = Field(
        default=0.25, gt=0, le=1, description="avg_min: share of closest images averaged"
    )
    max_samples: int = Field(
        default=10_000, ge=10, le=1_000_000, description="training images scored (seeded subset)"
    )


class ActivationMaximizationParams(_Optimizing):
    """``activation_maximization``: an image per class logit (or per channel of a layer)."""

    analysis: Literal[AnalysisKind.ACTIVATION_MAXIMIZATION] = AnalysisKind.ACTIVATION_MAXIMIZATION
    steps: int = Field(default=512, ge=1, description="Adam steps (Lucent's default 512)")
    targets: list[Annotated[int, Field(ge=0)]] | None = Field(
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
    alpha_weight: float = Field(default=4.0, ge=0, description="α-norm prior weight (α = 2)")
    tv_weight: float = Field(default=0.02, ge=0, description="total variation weight (β = 2)")
    batchnorm_weight: float | None = Field(
        default=None, ge=0, description="DeepInversion BN prior; auto when the model has BN"
    )


class _FromImages(_Optimizing):
    images: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0],
        min_length=1,
        max_length=16,
        description="indices of the dataset's images to start from / reconstruct",
    )
    layers: list[str] = Field(min_length=1, max_length=16, description="module names")


class CaricatureParams(_FromImages):
    """``caricature``: DeepDream on named layers, starting from dataset images."""

    analysis: Literal[AnalysisKind.CARICATURE] = AnalysisKind.CARICATURE
    steps: int = Field(default=64, ge=1, description="steps per octave")
    lr: float = Field(default=0.002, gt=0, le=10)
    octaves: int = Field(default=3, ge=1, le=8)
    octave_scale: float = Field(default=1.4, ge=1.0, le=3.0)
    tv_weight: float = Field(default=0.05, ge=0)


class InversionParams(_FromImages):
    """``inversion``: reconstruct images from their representation at each named layer."""

    analysis: Literal[AnalysisKind.INVERSION] = AnalysisKind.INVERSION
    steps: int = Field(default=400, ge=1)
    param: Literal["fft", "pixel"] = "pixel"
    alpha: float = Field(default=6.0, ge=1, le=20, description="α-norm exponent (M&V: 6)")
    alpha_weight: float = Field(default=1e-3, ge=0)
    beta: float = Field(default=2.0, ge=1, le=4, description="TV exponent (M&V: 2)")
    tv_weight: float = Field(default=5e-3, ge=0)


_Union = (
    SignalSpaceParams
    | ResidualsParams
    | InverseImagesParams
    | ActivationMaximizationParams
    | CaricatureParams
    | InversionParams
)
AnalysisParams = Annotated[_Union, Field(discriminator="analysis")]
_adapter: TypeAdapter[_Union] = TypeAdapter(AnalysisParams)


def parse_params(
    analysis: str, params: dict[str, Any] | None = None, *, max_steps: int = DEFAULT_MAX_STEPS
) -> _Union:
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
