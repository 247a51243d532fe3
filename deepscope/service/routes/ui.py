"""The pages a browser opens: ``GET /v1/jobs/{id}/report`` (pictures, metrics as tables,
spectra) and ``GET /v1/ui`` (the tenant's models and jobs), reached with a signed read-only link.

``GET /v1/ui/link`` (bearer key) mints a link; ``GET /v1/ui`` without one shows a form that
takes the API key in a POST body and answers with a link valid for 12 hours. See
:mod:`deepscope.service.links` for why links and not keys in URLs.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from deepscope.service.deps import (
    Bearer,
    PageAccess,
    ServiceState,
    State,
    Tenant,
    errors,
    key_or_link,
    not_found,
)
from deepscope.service.links import MAX_TTL_S, SCOPE_UI, job_scope
from deepscope.service.report import (
    HTML_HEADERS,
    Figure,
    Table,
    downloads,
    figures,
    metric_tables,
    model_label,
    prediction_table,
    render_page,
)
from deepscope.service.schemas import JobOut, LinkOut, job_out, model_out

__all__ = ["router"]

router = APIRouter(tags=["ui"])

_LOGIN_TTL_S = 12 * 3600
_INDEX_JOBS = 200
_STATIC = Path(__file__).resolve().parent.parent / "static"
_HTML: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {}}, "description": "an HTML page"}
}
_LINK_QUERY = {
    "t": "signed link: tenant",
    "exp": "signed link: expiry (unix seconds)",
    "sig": "signed link: signature",
}


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=HTML_HEADERS)


def _duration(job: JobOut) -> str:
    if job.started_at is None or job.finished_at is None or job.cached:
        return "—"
    seconds = (job.finished_at - job.started_at).total_seconds()
    return f"{seconds:.2f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# --- links --------------------------------------------------------------------------------


@router.get(
    "/v1/ui/link",
    response_model=LinkOut,
    summary="A signed, read-only link for a browser: a job's report, or the index",
    responses=errors(404, 422),
)
def make_link(
    tenant: Tenant,
    state: State,
    job_id: Annotated[str | None, Query(description="a job: its report; none: the index")] = None,
    ttl: Annotated[int, Query(ge=60, le=MAX_TTL_S, description="seconds the link lives")] = 3600,
) -> LinkOut:
    if job_id is None:
        link = state.signer.sign_for(tenant, SCOPE_UI, ttl)
        path = "/v1/ui"
    else:
        if state.backend.records.get_job(job_id, tenant) is None:
            raise not_found("job", job_id)
        link = state.signer.sign_for(tenant, job_scope(job_id), ttl)
        path = f"/v1/jobs/{job_id}/report"
    return LinkOut(
        url=f"{path}?{link.query()}", expires_at=datetime.fromtimestamp(link.expires, UTC)
    )


# --- index --------------------------------------------------------------------------------


def _index(state: ServiceState, access: PageAccess) -> str:
    backend = state.backend
    models = [
        model_out(backend.refresh_model(m)) for m in backend.records.list_models(access.tenant)
    ]
    names = {m.id: m.name for m in models}
    rows, jobs = [], []
    for rec in backend.records.list_jobs(access.tenant, _INDEX_JOBS):
        rec, meta = backend.refresh_job(rec)
        job = job_out(rec, None, meta)
        jobs.append(job)
        link = state.signer.sign(access.tenant, job_scope(job.id), access.expires)
        rows.append(
            {
                "job": job,
                "model": names.get(job.model_id, f"{job.model_id[:8]} (deleted)"),
                "duration": _duration(job),
                "report_url": f"/v1/jobs/{job.id}/report?{link.query()}",
            }
        )
    index = state.signer.sign(access.tenant, SCOPE_UI, access.expires)
    unfinished = any(not job.status.terminal for job in jobs) or any(
        m.status.value == "validating" for m in models
    )
    return render_page(
        "index.html",
        tenant=access.tenant,
        models=models,
        jobs=rows,
        expires=datetime.fromtimestamp(access.expires, UTC),
        index_url=f"/v1/ui?{index.query()}",
        refresh=5 if unfinished else None,
    )


@router.get(
    "/v1/ui",
    response_class=HTMLResponse,
    summary="The tenant's models and jobs (HTML); without a link, a form that asks for the key",
    responses={**_HTML, **errors()},
)
async def index(
    request: Request,
    credentials: Bearer,
    state: State,
    t: Annotated[str | None, Query(description=_LINK_QUERY["t"])] = None,
    exp: Annotated[str | None, Query(description=_LINK_QUERY["exp"])] = None,
    sig: Annotated[str | None, Query(description=_LINK_QUERY["sig"])] = None,
) -> HTMLResponse:
    if credentials is None and not (t or exp or sig):
        return _html(render_page("login.html", message=None, ttl_hours=_LOGIN_TTL_S // 3600))
    try:
        access = key_or_link(request, credentials, (SCOPE_UI,))
    except HTTPException as exc:
        message = str(exc.detail)
        page = render_page("login.html", message=message, ttl_hours=_LOGIN_TTL_S // 3600)
        return _html(page, status=401)
    return _html(await run_in_threadpool(_index, state, access))


# The browser's sign-in form (Post/Redirect/Get), not part of the JSON API's schema.
@router.post("/v1/ui/login", response_class=HTMLResponse, include_in_schema=False)
def login(key: Annotated[str, Form()], state: State) -> Response:
    # Constant-time over every configured key, as the bearer check does.
    given = key.strip().encode()
    tenant = None
    for known, owner in state.keys.items():
        if secrets.compare_digest(given, known.encode()):
            tenant = owner
    if tenant is None:
        page = render_page("login.html", message="invalid API key", ttl_hours=_LOGIN_TTL_S // 3600)
        return _html(page, status=401)
    link = state.signer.sign_for(tenant, SCOPE_UI, _LOGIN_TTL_S)
    return RedirectResponse(f"/v1/ui?{link.query()}", status_code=303, headers=HTML_HEADERS)


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/v1/ui", status_code=307)


@router.get("/v1/ui/static/ui.js", include_in_schema=False)
def script() -> Response:
    body = (_STATIC / "ui.js").read_bytes()
    return Response(
        body,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )


# --- report -------------------------------------------------------------------------------


def _report(state: ServiceState, access: PageAccess, job_id: str, base_url: str) -> str:
    backend = state.backend
    rec = backend.records.get_job(job_id, access.tenant)
    if rec is None:
        raise not_found("job", job_id)
    rec, meta = backend.refresh_job(rec)
    job = job_out(rec, backend.result_of(rec), meta)
    model_rec = backend.records.get_model(job.model_id, access.tenant)
    model = model_out(model_rec) if model_rec is not None else None
    link = state.signer.sign(access.tenant, job_scope(job.id), access.expires)
    spectra: list[Figure] = []
    pictures: list[Figure] = []
    files: list[Figure] = []
    tables: list[Table] = []
    predictions = None
    if job.result is not None:
        spectra, pictures = figures(job.result.artifacts, link.query())
        files = downloads(job.result.artifacts, link.query())
        tables = metric_tables(job.analysis, job.result.metrics)
        predictions = prediction_table(job)
    index_url = None
    if access.scope in (None, SCOPE_UI):  # a link for one job leads nowhere else
        index_url = f"/v1/ui?{state.signer.sign(access.tenant, SCOPE_UI, access.expires).query()}"
    return render_page(
        "report.html",
        job=job,
        model_name=model_label(model, job.model_id),
        params_json=json.dumps(job.params, sort_keys=True),
        duration=_duration(job) if job.finished_at else None,
        spectra=spectra,
        pictures=pictures,
        files=files,
        tables=tables,
        predictions=predictions,
        expires=datetime.fromtimestamp(access.expires, UTC),
        index_url=index_url,
        base_url=base_url,
        refresh=None if job.status.terminal else 2,
    )


@router.get(
    "/v1/jobs/{job_id}/report",
    response_class=HTMLResponse,
    tags=["jobs"],
    summary="The job's report: pictures, metrics as tables, spectra (HTML)",
    responses={**_HTML, **errors(404)},
)
async def report(
    job_id: str,
    request: Request,
    credentials: Bearer,
    state: State,
    t: Annotated[str | None, Query(description=_LINK_QUERY["t"])] = None,
    exp: Annotated[str | None, Query(description=_LINK_QUERY["exp"])] = None,
    sig: Annotated[str | None, Query(description=_LINK_QUERY["sig"])] = None,
) -> HTMLResponse:
    del t, exp, sig  # read by key_or_link; declared for the OpenAPI schema
    access = key_or_link(request, credentials, (SCOPE_UI, job_scope(job_id)))
    page = await run_in_threadpool(_report, state, access, job_id, _base_url(request))
    return _html(page)
