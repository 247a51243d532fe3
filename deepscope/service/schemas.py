"""Request and response bodies of the HTTP API (pydantic v2); what clients rely on.

The analysis parameters are validated by :func:`deepscope.params.parse_params` (a discriminated
union on ``analysis``), so a job's ``params`` is a plain object here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deepscope.manifest import ModelFormat, TrainingInfo
from deepscope.store.records import (
    DatasetRecord,
    JobError,
    JobRecord,
    JobStatus,
    LayerInfo,
    ModelRecord,
    ModelStatus,
)

__all__ = [
    "ArtifactOut",
    "DatasetList",
    "DatasetOut",
    "ErrorOut",
    "GeneratedPrediction",
    "GeneratedPredictions",
    "HealthOut",
    "JobIn",
    "JobList",
    "JobOut",
    "JobResultOut",
    "LinkOut",
    "ModelList",
    "ModelOut",
    "PredictOut",
    "Prediction",
    "ReadyOut",
    "TopK",
    "dataset_out",
    "job_out",
    "model_out",
]


class ErrorOut(BaseModel):
    """Every error: one readable line."""

    detail: str = Field(examples=["model 3f2a... not found"])


class ModelOut(BaseModel):
    id: str
    name: str
    format: ModelFormat
    arch: str | None
    sha256: str = Field(description="sha256 of the uploaded file")
    size_bytes: int
    status: ModelStatus
    error: str | None = Field(description="why the model is invalid")
    input_shape: list[int] | None = Field(description="[C, H, W]")
    num_parameters: int | None
    num_classes: int | None
    class_names: list[str] | None
    layers: list[LayerInfo] = Field(description="Linear and Conv2d layers, in order")
    created_at: datetime
    validated_at: datetime | None
    demo: bool = False
    training: TrainingInfo | None = Field(
        default=None, description="how the weights were trained, from the manifest"
    )


class ModelList(BaseModel):
    models: list[ModelOut]


class DatasetOut(BaseModel):
    id: str = Field(description="the id to pass as a job's dataset (a built-in's name)")
    name: str
    builtin: bool
    num_samples: int
    input_shape: list[int] = Field(description="[C, H, W]")
    num_classes: int
    class_names: list[str] | None = None
    sha256: str | None = None
    created_at: datetime | None = None


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str
    analysis: str = Field(examples=["signal_space"])
    params: dict[str, Any] = Field(default_factory=dict)
    dataset: str | None = Field(
        default=None,
        description="digits, fashion-mnist or a dataset id; default: the dataset the model's "
        "manifest says it was trained on, when that is a built-in",
    )


class ArtifactOut(BaseModel):
    name: str
    url: str = Field(description="GET it with the same API key")
    media_type: str
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


class JobResultOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    metrics: dict[str, Any]
    artifacts: list[ArtifactOut]
    warnings: list[str] = Field(default_factory=list)
    predictions: GeneratedPredictions | None = Field(
        default=None,
        description="analyses that generate images: the model's prediction for each of them",
    )


class JobOut(BaseModel):
    id: str
    status: JobStatus
    progress: float = Field(ge=0.0, le=1.0)
    message: str | None = Field(default=None, description="what the job is doing now")
    analysis: str
    params: dict[str, Any]
    model_id: str
    dataset: str | None
    queue: str | None
    cached: bool = Field(description="answered from the result cache, without computation")
    attempts: int = Field(
        default=0, ge=0, description="runs started again because a worker died under the last"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: JobResultOut | None = None
    error: JobError | None = None


class JobList(BaseModel):
    jobs: list[JobOut]


class Prediction(BaseModel):
    top_k: list[TopK]
    logits: list[float]


class PredictOut(BaseModel):
    job_id: str
    predictions: list[Prediction]


class LinkOut(BaseModel):
    url: str = Field(description="path and query of a signed, read-only link for a browser")
    expires_at: datetime


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str = Field(description="ready or unavailable")
    redis: bool
    workers: dict[str, int] = Field(description="live workers per queue")
    queued: dict[str, int] = Field(description="jobs waiting per queue")
    detail: str | None = None


def model_out(rec: ModelRecord) -> ModelOut:
    return ModelOut(
        id=rec.id,
        name=rec.name,
        format=rec.format,
        arch=rec.manifest.arch,
        sha256=rec.sha256,
        size_bytes=rec.size_bytes,
        status=rec.status,
        error=rec.error,
        input_shape=rec.input_shape,
        num_parameters=rec.num_parameters,
        num_classes=rec.num_classes,
        class_names=rec.manifest.class_names,
        layers=rec.layers,
        created_at=rec.created_at,
        validated_at=rec.validated_at,
        demo=rec.demo,
        training=rec.manifest.training,
    )


def dataset_out(rec: DatasetRecord) -> DatasetOut:
    return DatasetOut(
        id=rec.id,
        name=rec.name,
        builtin=False,
        num_samples=rec.num_samples,
        input_shape=rec.input_shape,
        num_classes=rec.num_classes,
        class_names=rec.class_names,
        sha256=rec.sha256,
        created_at=rec.created_at,
    )


def job_out(
    rec: JobRecord, result: dict[str, Any] | None = None, meta: dict[str, Any] | None = None
) -> JobOut:
    """The API view of a job; artifact paths become ``/v1/artifacts/{job}/{path}`` URLs."""
    progress, message = rec.progress, rec.message
    if rec.status is JobStatus.SUCCEEDED:
        progress = 1.0
    elif rec.status is JobStatus.RUNNING and meta:
        progress = float(meta.get("progress", progress))
        message = meta.get("message", message)
    result_out = None
    if result is not None:
        artifacts = [
            ArtifactOut(
                name=str(a["name"]),
                url=f"/v1/artifacts/{rec.id}/{a['url']}",
                media_type=str(a.get("media_type", "application/octet-stream")),
                description=str(a.get("description", "")),
            )
            for a in result.get("artifacts", [])
        ]
        extra = {
            k: v
            for k, v in result.items()
            if k not in ("metrics", "artifacts", "warnings", "analysis", "params")
        }
        if isinstance(extra.get("predictions"), dict):
            predictions = dict(extra["predictions"])
            predictions["images"] = [
                {**p, "artifact": f"/v1/artifacts/{rec.id}/{p['artifact']}"}
                for p in predictions.get("images", [])
            ]
            extra["predictions"] = predictions
        result_out = JobResultOut(
            metrics=result.get("metrics", {}),
            artifacts=artifacts,
            warnings=list(result.get("warnings", [])),
            **extra,
        )
    return JobOut(
        id=rec.id,
        status=rec.status,
        progress=min(max(progress, 0.0), 1.0),
        message=message,
        analysis=rec.analysis,
        params=rec.params,
        model_id=rec.model_id,
        dataset=rec.dataset,
        queue=rec.queue,
        cached=rec.cached,
        attempts=rec.attempts,
        created_at=rec.created_at,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        result=result_out,
        error=rec.error,
    )
