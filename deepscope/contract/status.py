"""Statuses and errors of jobs and models: what every process and every client agrees on."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["JobError", "JobStatus", "LayerInfo", "ModelStatus"]


class ModelStatus(StrEnum):
    """An uploaded model: ``validating`` until a worker loaded it, then ``ready`` or
    ``invalid`` (with the reason)."""

    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"


class JobStatus(StrEnum):
    """A job: ``queued`` → ``running`` → one of the three terminal statuses."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class JobError(BaseModel):
    """Why a job failed: a stable ``type`` for scripts and one readable line for people."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(
        examples=["invalid_params", "worker_died", "timeout"],
        description="invalid_input, out_of_memory, timeout, worker_died, lost, worker_error, "
        "or the exception's class name",
    )
    message: str


class LayerInfo(BaseModel):
    """One Linear or Conv2d layer of a validated model."""

    model_config = ConfigDict(extra="ignore")

    name: str
    kind: str
    weight_shape: list[int]
