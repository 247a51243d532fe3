"""The FastAPI application: ``create_app(settings)``; ``uvicorn --factory
deepscope.service.app:app_from_env`` (what ``deepscope api`` runs)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from deepscope import __version__
from deepscope.contract.errors import describe_errors, public_text
from deepscope.service.deps import ServiceState
from deepscope.service.links import LinkSigner
from deepscope.service.metrics import Metrics, MetricsMiddleware
from deepscope.service.routes import artifacts, datasets, health, jobs, models, ui
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

Authenticate with `Authorization: Bearer KEY`. Errors are `{"detail": "..."}`.
"""


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
        try:
            yield
        finally:
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
        jobs.build_router(),
        artifacts.router,
        health.router,
        ui.router,
    ):
        app.include_router(router)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": public_text(str(exc.detail))},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": public_text(describe_errors(exc.errors()))}, status_code=422)

    @app.exception_handler(MultipartError)
    async def _multipart(request: Request, exc: MultipartError) -> JSONResponse:
        return JSONResponse({"detail": public_text(str(exc))}, status_code=400)

    @app.exception_handler(UploadTooLargeError)
    async def _too_large(request: Request, exc: UploadTooLargeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(QuotaExceededError)
    async def _quota(request: Request, exc: QuotaExceededError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)},
            status_code=429,
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        log.error("redis error on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "the job store (Redis) is unavailable"}, status_code=503)

    _string_errors_in_openapi(app)
    return app


def _string_errors_in_openapi(app: FastAPI) -> None:
    """FastAPI documents its own 422 body (a list); ours is ``{"detail": "..."}``, so every 422
    in the schema is rewritten to ErrorOut."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        ref = {"$ref": "#/components/schemas/ErrorOut"}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                resp = op.get("responses", {}).get("422")
                if resp is not None:
                    resp["content"] = {"application/json": {"schema": ref}}
                    resp["description"] = "Invalid fields; the detail names them"
                _errors_as_json(op, ref)
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _errors_as_json(op: dict[str, Any], ref: dict[str, str]) -> None:
    """Error bodies are JSON (the exception handlers write them) even on routes that answer
    HTML, and an operation that takes a body may answer 400 to one that cannot be parsed."""
    responses: dict[str, Any] = op.setdefault("responses", {})
    for code, resp in responses.items():
        if not code.isdigit() or int(code) < 400:
            continue
        content: dict[str, Any] = resp.setdefault("content", {})
        if not content or any("ErrorOut" in str(media) for media in content.values()):
            content["application/json"] = {"schema": ref}
    if "requestBody" in op and "400" not in responses:
        responses["400"] = {
            "description": "Malformed request (a body that cannot be parsed)",
            "content": {"application/json": {"schema": ref}},
        }


def app_from_env() -> FastAPI:
    """The app configured from ``DEEPSCOPE_*`` (uvicorn's ``--factory`` entry point)."""
    return create_app(Settings())
