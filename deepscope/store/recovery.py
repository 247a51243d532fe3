"""Jobs whose worker died: worker heartbeats, detection, and a retry or a clear failure.

Every ``deepscope worker`` process writes the Redis server's clock into the hash
``ds:workers`` (``{worker name: last beat}``) every few seconds, from a thread of its own. A job
that RQ still counts as started, on a worker that has not beaten for ``worker_dead_after_s``, was
orphaned by a worker that was killed (SIGKILL, power, OOM killer); a reaper (:func:`reap`)
settles it. Reapers run in every worker and in every API process (:class:`Reaper`, so that a
job is settled even when no worker is left alive); one at a time scans, the holder of the lock
``ds:reaper`` (:func:`reap_as_leader`). A job whose own process died under a live worker is
settled at once by that worker, the jobs of a worker that ``deepscope up`` saw exit are settled
at once by ``up`` (:func:`settle_worker_jobs`), and the API settles a job RQ marked failed with
a crash (:func:`is_crash`). :func:`live_workers` counts the workers that beat, per queue.

Settling (:func:`recover_job`, :func:`recover_validation`) runs the job again, up to
``job_retries`` times (default once), then fails it with ``type: worker_died``; a job killed
for running past its time limit fails at once with ``type: timeout``. The record update is a
WATCH transaction that also checks the attempt count the caller saw, so the worker, the reaper
and the API may all try: one wins, and a job is never started twice for one death.

A worker told to stop whose job outlives its grace period stops the job and queues it again
(:func:`requeue_interrupted`, ``lifecycle.requeue``): no retry is spent, nothing failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from deepscope.contract.status import ModelStatus
from deepscope.settings import Settings
from deepscope.store import fairness, lifecycle
from deepscope.store.lifecycle import Death
from deepscope.store.queues import PREDICT, RUN_JOB, VALIDATE_MODEL, QueueName, connect, enqueue
from deepscope.store.records import JobRecord, ModelRecord, Records

__all__ = [
    "REAPER_LOCK_KEY",
    "WORKERS_KEY",
    "Death",
    "Reaper",
    "beat",
    "forget",
    "is_crash",
    "last_beats",
    "live_workers",
    "reap",
    "reap_as_leader",
    "recover_job",
    "recover_rq_job",
    "recover_validation",
    "requeue_interrupted",
    "server_time",
    "settle_worker_jobs",
]

log = logging.getLogger("deepscope.recovery")

#: Hash ``{worker name: Redis server time of its last heartbeat}``.
WORKERS_KEY = "ds:workers"
#: The lock (a token with a TTL) of the one process that reaps at a time.
REAPER_LOCK_KEY = "ds:reaper"
#: Heartbeats older than this are dropped from the hash (workers long gone).
_PRUNE_AFTER_S = 24 * 3600
#: What RQ writes when a job's process died without reporting (fork worker), when its registry
#: entry expired (the whole worker died), or when the worker died as it took the job, before
#: starting it (RQ fails a job left in its intermediate queue).
_CRASH_MARKERS = (
    "terminated unexpectedly",
    "AbandonedJobError",
    "stuck in intermediate queue",
)


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
        # Failed just now, or finished before the worker died: the dead run's RQ job goes,
        # and its slot to the tenant's next job.
        _replace_rq_job(redis, job_id, None)
        if rec.analysis != lifecycle.PREDICT_ANALYSIS:
            fairness.release(redis, settings, rec.tenant, rec.id)
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


def _started_jobs(redis: Redis) -> Iterator[tuple[Job, str]]:
    """Every RQ job that RQ counts as started, with the name of the worker that took it."""
    for queue in QueueName:
        registry = StartedJobRegistry(queue.value, connection=redis, serializer=JSONSerializer)
        for job_id, _ in registry.get_job_and_execution_ids(cleanup=False):
            try:
                job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            if job.get_status(refresh=False) != RQStatus.STARTED or not job.worker_name:
                continue
            yield job, job.worker_name


def reap(redis: Redis, settings: Settings) -> list[str]:
    """Settle every started job whose worker stopped heart-beating. → the RQ job ids settled.

    Call it only from a process whose own link to Redis has been up for at least
    ``worker_dead_after_s`` (after a Redis outage every worker looks silent for a moment).
    """
    now = server_time(redis)
    beats = last_beats(redis)
    settled = []
    for job, worker in _started_jobs(redis):
        job_id = job.id
        last = beats.get(worker)
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


def settle_worker_jobs(
    redis: Redis, settings: Settings, worker_name: str, death: Death
) -> list[str]:
    """Settle at once the jobs of a worker known to be dead (its parent saw it exit), without
    waiting for its heartbeat to go stale; its heartbeats go too. The worker's later names
    (``NAME.1``, ... when its RQ loop served again after an error) count as its own.
    → the RQ job ids settled."""

    def mine(name: str) -> bool:
        return name == worker_name or name.startswith(worker_name + ".")

    settled = [
        job.id
        for job, worker in _started_jobs(redis)
        if mine(worker) and recover_rq_job(redis, settings, job, death)
    ]
    names = [name for name in last_beats(redis) if mine(name)]
    if names:
        redis.hdel(WORKERS_KEY, *names)
    return settled


def requeue_interrupted(redis: Redis, settings: Settings, job: Job, reason: str) -> bool:
    """Queue again, at the front, a job that its worker stopped because the worker was told
    to stop and the grace period ran out (:func:`lifecycle.requeue`: no retry spent). Call it
    once the job's process is gone. → whether it was queued again (False when it finished or
    was canceled meanwhile, or is not a job with a record)."""
    func = job.func_name
    args = list(job.args or [])
    if not args or not isinstance(args[0], str):
        return False
    record_id = args[0]
    if func in (RUN_JOB, PREDICT):
        if lifecycle.requeue(Records(redis), record_id, reason) is None:
            return False
        timeout = settings.job_timeout
    elif func == VALIDATE_MODEL:
        model = Records(redis).get_model(record_id)
        if model is None or model.status is not ModelStatus.VALIDATING:
            return False
        timeout = settings.validation_timeout
    else:
        return False
    queue = job.origin or QueueName.CPU.value

    def again(pipe: Pipeline) -> object:
        return enqueue(
            redis,
            queue,
            func,
            [record_id],
            job_id=job.id,
            timeout=timeout,
            description=f"{func.rsplit('.', 1)[-1]} {record_id} (requeued: {reason})",
            at_front=True,
            settings=settings,
            pipeline=pipe,
        )

    _replace_rq_job(redis, job.id, again)
    log.warning("job %s: %s; queued again", job.id, reason)
    return True


# Take the lock, or extend it when this owner holds it; 1 when held by ARGV[1] afterwards.
_LOCK_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def reap_as_leader(redis: Redis, settings: Settings, owner: str, ttl_s: float) -> list[str] | None:
    """:func:`reap`, by one process at a time: the holder of ``ds:reaper`` (a lock with a TTL,
    taken or extended here), so that many API processes and workers do not all scan. → the
    RQ job ids settled; None when another process holds the lock (it reaps)."""
    held = redis.eval(_LOCK_SCRIPT, 1, REAPER_LOCK_KEY, owner, str(int(ttl_s * 1000)))
    if not held:
        return None
    settled = reap(redis, settings)
    # Slots of tenants' jobs that ended without releasing them (a process died between the
    # two): given back, and what waits is queued.
    fairness.repair(redis, settings)
    return settled


def live_workers(redis: Redis, settings: Settings) -> dict[str, int]:
    """Workers per queue whose heartbeat (``ds:workers``, the Redis server's clock) is within
    ``worker_dead_after_s``: a killed worker stops counting then, where its RQ registration
    lives on for its TTL."""
    now = server_time(redis)
    beats = last_beats(redis)
    counts = {q.value: 0 for q in QueueName}
    for worker in Worker.all(connection=redis, serializer=JSONSerializer):
        last = beats.get(worker.name)
        if last is None or now - last > settings.worker_dead_after_s:
            continue
        for name in worker.queue_names():
            counts[name] = counts.get(name, 0) + 1
    return counts


class Reaper:
    """A thread that settles the jobs of dead workers from a process that runs none (the API),
    so that a job is settled even when no worker is alive. It reaps only as the holder of the
    reaper lock, and only once its own link to Redis has been up for ``worker_dead_after_s``
    (after an outage every worker looks silent until its next beat)."""

    def __init__(self, settings: Settings, name: str = "api") -> None:
        self.settings = settings
        self.owner = f"{name}:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.interval = max(1.0, settings.worker_dead_after_s / 5)
        self._redis: Redis | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deepscope-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._redis is not None:
            # Hand the lock on at once rather than after its TTL.
            with contextlib.suppress(RedisError):
                self._redis.eval(_UNLOCK_SCRIPT, 1, REAPER_LOCK_KEY, self.owner)
            self._redis.close()

    def _run(self) -> None:
        up_since: float | None = None
        failing = False
        while not self._stop.wait(self.interval):
            try:
                if self._redis is None:
                    self._redis = connect(self.settings.resolved_redis_url(), retry_for_s=1.0)
                self._redis.ping()
                if up_since is None:
                    up_since = time.monotonic()
                failing = False
                if time.monotonic() - up_since < self.settings.worker_dead_after_s:
                    continue
                settled = reap_as_leader(
                    self._redis, self.settings, self.owner, ttl_s=3 * self.interval
                )
                if settled:
                    log.warning("settled %d job(s) of dead workers: %s", len(settled), settled)
            except (RedisError, ValueError) as exc:
                up_since = None
                if not failing:
                    log.warning("reaper: Redis unreachable (%s); retrying", exc)
                failing = True
            except Exception:
                log.exception("reaper: unexpected error")
