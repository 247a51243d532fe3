"""Request and response bodies of the HTTP API (pydantic v2): what clients rely on.

A job's ``params`` and ``result.metrics`` are typed by the analysis registry: the service
validates ``params`` against the analysis's params model, and its OpenAPI schema documents
every registered analysis's params and metrics as a union discriminated by ``analysis``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deepscope.contract.result import Prediction, Result
from deepscope.contract.status import JobError, JobStatus, LayerInfo, ModelStatus
from deepscope.manifest import ModelFormat, TrainingInfo

__all__ = [
    "DatasetList",
    "DatasetOut",
    "ErrorOut",
    "HealthOut",
    "JobIn",
    "JobList",
    "JobOut",
    "LinkOut",
    "ModelList",
    "ModelOut",
    "PredictOut",
    "ReadyOut",
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
    """A job to submit. The service's OpenAPI schema replaces this with one variant per
    registered analysis (``params`` typed by ``analysis``)."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    analysis: str = Field(examples=["signal_space"])
    params: dict[str, Any] = Field(default_factory=dict)
    dataset: str | None = Field(
        default=None,
        description="digits, fashion-mnist or a dataset id; default: the dataset the model's "
        "manifest says it was trained on, when that is a built-in",
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
    result: Result | None = None
    error: JobError | None = None


class JobList(BaseModel):
    jobs: list[JobOut]


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
