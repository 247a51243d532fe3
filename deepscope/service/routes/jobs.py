"""``/v1/jobs``: submit an analysis (or get it from the result cache), poll, list, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from deepscope.analyses.registry import DEFAULT_MAX_STEPS, AnalysisParams, parse_params
from deepscope.catalog import BUILTIN_DATASETS
from deepscope.contract import JobIn, JobList, JobOut, JobStatus
from deepscope.contract.errors import describe_errors
from deepscope.service.deps import ServiceState, State, Tenant, errors, not_found
from deepscope.service.routes.models import require_ready
from deepscope.service.schemas import job_out
from deepscope.service.typed import job_models
from deepscope.store.lifecycle import JobConflictError
from deepscope.store.records import JobRecord, ModelRecord, is_id

__all__ = ["build_router", "resolve_dataset"]


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
        shape = list(BUILTIN_DATASETS[dataset].input_shape)
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


def build_router() -> APIRouter:
    """The ``/v1/jobs`` routes, typed by the analyses registered now."""
    models = job_models()
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    async def submit_job(body: JobIn, tenant: Tenant, state: State) -> Response:
        # The Redis work in one thread-pool hop; the response is serialized on the event loop
        # (a plain-function route would cost a second hop for that). The JobOut is ours, so
        # it is written as JSON at once rather than validated again against the response
        # model (which documents it): the submission path is the API's hottest.
        out = await run_in_threadpool(_submit, body, tenant, state)
        return Response(
            out.model_dump_json(by_alias=True),
            status_code=202,
            media_type="application/json",
            headers={"Location": f"/v1/jobs/{out.id}"},
        )

    # The body's type exists only now (the registry's union), so it is set as an object, not
    # a name this module's globals could resolve.
    submit_job.__annotations__["body"] = Annotated[models.job_in, Body()]
    router.add_api_route(
        "",
        submit_job,
        methods=["POST"],
        status_code=202,
        response_model=models.job_out,
        summary="Submit an analysis; a result already computed for the same inputs returns at once",
        responses=errors(404, 409, 422, 429),
    )

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

    @router.get("/{job_id}", response_model=models.job_out, responses=errors(404))
    async def get_job(job_id: str, tenant: Tenant, state: State) -> JobOut:
        return await run_in_threadpool(_get, job_id, tenant, state)

    @router.delete(
        "/{job_id}",
        response_model=models.job_out,
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

    return router


def _submit(body: JobIn, tenant: str, state: ServiceState) -> JobOut:
    model = state.backend.model_for_job(body.model_id, tenant)
    if model is None:
        raise not_found("model", body.model_id)
    params = body.params
    assert isinstance(params, AnalysisParams)
    if state.settings.max_steps != DEFAULT_MAX_STEPS:
        # The body was validated against the default limits; this deployment has its own.
        try:
            params = parse_params(
                body.analysis,
                params.model_dump(exclude={"analysis"}),
                max_steps=state.settings.max_steps,
            )
        except ValidationError as exc:
            raise HTTPException(422, "invalid params: " + describe_errors(exc.errors())) from None
    require_ready(model)
    dataset = resolve_dataset(state, tenant, model, body.dataset)
    rec = state.backend.submit_analysis(tenant, model, body.analysis, params, dataset)
    state.metrics.jobs_submitted.labels(rec.analysis, str(rec.cached).lower()).inc()
    return job_out(rec, state.backend.result_of(rec))


def _get(job_id: str, tenant: str, state: ServiceState) -> JobOut:
    rec = state.backend.records.get_job(job_id, tenant)
    if rec is None:
        raise not_found("job", job_id)
    return _view(state, rec)
