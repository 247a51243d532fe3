"""Records → the HTTP bodies of :mod:`deepscope.contract` (the API's view of them).

The bodies themselves live in the contract, which the SDK shares; this module holds what only
the service needs: the conversion from the records it keeps in Redis.
"""

from __future__ import annotations

from typing import Any

from deepscope.contract.api import DatasetOut, JobOut, ModelOut
from deepscope.contract.result import Result
from deepscope.contract.status import JobStatus
from deepscope.store.records import DatasetRecord, JobRecord, ModelRecord

__all__ = ["dataset_out", "job_out", "model_out"]


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
        labels=rec.labels,
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
        result_out = Result.model_validate(result).with_artifact_prefix(f"/v1/artifacts/{rec.id}/")
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
        labels=rec.labels,
        callback_url=rec.callback_url,
    )
