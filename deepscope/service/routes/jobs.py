"""``/v1/jobs``: submit an analysis (or get it from the result cache), poll, list, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from deepscope.params import AnalysisKind, parse_params
from deepscope.service.deps import (
    ServiceState,
    State,
    Tenant,
    describe_validation_error,
    errors,
    not_found,
)
from deepscope.service.routes.models import require_ready
from deepscope.service.schemas import JobIn, JobList, JobOut, job_out
from deepscope.store.backend import JobConflictError
from deepscope.store.records import BUILTIN_DATASETS, JobRecord, JobStatus, ModelRecord, is_id

__all__ = ["resolve_dataset", "router"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def resolve_dataset(
    state: ServiceState, tenant: str, model: ModelRecord, dataset: str | None
) -> str | None:
    """A built-in name or one of the tenant's dataset ids; None when the job has none.

    Without a dataset, the manifest's training dataset is used when it is a built-in (a path
    in a manifest is never opened: it names a file on someone else's machine).
    """
    if dataset is None:
        training = model.manifest.training
        if training is not None and training.dataset in BUILTIN_DATASETS:
            dataset = training.dataset
        else:
            return None
    if dataset in BUILTIN_DATASETS:
        shape = list(BUILTIN_DATASETS[dataset][1])
    elif is_id(dataset):
        rec = state.backend.records.get_dataset(dataset, tenant)
        if rec is None:
            raise not_found("dataset", dataset)
        shape = rec.input_shape
    else:
        raise HTTPException(
            422,
            f"unknown dataset {dataset!r}: use {', '.join(BUILTIN_DATASETS)} or the id of a "
            "dataset uploaded with POST /v1/datasets",
        )
    if model.input_shape and shape != model.input_shape:
        raise HTTPException(
            422,
            f"dataset {dataset!r} has {'×'.join(map(str, shape))} images but the model takes "
            f"{'×'.join(map(str, model.input_shape))}",
        )
    return dataset


def _view(state: ServiceState, rec: JobRecord) -> JobOut:
    rec, meta = state.backend.refresh_job(rec)
    return job_out(rec, state.backend.result_of(rec), meta)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Submit an analysis; a result already computed for the same inputs returns at once",
    responses=errors(404, 409, 422),
)
async def submit_job(body: JobIn, tenant: Tenant, state: State, response: Response) -> JobOut:
    # The Redis work in one thread-pool hop; the response is serialized on the event loop
    # (a plain-function route would cost a second hop for that).
    out = await run_in_threadpool(_submit, body, tenant, state)
    response.headers["Location"] = f"/v1/jobs/{out.id}"
    return out


def _submit(body: JobIn, tenant: str, state: ServiceState) -> JobOut:
    model = state.backend.records.get_model(body.model_id, tenant)
    if model is None:
        raise not_found("model", body.model_id)
    model = state.backend.refresh_model(model)
    try:
        params = parse_params(body.analysis, body.params, max_steps=state.settings.max_steps)
    except ValidationError as exc:
        raise HTTPException(
            422, "invalid params: " + describe_validation_error(exc, skip_tag=True)
        ) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    require_ready(model)
    dataset = resolve_dataset(state, tenant, model, body.dataset)
    rec = state.backend.submit_analysis(
        tenant, model, AnalysisKind(body.analysis).value, params, dataset
    )
    state.metrics.jobs_submitted.labels(rec.analysis, str(rec.cached).lower()).inc()
    return job_out(rec, state.backend.result_of(rec))


@router.get("", response_model=JobList, responses=errors(422))
def list_jobs(
    tenant: Tenant,
    state: State,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    out = []
    for rec in state.backend.records.list_jobs(tenant, limit):
        rec, meta = state.backend.refresh_job(rec)
        if status is None or rec.status is status:
            # Listings leave results out; GET /v1/jobs/{id} has them.
            out.append(job_out(rec, None, meta))
    return JobList(jobs=out)


@router.get("/{job_id}", response_model=JobOut, responses=errors(404))
async def get_job(job_id: str, tenant: Tenant, state: State) -> JobOut:
    return await run_in_threadpool(_get, job_id, tenant, state)


def _get(job_id: str, tenant: str, state: ServiceState) -> JobOut:
    rec = state.backend.records.get_job(job_id, tenant)
    if rec is None:
        raise not_found("job", job_id)
    return _view(state, rec)


@router.delete(
    "/{job_id}",
    response_model=JobOut,
    summary="Cancel a queued job or stop a running one",
    responses=errors(404, 409),
)
def cancel_job(job_id: str, tenant: Tenant, state: State) -> JobOut:
    rec = state.backend.records.get_job(job_id, tenant)
    if rec is None:
        raise not_found("job", job_id)
    rec, _ = state.backend.refresh_job(rec)
    try:
        rec = state.backend.cancel_job(rec)
    except JobConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    return job_out(rec)
