"""The result of an analysis: what a worker writes, the service stores and serves, and the SDK,
the CLI and the report read. One pydantic model, torch-free and redis-free.

``Result.metrics`` is the analysis's own metrics model (``SignalSpaceMetrics``, ...), chosen by
the analysis registry from ``analysis``; an analysis this process does not know keeps its
metrics as an open :class:`Metrics` (every field kept), so an older client reads a newer
server's results.
"""

from __future__ import annotations

import math
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from deepscope.contract.tables import Table, fmt, generic_table, is_scalar

__all__ = [
    "PREDICT_ANALYSIS",
    "Artifact",
    "GeneratedPrediction",
    "GeneratedPredictions",
    "LayerValues",
    "Metrics",
    "ModelInfo",
    "PredictMetrics",
    "Prediction",
    "Result",
    "TopK",
    "as_number",
    "is_number",
    "summary_tables",
]

#: The ``analysis`` of a prediction job (a job kind, not a registered analysis).
PREDICT_ANALYSIS = "predict"

#: ``{layer name: {metric name: value}}``: every per-layer number of a result, for gates and
#: comparisons. None is an unbounded value (an infinite condition number).
LayerValues = dict[str, dict[str, float | None]]


class Artifact(BaseModel):
    """A file a job wrote: a picture, an ``.npz`` of arrays, ``result.json``.

    ``url`` is relative to the job's output directory in a worker's result and in
    ``result.json``; the API serves it as ``/v1/artifacts/{job}/{url}``.
    """

    name: str
    url: str = Field(description="GET it with the same API key")
    media_type: str = "image/png"
    description: str = ""


class TopK(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class", serialization_alias="class")
    index: int
    probability: float


class GeneratedPrediction(BaseModel):
    """What the model says about one image an analysis generated."""

    artifact: str = Field(description="URL of the .npz artifact that holds the image")
    array: str = Field(description="the array in it (e.g. the inverse-image method)")
    index: int = Field(description="the image's index in that array")
    predicted_class: str
    predicted_index: int
    probability: float
    top_k: list[TopK]


class GeneratedPredictions(BaseModel):
    model_id: str
    url: str = Field(description="POST images here to ask the same model about any other")
    input: str = Field(description="what was predicted (the images as clipped)")
    images: list[GeneratedPrediction]


class ModelInfo(BaseModel):
    """The model a result is about."""

    model_config = ConfigDict(extra="allow")

    sha256: str | None = None
    format: str | None = None
    arch: str | None = None
    input_shape: list[int] | None = None
    num_parameters: int | None = None


def is_number(value: Any) -> bool:
    """A metric value that counts as a number: int, float, or None (unbounded)."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def as_number(value: float | None) -> float | None:
    """A number as a finite float, or None when unbounded (∞, NaN, null)."""
    if value is None or math.isinf(value) or math.isnan(value):
        return None
    return float(value)


class Metrics(BaseModel):
    """Base of every analysis's metrics. Open (extra fields kept) so that a result from a newer
    server, or from an analysis this process does not know, survives a round trip."""

    model_config = ConfigDict(extra="allow")

    def tables(self) -> list[Table]:
        """The metrics as tables for people: every list of records as a table, the remaining
        scalars as a summary. Analyses override this to lay theirs out for reading."""
        return _default_tables(self.model_dump(mode="json"))

    def layer_values(self) -> LayerValues:
        """Every per-layer number: by default the numeric fields of ``layers[]`` records
        (objects with a ``name``). Analyses with richer per-layer data override this."""
        out: LayerValues = {}
        for layer in self.model_dump(mode="json").get("layers") or []:
            if not isinstance(layer, dict) or "name" not in layer:
                continue
            out[str(layer["name"])] = {
                k: as_number(v) for k, v in layer.items() if k != "name" and is_number(v)
            }
        return out

    def recognized(self) -> dict[str, list[bool]]:
        """For analyses that generate an input per class: ``{group: [was image i classified
        as its class?]}`` (groups: e.g. inverse-image methods). Empty for the others."""
        return {}


_M = TypeVar("_M", bound=Metrics)


def _default_tables(metrics: dict[str, Any], handled: frozenset[str] = frozenset()) -> list[Table]:
    tables: list[Table] = []
    scalars: list[list[str]] = []
    for key, value in metrics.items():
        if key in handled:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append(generic_table(key.replace("_", " "), value))
        elif is_scalar(value) or (isinstance(value, list) and all(map(is_scalar, value))):
            shown = ", ".join(fmt(v) for v in value) if isinstance(value, list) else fmt(value)
            scalars.append([key.replace("_", " "), shown])
    if scalars:
        tables.insert(0, Table("Summary", ["metric", "value"], scalars))
    return tables


def summary_tables(metrics: Metrics, handled: frozenset[str]) -> list[Table]:
    """The default tables of ``metrics`` without the fields in ``handled`` (for analyses that
    lay those out themselves and leave the rest to the default)."""
    return _default_tables(metrics.model_dump(mode="json"), handled)


class Prediction(BaseModel):
    top_k: list[TopK]
    logits: list[float]


class PredictMetrics(Metrics):
    """The metrics of a prediction job (``analysis: predict``)."""

    predictions: list[Prediction]

    def tables(self) -> list[Table]:
        rows = []
        for i, pred in enumerate(self.predictions):
            best = pred.top_k[0] if pred.top_k else None
            rows.append(
                [
                    str(i),
                    fmt(best.class_ if best else None),
                    fmt(best.probability if best else None),
                    ", ".join(f"{t.class_} {t.probability:.1%}" for t in pred.top_k),
                ]
            )
        return [Table("Predictions", ["image", "class", "probability", "top classes"], rows)]


class Result(BaseModel):
    """One analysis's outcome: ``result.json``, a job's ``result``, ``deepscope analyze``'s
    output."""

    model_config = ConfigDict(extra="allow")

    analysis: str
    params: dict[str, Any] = Field(default_factory=dict)
    model: ModelInfo | None = None
    dataset: str | None = None
    deepscope_version: str | None = None
    metrics: SerializeAsAny[Metrics]
    artifacts: list[Artifact] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    duration_s: float | None = None
    predictions: GeneratedPredictions | None = Field(
        default=None,
        description="analyses that generate images: the model's prediction for each of them",
    )

    @model_validator(mode="before")
    @classmethod
    def _typed_metrics(cls, data: Any) -> Any:
        # The analysis names its metrics model; the registry knows them all.
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            from deepscope.analyses.registry import metrics_model

            analysis = str(data.get("analysis", ""))
            model = PredictMetrics if analysis == PREDICT_ANALYSIS else metrics_model(analysis)
            data = {**data, "metrics": model.model_validate(data["metrics"])}
        return data

    def artifact(self, name: str) -> Artifact:
        """The artifact called ``name``; KeyError listing the names when there is none."""
        for a in self.artifacts:
            if a.name == name:
                return a
        names = ", ".join(a.name for a in self.artifacts)
        raise KeyError(f"no artifact {name!r}; artifacts: {names}")

    def metrics_as(self, model: type[_M]) -> _M:
        """The metrics as ``model`` (e.g. ``SignalSpaceMetrics``), for typed access."""
        if isinstance(self.metrics, model):
            return self.metrics
        return model.model_validate(self.metrics.model_dump())

    def with_artifact_prefix(self, prefix: str) -> Self:
        """A copy whose artifact (and prediction) URLs start with ``prefix`` (the API's
        ``/v1/artifacts/{job}/``)."""
        artifacts = [a.model_copy(update={"url": prefix + a.url}) for a in self.artifacts]
        predictions = self.predictions
        if predictions is not None:
            images = [
                p.model_copy(update={"artifact": prefix + p.artifact}) for p in predictions.images
            ]
            predictions = predictions.model_copy(update={"images": images})
        return self.model_copy(update={"artifacts": artifacts, "predictions": predictions})
