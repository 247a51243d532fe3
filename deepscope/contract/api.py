"""Request and response bodies of the HTTP API (pydantic v2): what clients rely on.

A job's ``params`` and ``result.metrics`` are typed by the analysis registry: the service
validates ``params`` against the analysis's params model, and its OpenAPI schema documents
every registered analysis's params and metrics as a union discriminated by ``analysis``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from deepscope.contract.result import Prediction, Result
from deepscope.contract.status import JobError, JobStatus, LayerInfo, ModelStatus
from deepscope.manifest import ModelFormat, TrainingInfo

__all__ = [
    "LABEL_KEY",
    "MAX_LABELS",
    "DatasetList",
    "DatasetOut",
    "HealthOut",
    "JobIn",
    "JobList",
    "JobOut",
    "Labels",
    "LinkOut",
    "ModelList",
    "ModelOut",
    "PredictOut",
    "ProblemFieldError",
    "ProblemInfoOut",
    "ProblemOut",
    "ReadyOut",
    "check_labels",
]

#: At most this many labels on a model or a job.
MAX_LABELS = 16
#: A label's key: a letter or digit, then up to 62 letters, digits and ``._/-``.
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_LABEL_VALUE_MAX = 256


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """``labels`` if they are valid (≤ 16; keys match :data:`LABEL_KEY`; values ≤ 256 printable
    characters); ValueError naming the first problem otherwise."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise ValueError(
                f"label key {key!r} must be 1-63 letters, digits or ._/- starting with a "
                "letter or digit"
            )
        if len(value) > _LABEL_VALUE_MAX or not value.isprintable():
            raise ValueError(
                f"label {key!r}: the value must be at most {_LABEL_VALUE_MAX} printable characters"
            )
    return labels


#: Labels on a model or a job (git SHA, branch, run id): lists filter by them.
Labels = Annotated[
    dict[str, str],
    AfterValidator(check_labels),
    Field(
        description=f"at most {MAX_LABELS}; key: [A-Za-z0-9][A-Za-z0-9._/-]{{0,62}}, value: at "
        f"most {_LABEL_VALUE_MAX} printable characters",
        examples=[{"git_sha": "3f2a9c1", "branch": "main"}],
    ),
]


class ProblemFieldError(BaseModel):
    """One invalid field of a 422 ``invalid_params``."""

    loc: list[str | int] = Field(description="where: body, query, path, then the field names")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. missing, greater_than_equal")


class ProblemOut(BaseModel):
    """Every error (``application/problem+json``, RFC 9457): ``type`` says which kind, stably;
    ``detail`` is one readable line."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="/v1/problems/<slug>; GET it for a description",
        examples=["/v1/problems/model_not_ready"],
    )
    title: str = Field(examples=["Model not ready"])
    status: int = Field(examples=[409])
    detail: str = Field(examples=["model 3f2a... is still validating; retry when it is ready"])
    instance: str = Field(description="the request's path", examples=["/v1/jobs"])
    errors: list[ProblemFieldError] | None = Field(
        default=None, description="invalid_params: every invalid field"
    )


class ProblemInfoOut(BaseModel):
    """What one problem type means (``GET /v1/problems/<slug>``)."""

    type: str = Field(examples=["/v1/problems/quota_exceeded"])
    slug: str = Field(examples=["quota_exceeded"])
    title: str
    status: list[int] = Field(description="the HTTP statuses it comes with")
    description: str


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
    labels: dict[str, str] = Field(default_factory=dict)


class ModelList(BaseModel):
    models: list[ModelOut]
    next_cursor: str | None = Field(
        default=None, description="pass as cursor for the next page; None on the last"
    )


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
    next_cursor: str | None = Field(
        default=None, description="pass as cursor for the next page; None on the last"
    )


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
    labels: Labels = Field(default_factory=dict)
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="http(s) URL to POST the final job to when it ends (signed with the "
        "tenant's key: Deepscope-Signature); its host must be in the deployment's "
        "DEEPSCOPE_CALLBACK_HOSTS",
        examples=["https://ci.example.com/hooks/deepscope"],
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
    labels: dict[str, str] = Field(default_factory=dict)
    callback_url: str | None = Field(
        default=None, description="where the final job is POSTed when it ends"
    )


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(
        default=None, description="pass as cursor for the next page; None on the last"
    )


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
