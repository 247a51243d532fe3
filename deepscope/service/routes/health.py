"""``/healthz`` (the process answers), ``/readyz`` (Redis and workers), ``/metrics``,
``/v1/archs``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from deepscope.contract import HealthOut, ReadyOut
from deepscope.service.deps import State, Tenant, errors
from deepscope.store.queues import QueueName, get_queue
from deepscope.store.recovery import live_workers

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "Redis unreachable or no cpu worker"}},
)
def readyz(state: State) -> JSONResponse:
    redis = state.backend.redis
    try:
        redis.ping()
        # Live by heartbeat: a killed worker's RQ registration outlives it by up to a minute.
        workers = live_workers(redis, state.settings)
        queued = {q.value: len(get_queue(redis, q.value)) for q in QueueName}
    except RedisError as exc:
        # Where Redis lives (host, port) is nobody's business outside: the type is enough.
        body = ReadyOut(
            status="unavailable",
            redis=False,
            workers={},
            queued={},
            detail=f"Redis unreachable ({type(exc).__name__})",
        )
        return JSONResponse(body.model_dump(), status_code=503)
    ok = workers.get(QueueName.CPU.value, 0) > 0
    body = ReadyOut(
        status="ready" if ok else "unavailable",
        redis=True,
        workers=workers,
        queued=queued,
        detail=None if ok else "no worker listens on the cpu queue",
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def metrics(state: State) -> Response:
    registry = state.metrics.registry
    state.metrics.refresh(state.backend.redis, state.settings)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/archs", response_model=list[str], tags=["models"], responses=errors())
def list_archs(tenant: Tenant, state: State) -> list[str]:
    """Architectures the workers can build (for a manifest's ``arch``)."""
    del tenant
    return sorted(state.backend.records.archs())
