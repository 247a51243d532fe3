"""The throughput floor of bench_service.py: the least an HTTP service that accepts a job can
do. A FastAPI app whose one route validates the same body as ``POST /v1/jobs`` (the registry's
union of every analysis's params) and makes one RQ enqueue of a no-op, served by uvicorn exactly
as ``deepscope api`` serves deepscope (same event loop, HTTP parser and process count).

Run by the bench: ``uvicorn --factory bench.floor_app:create --workers N`` with
``DEEPSCOPE_REDIS_URL`` set.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Body, FastAPI
from fastapi.concurrency import run_in_threadpool
from rq import Queue
from rq.serializers import JSONSerializer

from deepscope.service.typed import job_models
from deepscope.store.queues import connect


def create() -> FastAPI:
    app = FastAPI()
    redis = connect(os.environ["DEEPSCOPE_REDIS_URL"])
    queue = Queue("floor", connection=redis, serializer=JSONSerializer)
    models = job_models()

    def enqueue() -> str:
        job = queue.enqueue_call(
            "builtins.len", args=("x",), timeout=3600, result_ttl=604800, failure_ttl=2592000
        )
        return str(job.id)

    async def submit(body: Any) -> dict[str, str]:
        return {"id": await run_in_threadpool(enqueue), "status": "queued"}

    submit.__annotations__["body"] = Annotated[models.job_in, Body()]
    app.add_api_route("/v1/jobs", submit, methods=["POST"], status_code=202)
    return app
