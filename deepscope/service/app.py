"""The FastAPI application: ``create_app(settings)``; ``uvicorn --factory
deepscope.service.app:app_from_env`` (what ``deepscope api`` runs)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepscope import __version__
from deepscope.contract.errors import (
    PROBLEM_PREFIX,
    ProblemType,
    describe_errors,
    problem_info,
    problem_slug,
    public_text,
)
from deepscope.service import webhooks
from deepscope.service.deps import PROBLEM_JSON, ProblemError, ServiceState, field_errors
from deepscope.service.links import LinkSigner
from deepscope.service.metrics import Metrics, MetricsMiddleware
from deepscope.service.routes import (
    artifacts,
    datasets,
    health,
    jobs,
    models,
    problems,
    results,
    ui,
)
from deepscope.service.uploads import MultipartError, sweep_orphans
from deepscope.settings import Settings
from deepscope.store.backend import Backend, QuotaExceededError
from deepscope.store.fairness import QueueFullError
from deepscope.store.recovery import Reaper
from deepscope.store.storage import UploadTooLargeError

__all__ = ["app_from_env", "create_app"]

log = logging.getLogger("deepscope.service")

_DESCRIPTION = """\
Explain trained image classifiers: post a model, run analyses (signal spaces, residuals, inverse
images, input optimization) as jobs, fetch metrics and pictures.

Authenticate with `Authorization: Bearer KEY`. Errors are `application/problem+json`
(RFC 9457): `{"type": "/v1/problems/<slug>", "title", "status", "detail", "instance"}`, plus
`errors` (each invalid field) for `invalid_params`; `GET /v1/problems` lists the types.
"""


def problem_response(
    request: Request,
    status: int,
    slug: ProblemType | str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    """An RFC 9457 problem body: the one shape of every error the API answers."""
    slug = str(slug)
    info = problem_info(slug)
    if info is not None:
        title = info[0]
    else:
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
    body: dict[str, Any] = {
        "type": PROBLEM_PREFIX + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(
        body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON
    )


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """The API for one deployment. Connects to Redis lazily (on the first request).

    While it serves, a thread settles the jobs of dead workers (:class:`Reaper`; one API
    process at a time), so that a job is settled even when no worker is left alive. When it
    starts, another deletes what uploads cut short left behind (:func:`sweep_orphans`).
    """
    settings = settings if settings is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.upload_sweep_age_s > 0:
            # What uploads cut short left behind (temporary files, unregistered blobs).
            threading.Thread(
                target=sweep_orphans,
                args=(app.state.deepscope.backend, tmp_dir, settings.upload_sweep_age_s),
                name="deepscope-sweep",
                daemon=True,
            ).start()
        reaper = Reaper(settings)
        reaper.start()
        # Jobs' webhooks, from the durable queue in Redis (any API process may deliver).
        hooks = webhooks.dispatcher(app.state.deepscope)
        hooks.start()
        try:
            yield
        finally:
            hooks.stop()
            reaper.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="deepscope",
        version=__version__,
        description=_DESCRIPTION,
        openapi_tags=[
            {"name": "models", "description": "upload, validate, inspect, predict"},
            {"name": "datasets", "description": ".npz datasets and the built-ins"},
            {"name": "jobs", "description": "analyses, their progress and results"},
            {"name": "artifacts", "description": "pictures and result files of jobs"},
            {"name": "health", "description": "liveness, readiness, metrics"},
            {"name": "ui", "description": "HTML pages for a browser, through signed links"},
        ],
    )
    tmp_dir = settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics()
    keys = settings.key_table()
    app.state.deepscope = ServiceState(
        settings=settings,
        backend=backend if backend is not None else Backend(settings),
        keys=keys,
        tmp_dir=tmp_dir,
        metrics=metrics,
        signer=LinkSigner(keys),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    for router in (
        models.router,
        datasets.router,
        results.router,  # before the jobs' /{job_id} routes: its paths are more specific
        jobs.build_router(),
        artifacts.router,
        health.router,
        ui.router,
        problems.router,
    ):
        app.include_router(router)
    _problem_handlers(app)
    _problems_in_openapi(app)
    return app


def _problem_handlers(app: FastAPI) -> None:
    """Every error, whoever raises it, answered as a problem body (:func:`problem_response`)."""

    # Starlette's class: FastAPI's subclasses it, and the router raises the base one itself
    # (404 for an unknown path, 405 for a method).
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if isinstance(exc, ProblemError):
            slug, errors = exc.slug, exc.errors
        else:
            slug, errors = problem_slug(status), None
        return problem_response(
            request,
            status,
            slug,
            public_text(str(exc.detail)),
            headers=exc.headers,
            errors=errors,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(
            request,
            422,
            ProblemType.INVALID_PARAMS,
            public_text(describe_errors(exc.errors())),
            errors=field_errors(exc.errors()),
        )

    @app.exception_handler(MultipartError)
    async def _multipart(request: Request, exc: MultipartError) -> JSONResponse:
        return problem_response(request, 400, ProblemType.INVALID_UPLOAD, public_text(str(exc)))

    @app.exception_handler(UploadTooLargeError)
    async def _too_large(request: Request, exc: UploadTooLargeError) -> JSONResponse:
        return problem_response(request, 413, ProblemType.PAYLOAD_TOO_LARGE, str(exc))

    @app.exception_handler(QuotaExceededError)
    async def _quota(request: Request, exc: QuotaExceededError) -> JSONResponse:
        return problem_response(request, 409, ProblemType.QUOTA_EXCEEDED, str(exc))

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return problem_response(
            request,
            429,
            ProblemType.QUEUE_FULL,
            str(exc),
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        log.error("redis error on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            request,
            503,
            ProblemType.SERVICE_UNAVAILABLE,
            "the job store (Redis) is unavailable",
            headers={"Retry-After": "1"},
        )

    # Starlette answers it from its outermost middleware and re-raises, so the error is still
    # logged with its traceback; the client sees no internals.
    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(
            request, 500, ProblemType.INTERNAL, "internal error; it has been logged"
        )


def _problems_in_openapi(app: FastAPI) -> None:
    """FastAPI documents its own 422 body (a bare list); ours is a problem body, so every
    error response in the schema is rewritten to ProblemOut as ``application/problem+json``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        ref = {"$ref": "#/components/schemas/ProblemOut"}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                resp = op.get("responses", {}).get("422")
                if resp is not None:
                    resp["description"] = (
                        "Invalid fields: invalid_params, errors lists each (loc, msg, type)"
                    )
                _errors_as_problems(op, ref)
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _errors_as_problems(op: dict[str, Any], ref: dict[str, str]) -> None:
    """Error bodies are problem JSON (the exception handlers write them) even on routes that
    answer HTML, and an operation that takes a body may answer 400 to one that cannot be
    parsed."""
    responses: dict[str, Any] = op.setdefault("responses", {})
    for code, resp in responses.items():
        if not code.isdigit() or int(code) < 400:
            continue
        content: dict[str, Any] = resp.setdefault("content", {})
        # A route's own error body (readyz's 503 is a ReadyOut) stays; the rest are problems.
        own = [m for m in content.values() if "ProblemOut" not in str(m) and m.get("schema")]
        if not own or "HTTPValidationError" in str(content):
            resp["content"] = {PROBLEM_JSON: {"schema": ref}}
    if "requestBody" in op and "400" not in responses:
        responses["400"] = {
            "description": "Malformed request (a body that cannot be parsed): invalid_upload",
            "content": {PROBLEM_JSON: {"schema": ref}},
        }


def app_from_env() -> FastAPI:
    """The app configured from ``DEEPSCOPE_*`` (uvicorn's ``--factory`` entry point)."""
    return create_app(Settings())
