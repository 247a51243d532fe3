"""The pages a browser opens: ``GET /v1/jobs/{id}/report`` (pictures, metrics as tables,
spectra) and ``GET /v1/ui`` (the tenant's models and jobs), reached with a signed read-only link.

``?baseline={id}`` adds a comparison with another job of the same analysis: the per-layer
differences of every numeric metric, both jobs' spectra and their ratio.

``GET /v1/jobs/{id}/report?standalone=true`` is the same report as one self-contained file
(pictures as ``data:`` URLs, scripts and styles inlined), to keep with a CI run and open from
disk; it takes the same key or link.

``GET /v1/ui/link`` (bearer key) mints a link; ``GET /v1/ui`` without one shows a form that
takes the API key in a POST body and answers with a link valid for 12 hours. See
:mod:`deepscope.service.links` for why links and not keys in URLs.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from deepscope.contract import CompareOut, JobOut, LinkOut
from deepscope.contract.tables import Table
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
    CHART_SCRIPTS,
    COMPARE_SCRIPTS,
    HTML_HEADERS,
    Figure,
    chart_css,
    chart_data,
    compare_chart_data,
    compare_table,
    data_uri,
    downloads,
    figures,
    model_label,
    prediction_table,
    render_page,
    script_json,
    served_scripts,
    standalone_assets,
    static_media_type,
    static_text,
)
from deepscope.service.schemas import job_out, model_out
from deepscope.store.records import JobRecord
from deepscope.store.storage import Storage

__all__ = ["compare_scope", "router", "standalone_report"]

router = APIRouter(tags=["ui"])

_LOGIN_TTL_S = 12 * 3600
_INDEX_JOBS = 200
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


def compare_scope(job_id: str, baseline_id: str) -> str:
    """The scope of a link to a job's report compared with a baseline: a link for the job
    alone does not show another job's numbers."""
    return f"{job_scope(job_id)}+baseline:{baseline_id}"


def _scopes(job_id: str, baseline_id: str | None) -> tuple[str, ...]:
    if baseline_id is None:
        return (SCOPE_UI, job_scope(job_id))
    return (SCOPE_UI, compare_scope(job_id, baseline_id))


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
    baseline: Annotated[
        str | None, Query(description="with job_id: its report compared with this job")
    ] = None,
) -> LinkOut:
    extra = ""
    if job_id is None:
        link = state.signer.sign_for(tenant, SCOPE_UI, ttl)
        path = "/v1/ui"
    else:
        for ident in (job_id, baseline):
            if ident is not None and state.backend.records.get_job(ident, tenant) is None:
                raise not_found("job", ident)
        scope = job_scope(job_id) if baseline is None else compare_scope(job_id, baseline)
        link = state.signer.sign_for(tenant, scope, ttl)
        path = f"/v1/jobs/{job_id}/report"
        extra = "" if baseline is None else f"&baseline={baseline}"
    return LinkOut(
        url=f"{path}?{link.query()}{extra}",
        expires_at=datetime.fromtimestamp(link.expires, UTC),
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


# The pages' own scripts (the CSP lets a page run scripts from here only). A fixed list of
# names, so nothing else on disk can be reached.
@router.get("/v1/ui/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    media_type = static_media_type(name)
    if media_type is None:
        raise not_found("file", name)
    return Response(
        static_text(name).encode(),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )


# --- report -------------------------------------------------------------------------------


def _read_artifact(storage: Storage, rec: JobRecord, url: str) -> bytes:
    """The bytes of the artifact that the API serves at ``url`` (``/v1/artifacts/{id}/{path}``).

    A cached job's files live under the job that made them (``source_job``)."""
    path = url.removeprefix(f"/v1/artifacts/{rec.id}/")
    with storage.open(Storage.artifact_key(rec.tenant, rec.source_job or rec.id, path)) as f:
        return f.read()


def _comparison(
    state: ServiceState, tenant: str, job: JobOut, baseline_id: str
) -> tuple[CompareOut, dict[str, Any] | None]:
    """The comparison of ``job`` with the baseline (its errors as the compare route's) and
    what compare.js draws of it."""
    # Imported here: the results routes import this module (for the bundle's report).
    from deepscope.service.routes.results import compare_jobs

    diff = compare_jobs(state, tenant, job.id, baseline_id)
    base = state.backend.records.get_job(baseline_id, tenant)
    result = state.backend.result_of(base) if base is not None else None
    charts = None
    if job.result is not None and result is not None:
        charts = compare_chart_data(
            job.result.metrics.model_dump(mode="json"), result.get("metrics") or {}, baseline_id
        )
    return diff, charts


def _report(
    state: ServiceState,
    access: PageAccess,
    job_id: str,
    base_url: str,
    standalone: bool,
    baseline_id: str | None = None,
) -> tuple[str, dict[str, str]]:
    """The report page and its headers; ``standalone``: as one file that needs no server;
    ``baseline_id``: compared with that job."""
    backend = state.backend
    rec = backend.records.get_job(job_id, access.tenant)
    if rec is None:
        raise not_found("job", job_id)
    rec, meta = backend.refresh_job(rec)
    job = job_out(rec, backend.result_of(rec), meta)
    diff: CompareOut | None = None
    compare_charts = None
    if baseline_id is not None:
        diff, compare_charts = _comparison(state, access.tenant, job, baseline_id)
    model_rec = backend.records.get_model(job.model_id, access.tenant)
    model = model_out(model_rec) if model_rec is not None else None
    link = state.signer.sign(access.tenant, job_scope(job.id), access.expires)
    spectra: list[Figure] = []
    pictures: list[Figure] = []
    files: list[Figure] = []
    tables: list[Table] = []
    predictions = None
    charts = None
    if job.result is not None:
        spectra, pictures = figures(job.result.artifacts, link.query())
        files = downloads(job.result.artifacts, link.query())
        tables = job.result.metrics.tables()
        predictions = prediction_table(job)
        charts = chart_data(job.result.metrics.model_dump(mode="json"))
    if diff is not None:
        tables = [compare_table(diff), *tables]
    names = [*CHART_SCRIPTS, "ui.js"] if charts else ["ui.js"]
    if compare_charts:
        names = [*CHART_SCRIPTS, *COMPARE_SCRIPTS, "ui.js"]
    missing: list[str] = []
    headers = HTML_HEADERS
    context: dict[str, Any] = {}
    if standalone:
        # Every picture in the page itself: the file must open from disk, links expire. One
        # gone from storage is left out and named, rather than failing the whole report.
        for gallery in (spectra, pictures):
            for fig in list(gallery):
                try:
                    png = _read_artifact(backend.storage, rec, fig.url.split("?", 1)[0])
                except FileNotFoundError:
                    gallery.remove(fig)
                    missing.append(fig.name)
                else:
                    fig.url = data_uri("image/png", png)
        assets = standalone_assets(names)
        headers = {
            **assets.headers,
            "Content-Disposition": f'attachment; filename="deepscope-report-{job.id}.html"',
        }
        context = {
            "scripts": assets.scripts,
            "meta_csp": assets.meta_csp,
            "saved": datetime.now(UTC),
            "missing": missing,
        }
    else:
        context = {"scripts": served_scripts(names)}
        # A page compared with a baseline keeps it in its own links (and the link's scope).
        baseline_query = f"&baseline={baseline_id}" if baseline_id is not None else ""
        page_link = link
        if baseline_id is not None:
            page_link = state.signer.sign(
                access.tenant, compare_scope(job.id, baseline_id), access.expires
            )
        if job.result is not None:
            context["standalone_url"] = (
                f"/v1/jobs/{job.id}/report?{page_link.query()}{baseline_query}&standalone=true"
            )
        if access.scope in (None, SCOPE_UI):  # a link for one job leads nowhere else
            index = state.signer.sign(access.tenant, SCOPE_UI, access.expires)
            context["index_url"] = f"/v1/ui?{index.query()}"
    page = render_page(
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
        charts=charts,
        charts_json=script_json(charts) if charts else None,
        chart_css=chart_css() if charts else None,
        baseline_id=baseline_id,
        compare_charts=compare_charts,
        compare_json=script_json(compare_charts) if compare_charts else None,
        standalone=standalone,
        expires=datetime.fromtimestamp(access.expires, UTC),
        base_url=base_url,
        # A saved copy is a snapshot: reloading a file would show the same.
        refresh=None if job.status.terminal or standalone else 2,
        **context,
    )
    return page, headers


def standalone_report(state: ServiceState, access: PageAccess, job_id: str, base_url: str) -> str:
    """The self-contained report of a job, as ``?standalone=true`` serves it (for bundles)."""
    return _report(state, access, job_id, base_url, True)[0]


@router.get(
    "/v1/jobs/{job_id}/report",
    response_class=HTMLResponse,
    tags=["jobs"],
    summary="The job's report: pictures, metrics as tables, interactive spectra (HTML)",
    responses={**_HTML, **errors(404, 409, 422)},
)
async def report(
    job_id: str,
    request: Request,
    credentials: Bearer,
    state: State,
    standalone: Annotated[
        bool,
        Query(
            description="one self-contained file (pictures, scripts and styles inside) to save "
            "and open from disk, sent as an attachment"
        ),
    ] = False,
    baseline: Annotated[
        str | None,
        Query(
            description="compare with this job (same analysis): per-layer differences of every "
            "numeric metric, both spectra and their ratio"
        ),
    ] = None,
    t: Annotated[str | None, Query(description=_LINK_QUERY["t"])] = None,
    exp: Annotated[str | None, Query(description=_LINK_QUERY["exp"])] = None,
    sig: Annotated[str | None, Query(description=_LINK_QUERY["sig"])] = None,
) -> HTMLResponse:
    del t, exp, sig  # read by key_or_link; declared for the OpenAPI schema
    access = key_or_link(request, credentials, _scopes(job_id, baseline))
    page, headers = await run_in_threadpool(
        _report, state, access, job_id, _base_url(request), standalone, baseline
    )
    return HTMLResponse(page, headers=headers)
