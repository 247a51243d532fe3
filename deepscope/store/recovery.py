"""Jobs whose worker died: worker heartbeats, detection, and a retry or a clear failure.

Every ``deepscope worker`` process writes the Redis server's clock into the hash
``ds:workers`` (``{worker name: last beat}``) every few seconds, from a thread of its own. A job
that RQ still counts as started, on a worker that has not beaten for ``worker_dead_after_s``, was
orphaned by a worker that was killed (SIGKILL, power, OOM killer); any other worker's reaper
(:func:`reap`) settles it. A job whose own process died under a live worker is settled at once
by that worker, and the API settles a job RQ marked failed with a crash (:func:`is_crash`).

Settling (:func:`recover_job`, :func:`recover_validation`) runs the job again, up to
``job_retries`` times (default once), then fails it with ``type: worker_died``; a job killed
for running past its time limit fails at once with ``type: timeout``. The record update is a
WATCH transaction that also checks the attempt count the caller saw, so the worker, the reaper
and the API may all try: one wins, and a job is never started twice for one death.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from deepscope.contract.status import ModelStatus
from deepscope.settings import Settings
from deepscope.store import lifecycle
from deepscope.store.lifecycle import Death
from deepscope.store.queues import PREDICT, RUN_JOB, VALIDATE_MODEL, QueueName, enqueue
from deepscope.store.records import JobRecord, ModelRecord, Records

__all__ = [
    "WORKERS_KEY",
    "Death",
    "beat",
    "forget",
    "is_crash",
    "last_beats",
    "reap",
    "recover_job",
    "recover_rq_job",
    "recover_validation",
    "server_time",
]

log = logging.getLogger("deepscope.recovery")

#: Hash ``{worker name: Redis server time of its last heartbeat}``.
WORKERS_KEY = "ds:workers"
#: Heartbeats older than this are dropped from the hash (workers long gone).
_PRUNE_AFTER_S = 24 * 3600
#: What RQ writes when a job's process died without reporting (fork worker) or when its
#: registry entry expired (the whole worker died).
_CRASH_MARKERS = ("terminated unexpectedly", "AbandonedJobError")


def server_time(redis: Redis) -> float:
    """The Redis server's clock (one clock for workers on many machines)."""
    seconds, micros = redis.time()
    return float(seconds) + float(micros) / 1e6


def beat(redis: Redis, worker_name: str) -> None:
    """Record that ``worker_name`` is alive now."""
    redis.hset(WORKERS_KEY, worker_name, repr(server_time(redis)))


def forget(redis: Redis, worker_name: str) -> None:
    """A worker that stops cleanly leaves no heartbeat behind."""
    redis.hdel(WORKERS_KEY, worker_name)


def last_beats(redis: Redis) -> dict[str, float]:
    raw: dict[Any, Any] = redis.hgetall(WORKERS_KEY)
    out = {}
    for name, value in raw.items():
        key = name.decode() if isinstance(name, bytes) else str(name)
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def is_crash(rq_error: str | None) -> bool:
    """Does RQ's failure line say the job's process died (rather than the job raising)?"""
    return rq_error is not None and any(m in rq_error for m in _CRASH_MARKERS)


def _drop_rq_job(redis: Redis, job_id: str, pipe: Pipeline) -> None:
    """Queue on ``pipe`` the removal of the RQ job and every trace of its executions, so that
    nothing (RQ's own cleanup included) acts on the dead run once a new one is queued under the
    same id in the same transaction (a reader never sees the id without a job)."""
    queues = {q.value for q in QueueName}
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        queues.add(job.origin)
        job.delete(pipeline=pipe, remove_from_queue=True)
    except NoSuchJobError:
        pass
    for name in sorted(queues):
        registry = StartedJobRegistry(name, connection=redis, serializer=JSONSerializer)
        entries = [
            e.decode() if isinstance(e, bytes) else str(e)
            for e in redis.zrange(registry.key, 0, -1)
        ]
        stale = [e for e in entries if e.split(":", 1)[0] == job_id]
        if stale:
            pipe.zrem(registry.key, *stale)


def _replace_rq_job(
    redis: Redis, job_id: str, requeue: Callable[[Pipeline], object] | None
) -> None:
    """Drop the dead run's RQ job and, with ``requeue``, queue the new run, in one transaction."""
    with redis.pipeline() as pipe:
        pipe.multi()  # explicitly: RQ adds to a transaction only once it has begun
        _drop_rq_job(redis, job_id, pipe)
        if requeue is not None:
            requeue(pipe)
        pipe.execute()


def recover_job(
    redis: Redis,
    settings: Settings,
    job_id: str,
    death: Death,
    *,
    expected_attempts: int | None = None,
) -> JobRecord | None:
    """Settle an analysis or predict job whose run died: queue it again while retries are left,
    else fail it. No-op (returns the record) when it already finished or was retried since
    ``expected_attempts`` was read."""
    rec, outcome = lifecycle.retry_or_fail(
        Records(redis),
        job_id,
        death,
        retries=settings.job_retries,
        expected_attempts=expected_attempts,
    )
    if rec is None:
        return None
    if outcome == "retried":
        queue = lifecycle.queue_for(redis, rec.analysis, gpu_fallback=settings.gpu_queue_fallback)
        func = PREDICT if rec.analysis == lifecycle.PREDICT_ANALYSIS else RUN_JOB
        attempt = rec.attempts

        def requeue(pipe: Pipeline) -> object:
            return enqueue(
                redis,
                queue,
                func,
                [job_id],
                job_id=job_id,
                timeout=settings.job_timeout,
                description=f"{func.rsplit('.', 1)[-1]} {job_id} (retry {attempt})",
                settings=settings,
                pipeline=pipe,
            )

        _replace_rq_job(redis, job_id, requeue)
        log.warning("job %s: %s; queued again (retry %d)", job_id, death.reason, rec.attempts)
    elif outcome == "failed" or (rec.status.terminal and expected_attempts is None):
        # Failed just now, or finished before the worker died: the dead run's RQ job goes.
        _replace_rq_job(redis, job_id, None)
        if outcome == "failed" and rec.error is not None:
            log.warning("job %s: %s", job_id, rec.error.message)
    return rec


def recover_validation(
    redis: Redis,
    settings: Settings,
    model_id: str,
    death: Death,
    *,
    expected_attempts: int | None = None,
) -> ModelRecord | None:
    """Settle a model whose validation died: validate again while retries are left, else mark
    it ``invalid`` with the reason."""
    rec, outcome = lifecycle.retry_or_fail_validation(
        Records(redis),
        model_id,
        death,
        retries=settings.job_retries,
        expected_attempts=expected_attempts,
    )
    if rec is None:
        return None
    if outcome == "retried":
        attempt = rec.validation_attempts
        rq_id = rec.validation_job_id

        def requeue(pipe: Pipeline) -> object:
            return enqueue(
                redis,
                QueueName.CPU.value,
                VALIDATE_MODEL,
                [model_id],
                job_id=rq_id,
                timeout=settings.validation_timeout,
                description=f"validate model {model_id} (retry {attempt})",
                at_front=True,
                settings=settings,
                pipeline=pipe,
            )

        _replace_rq_job(redis, rq_id, requeue)
        log.warning("model %s: %s; validating again", model_id, death.reason)
    elif outcome == "failed" or (
        rec.status is not ModelStatus.VALIDATING and expected_attempts is None
    ):
        _replace_rq_job(redis, rec.validation_job_id, None)
    return rec


def recover_rq_job(redis: Redis, settings: Settings, job: Job, death: Death) -> bool:
    """Settle the record behind an RQ job (by its function). False for other jobs."""
    func = job.func_name
    args = list(job.args or [])
    if not args or not isinstance(args[0], str):
        return False
    if func in (RUN_JOB, PREDICT):
        return recover_job(redis, settings, args[0], death) is not None
    if func == VALIDATE_MODEL:
        return recover_validation(redis, settings, args[0], death) is not None
    return False


def reap(redis: Redis, settings: Settings) -> list[str]:
    """Settle every started job whose worker stopped heart-beating. → the RQ job ids settled.

    Call it only from a process whose own heartbeats have been getting through for at least
    ``worker_dead_after_s`` (after a Redis outage every worker looks silent for a moment).
    """
    now = server_time(redis)
    beats = last_beats(redis)
    settled = []
    for queue in QueueName:
        registry = StartedJobRegistry(queue.value, connection=redis, serializer=JSONSerializer)
        for job_id, _ in registry.get_job_and_execution_ids(cleanup=False):
            try:
                job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            if job.get_status(refresh=False) != RQStatus.STARTED or not job.worker_name:
                continue
            last = beats.get(job.worker_name)
            # A worker that never beat is not ours to judge: RQ's own cleanup handles it.
            if last is None or now - last <= settings.worker_dead_after_s:
                continue
            death = Death(
                f"worker {job.worker_name} stopped answering {now - last:.0f} s ago "
                "(killed, or its machine went away)"
            )
            if recover_rq_job(redis, settings, job, death):
                settled.append(job_id)
    stale = [name for name, t in beats.items() if now - t > _PRUNE_AFTER_S]
    if stale:
        redis.hdel(WORKERS_KEY, *stale)
    return settled
