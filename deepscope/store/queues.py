"""RQ queues: names, connection, enqueueing by function *name*, worker liveness.

Jobs are serialized as JSON (rq's JSONSerializer), never pickled, and carry only ids and JSON
params; the job functions are named by their dotted path so that the API never imports them
(they import torch).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from deepscope.settings import Settings

__all__ = [
    "PREDICT",
    "RUN_JOB",
    "SEED_DEMO",
    "VALIDATE_MODEL",
    "WORKER_TTL",
    "QueueName",
    "RQState",
    "alive_workers",
    "cancel_rq_job",
    "connect",
    "enqueue",
    "get_queue",
    "rq_state",
]

RUN_JOB = "deepscope.workers.analysis_job.run_job"
VALIDATE_MODEL = "deepscope.workers.validation.validate_model"
PREDICT = "deepscope.workers.predict.predict"
SEED_DEMO = "deepscope.workers.demo.seed_demo"

#: Seconds after which a worker that stopped heart-beating counts as dead. RQ's default (420)
#: would leave gpu-queue jobs waiting minutes for a worker that is gone.
WORKER_TTL = 60

_RETRY_BASE_S = 0.1
_RETRY_CAP_S = 1.0


class QueueName(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


def connect(url: str, *, retry_for_s: float = 10.0) -> Redis:
    """A Redis client for RQ (bytes responses, as RQ needs), with bounded timeouts.

    A command that meets a dropped connection (Redis restarting) reconnects and is sent again,
    with backoff, for about ``retry_for_s`` seconds before the error reaches the caller, so a
    Redis restart is a pause rather than a failure for the API and the jobs.
    """
    delays, total = 0, 0.0
    while total < retry_for_s:
        total += min(_RETRY_CAP_S, _RETRY_BASE_S * 2**delays)
        delays += 1
    retry = Retry(ExponentialBackoff(cap=_RETRY_CAP_S, base=_RETRY_BASE_S), delays)
    return Redis.from_url(
        url,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


#: Queues by connection and name: a Queue holds nothing but its name, connection and
#: serializer, and making one (resolving its serializer) costs more than the rest of an
#: enqueue's own Python work, on the API's hottest path.
_QUEUES: weakref.WeakKeyDictionary[Redis, dict[str, Queue]] = weakref.WeakKeyDictionary()


def get_queue(redis: Redis, name: str) -> Queue:
    by_name = _QUEUES.get(redis)
    if by_name is None:
        by_name = _QUEUES.setdefault(redis, {})
    queue = by_name.get(name)
    if queue is None:
        queue = by_name[name] = Queue(name, connection=redis, serializer=JSONSerializer)
    return queue


def alive_workers(redis: Redis) -> dict[str, int]:
    """Workers registered (heart-beating within their TTL) per queue name."""
    counts = {q.value: 0 for q in QueueName}
    for worker in Worker.all(connection=redis, serializer=JSONSerializer):
        for name in worker.queue_names():
            counts[name] = counts.get(name, 0) + 1
    return counts


def enqueue(
    redis: Redis,
    queue: str,
    func: str,
    args: Sequence[str | int | float | bool | None],
    *,
    job_id: str,
    timeout: int,
    settings: Settings,
    description: str,
    at_front: bool = False,
    pipeline: Pipeline | None = None,
) -> Job:
    """Enqueue ``func`` (a dotted path) with JSON arguments.

    The result and failure TTLs always come from ``settings``, so no enqueue can forget them.

    With ``pipeline``, the job is written when the caller executes it (in its transaction).
    """
    return get_queue(redis, queue).enqueue_call(
        func,
        args=tuple(args),
        timeout=timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.failure_ttl,
        job_id=job_id,
        description=description,
        at_front=at_front,
        pipeline=pipeline,
    )


@dataclass(frozen=True)
class RQState:
    """What RQ knows about a job: its status and, for a failure, the last line of the error."""

    status: str
    error: str | None = None
    worker_name: str | None = None
    meta: dict[str, Any] | None = None


def _last_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def rq_state(redis: Redis, job_id: str) -> RQState | None:
    """The RQ job's status (``queued``, ``started``, ``finished``, ``failed``, ``stopped``,
    ``canceled``, ...), or None when RQ has no such job (never enqueued, or expired)."""
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        status = job.get_status(refresh=False)
    except NoSuchJobError:
        return None
    error = None
    if status == RQStatus.FAILED:
        result = job.latest_result()
        error = _last_line(result.exc_string if result is not None else None)
    return RQState(str(status.value), error, job.worker_name, dict(job.meta))


def cancel_rq_job(redis: Redis, job_id: str) -> str:
    """Cancel a queued RQ job or stop a running one. Returns what was done."""
    from rq.command import send_stop_job_command
    from rq.exceptions import InvalidJobOperation

    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except NoSuchJobError:
        return "gone"
    status = job.get_status(refresh=False)
    if status in (RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED, RQStatus.CREATED):
        job.cancel()
        return "canceled"
    if status == RQStatus.STARTED:
        try:
            send_stop_job_command(redis, job_id, serializer=JSONSerializer)
        except InvalidJobOperation:
            return "not running"
        return "stopping"
    return "finished"
