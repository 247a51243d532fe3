"""``/v1/jobs``: submit an analysis (or get it from the result cache), poll, list, cancel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from deepscope.analyses.registry import DEFAULT_MAX_STEPS, AnalysisParams, parse_params
from deepscope.catalog import BUILTIN_DATASETS
from deepscope.contract import JobIn, JobList, JobOut, JobStatus
from deepscope.contract.errors import ProblemType, describe_errors
from deepscope.service.deps import (
    ServiceState,
    State,
    Tenant,
    errors,
    field_errors,
    get_state,
    not_found,
    problem,
)
from deepscope.service.idempotency import (
    REPLAYED_HEADER,
    IdempotencyKey,
    Replay,
    request_hash,
    run_once,
)
from deepscope.service.listing import (
    Cursor,
    LabelFilter,
    Limit,
    check_cursor,
    label_filters,
    labels_match,
)
from deepscope.service.routes.models import require_ready
from deepscope.service.schemas import job_out
from deepscope.service.typed import job_models
from deepscope.service.waiting import MAX_WAIT_S, preferred_wait
from deepscope.service.webhooks import allowed_callback
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
        raise problem(
            422,
            ProblemType.INVALID_PARAMS,
            f"unknown dataset {dataset!r}: use {', '.join(BUILTIN_DATASETS)} or the id of a "
            "dataset uploaded with POST /v1/datasets",
        )
    if model.input_shape and shape != model.input_shape:
        raise problem(
            422,
            ProblemType.INVALID_PARAMS,
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

    async def submit_job(
        body: JobIn,
        request: Request,
        tenant: Tenant,
        idempotency_key: IdempotencyKey = None,
        prefer: Annotated[
            str | None,
            Header(
                description="`wait=S` (RFC 7240): answer when the job ends or after S seconds "
                f"(at most {MAX_WAIT_S:g}), whichever is first: submit and wait in one "
                "request. The answer says `Preference-Applied: wait=S`; its status is the "
                "job's then"
            ),
        ] = None,
    ) -> Response:
        # The Redis work in one thread-pool hop; the response is serialized on the event loop
        # (a plain-function route would cost a second hop for that). The JobOut is ours, so
        # it is written as JSON at once rather than validated again against the response
        # model (which documents it): the submission path is the API's hottest. For the same
        # reason the state comes from the request, not from the State dependency (each
        # dependency is one more for FastAPI to solve per request).
        state = get_state(request)
        headers: dict[str, str] = {}
        if idempotency_key is None:
            out = await run_in_threadpool(_submit, body, tenant, state)
        else:
            out, replayed = await run_in_threadpool(
                _submit_once, body, tenant, state, idempotency_key
            )
            if replayed:
                headers[REPLAYED_HEADER] = "true"
        wait = preferred_wait(prefer)
        if wait > 0:
            # Held here rather than answered and polled: the client learns of the end within
            # a Redis round trip, with one request in all (a cached job answers at once).
            read = _reader(out.id, tenant, state)
            out = await state.job_waiter().wait(out.id, wait, read, out)
            headers["Preference-Applied"] = f"wait={wait:g}"
        headers["Location"] = f"/v1/jobs/{out.id}"
        return Response(
            out.model_dump_json(by_alias=True),
            status_code=202,
            media_type="application/json",
            headers=headers,
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

    @router.get(
        "",
        response_model=JobList,
        summary="The tenant's jobs, newest first, a page at a time (filters before the limit)",
        responses=errors(422),
    )
    def list_jobs(
        tenant: Tenant,
        state: State,
        status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
        analysis: Annotated[str | None, Query(description="only jobs of this analysis")] = None,
        model_id: Annotated[str | None, Query(description="only jobs of this model")] = None,
        label: LabelFilter = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> JobList:
        check_cursor(cursor)
        wanted = label_filters(label)
        metas: dict[str, dict[str, Any]] = {}

        def keep(rec: JobRecord) -> JobRecord | None:
            # The record's fixed fields first: only a job they keep has its live status read.
            if analysis is not None and rec.analysis != analysis:
                return None
            if model_id is not None and rec.model_id != model_id:
                return None
            if not labels_match(rec.labels, wanted):
                return None
            rec, metas[rec.id] = state.backend.refresh_job(rec)
            return rec if status is None or rec.status is status else None

        recs, next_cursor = state.backend.records.page_jobs(tenant, limit, cursor, keep)
        # Listings leave results out; GET /v1/jobs/{id} has them.
        jobs = [job_out(rec, None, metas.get(rec.id)) for rec in recs]
        return JobList(jobs=jobs, next_cursor=next_cursor)

    @router.get("/{job_id}", response_model=models.job_out, responses=errors(404))
    async def get_job(
        job_id: str,
        tenant: Tenant,
        state: State,
        wait: Annotated[
            float,
            Query(
                ge=0,
                le=MAX_WAIT_S,
                description="answer as soon as the job ends, or after this many seconds "
                "(long polling; 0: at once)",
            ),
        ] = 0.0,
    ) -> JobOut:
        read = _reader(job_id, tenant, state)
        if wait <= 0:
            return await read()
        return await state.job_waiter().wait(job_id, wait, read)

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
            raise problem(409, ProblemType.JOB_FINISHED, str(exc)) from None
        return job_out(rec)

    return router


def _submit_once(body: JobIn, tenant: str, state: ServiceState, key: str) -> tuple[JobOut, bool]:
    """:func:`_submit` under an Idempotency-Key. → (the job, whether it is a replay)."""

    def replay(first: Replay) -> JobOut | None:
        rec = state.backend.records.get_job(first.obj_id, tenant)
        return None if rec is None else _view(state, rec)

    out, replayed = run_once(
        state,
        tenant,
        "jobs",
        key,
        request_hash(body.model_dump(mode="json")),
        create=lambda: _submit(body, tenant, state),
        made=lambda job: (job.id, 202),
        replay=replay,
    )
    return out, replayed is not None


def _submit(body: JobIn, tenant: str, state: ServiceState) -> JobOut:
    callback_url = allowed_callback(body.callback_url, state)
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
            raise problem(
                422,
                ProblemType.INVALID_PARAMS,
                "invalid params: " + describe_errors(exc.errors()),
                errors=field_errors(exc.errors(), prefix=("body", "params")),
            ) from None
    require_ready(model)
    dataset = resolve_dataset(state, tenant, model, body.dataset)
    submitted = state.backend.submit_analysis(
        tenant,
        model,
        body.analysis,
        params,
        dataset,
        labels=body.labels,
        callback_url=callback_url,
    )
    rec = submitted.record
    state.metrics.submitted(rec.analysis, rec.cached)
    return job_out(rec, submitted.result)


def _reader(job_id: str, tenant: str, state: ServiceState) -> Callable[[], Awaitable[JobOut]]:
    """Reads the tenant's job (:func:`_get`, off the event loop) each time it is awaited."""

    async def read() -> JobOut:
        return await run_in_threadpool(_get, job_id, tenant, state)

    return read


def _get(job_id: str, tenant: str, state: ServiceState) -> JobOut:
    rec = state.backend.records.get_job(job_id, tenant)
    if rec is None:
        raise not_found("job", job_id)
    return _view(state, rec)
