"""Fair shares of the queues between tenants: admission control in front of RQ.

A tenant has at most ``tenant_running_jobs`` analysis jobs in the RQ queues at once (queued
there or running); its other jobs wait in its own list, ``ds:pending:{tenant}``, and enter the
queue oldest first as its jobs end. One tenant's backlog therefore never stands in front of
another tenant's job by more than ``tenant_running_jobs`` jobs. Past ``tenant_queued_jobs``
waiting jobs a submission is refused (HTTP 429 with Retry-After).

The counts live in Redis (``ds:active:{tenant}``, a set of job ids) and change in Lua scripts,
so concurrent submissions and endings cannot overshoot. A process may die between admitting a
job and queueing it, or between ending a job and releasing its slot: :func:`repair` (run with
the reaper, and on every submission for the submitting tenant) drops active ids whose record
has ended or vanished and admits what is waiting. Predictions and validations are small and
urgent: they bypass this.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from redis import Redis
from redis.commands.core import Script
from redis.typing import EncodableT

from deepscope.settings import Settings
from deepscope.store.queues import RUN_JOB, enqueue
from deepscope.store.records import JobRecord, Records

__all__ = [
    "CacheHit",
    "QueueFullError",
    "admit",
    "admit_unless_cached",
    "is_waiting",
    "queue_job",
    "release",
    "repair",
    "wait_turn",
    "waiting",
]

log = logging.getLogger("deepscope.fairness")

_ACTIVE = "ds:active:{}"
_PENDING = "ds:pending:{}"
_TENANTS = "ds:fair-tenants"

# KEYS: active, pending, tenants[, a result-cache entry]. ARGV: job id, tenant, running limit,
# queued limit[, the key prefixes of a job's record and of its result, then commands].
# With the cache entry, a cached answer comes first: {2, job id, its record, its result} (GET of
# each prefix .. id), taking no slot. Else {1} a slot is taken (and the commands from ARGV[7]
# on, each its length then its words, run before the script returns), {0} it must wait, {-1}
# refused (the tenant's waiting list is full). Nobody waiting is jumped: a slot is taken only
# when the waiting list is empty.
_ADMIT = """
if KEYS[4] then
  local hit = redis.call('GET', KEYS[4])
  if hit then
    return {2, hit, redis.call('GET', ARGV[5] .. hit), redis.call('GET', ARGV[6] .. hit)}
  end
end
redis.call('SADD', KEYS[3], ARGV[2])
local waiting = redis.call('LLEN', KEYS[2])
if waiting == 0 and redis.call('SCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  local i = 7
  while i <= #ARGV do
    local n = tonumber(ARGV[i])
    redis.call(unpack(ARGV, i + 1, i + n))
    i = i + n + 1
  end
  return {1}
end
if waiting >= tonumber(ARGV[4]) then
  return {-1}
end
return {0}
"""

# KEYS: active, pending. ARGV: running limit[, an id to free first]. → the ids moved from
# waiting to active.
_PROMOTE = """
if ARGV[2] then
  redis.call('SREM', KEYS[1], ARGV[2])
end
local moved = {}
while redis.call('SCARD', KEYS[1]) < tonumber(ARGV[1]) do
  local id = redis.call('LPOP', KEYS[2])
  if not id then break end
  redis.call('SADD', KEYS[1], id)
  table.insert(moved, id)
end
return moved
"""


_SCRIPTS: dict[str, Script] = {}


def _script(redis: Redis, source: str) -> Callable[..., Any]:
    """The script by its SHA (EVALSHA, loaded once per server), not its source each time:
    every submission runs one. Bound to ``redis`` per call."""
    script = _SCRIPTS.get(source)
    if script is None:
        script = _SCRIPTS[source] = redis.register_script(source)
    return functools.partial(script, client=redis)


class QueueFullError(ValueError):
    """The tenant already has as many jobs waiting as the deployment allows (HTTP 429)."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"too many jobs waiting: {limit} of yours are queued already "
            "(DEEPSCOPE_TENANT_QUEUED_JOBS); retry when some have finished"
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def admit(redis: Redis, settings: Settings, tenant: str, job_id: str) -> bool:
    """Take a slot for ``job_id`` (True: queue it now), or say it must wait (False: write its
    record, then :func:`wait_turn`). QueueFullError when the waiting list is full."""
    outcome = int(
        _script(redis, _ADMIT)(
            keys=[_ACTIVE.format(tenant), _PENDING.format(tenant), _TENANTS],
            args=[job_id, tenant, settings.tenant_running_jobs, settings.tenant_queued_jobs],
        )[0]
    )
    if outcome < 0:
        raise QueueFullError(settings.tenant_queued_jobs, retry_after_s=10)
    return outcome == 1


class CacheHit(NamedTuple):
    """A result-cache entry found by :func:`admit_unless_cached`: the job it names, and the
    values stored under that job's id (its record and its result; None where missing)."""

    job_id: str
    record: bytes | None
    result: bytes | None


def admit_unless_cached(
    redis: Redis,
    settings: Settings,
    tenant: str,
    job_id: str,
    cache_name: str,
    *,
    hit_prefixes: tuple[str, str],
    then: Sequence[Sequence[EncodableT]] = (),
) -> tuple[bool, CacheHit | None]:
    """:func:`admit`, unless the result-cache entry ``cache_name`` exists: one round trip.

    ``hit_prefixes``: the prefixes of the keys that hold a job's record and its result (then
    its id), read with a hit in the same round trip. ``then``: Redis commands (each a sequence
    of words, as a pipeline's command stack holds them) run in the same script when the job
    takes a slot, and only then: the admitted job's record and queue entry, written in that
    round trip, atomically with the admission.

    → ``(False, the hit)`` when the entry exists (no slot is taken), else ``(admitted,
    None)``. QueueFullError when the job would wait and the waiting list is full."""
    args: list[EncodableT] = [
        job_id,
        tenant,
        settings.tenant_running_jobs,
        settings.tenant_queued_jobs,
        *hit_prefixes,
    ]
    for command in then:
        args.append(len(command))
        args.extend(command)
    outcome = _script(redis, _ADMIT)(
        keys=[_ACTIVE.format(tenant), _PENDING.format(tenant), _TENANTS, cache_name],
        args=args,
    )
    code = int(outcome[0])
    if code == 2:
        return False, CacheHit(_text(outcome[1]), outcome[2], outcome[3])
    if code < 0:
        raise QueueFullError(settings.tenant_queued_jobs, retry_after_s=10)
    return code == 1, None


def wait_turn(redis: Redis, settings: Settings, tenant: str, job_id: str) -> list[str]:
    """Put ``job_id`` (its record written) at the end of the tenant's waiting list, and queue
    whatever may run now (a slot may have freed meanwhile). → ids queued."""
    redis.rpush(_PENDING.format(tenant), job_id)
    return _promote(redis, settings, tenant)


def is_waiting(redis: Redis, tenant: str, job_id: str) -> bool:
    """Is ``job_id`` on its tenant's waiting list (queued, but not yet in RQ)?"""
    return redis.lpos(_PENDING.format(tenant), job_id) is not None


def waiting(redis: Redis, tenant: str) -> int:
    """How many of the tenant's jobs wait for a slot."""
    return int(redis.llen(_PENDING.format(tenant)))


def queue_job(redis: Redis, settings: Settings, rec: JobRecord) -> None:
    """Put an admitted job on its RQ queue (the one chosen when it was submitted)."""
    enqueue(
        redis,
        rec.queue or "cpu",
        RUN_JOB,
        [rec.id],
        job_id=rec.id,
        timeout=settings.job_timeout,
        description=f"{rec.analysis} on model {rec.model_id}",
        settings=settings,
    )


def release(redis: Redis, settings: Settings, tenant: str, job_id: str) -> list[str]:
    """``job_id`` ended (or will not run): free its slot and queue what waits. → ids queued."""
    return _promote(redis, settings, tenant, freeing=job_id)


def _promote(
    redis: Redis, settings: Settings, tenant: str, *, freeing: str | None = None
) -> list[str]:
    """Queue the tenant's waiting jobs while it has free slots (after freeing ``freeing``'s,
    in the same script: one round trip when nothing waits). → ids queued."""
    records = Records(redis)
    queued: list[str] = []
    while True:
        args: list[str | int] = [settings.tenant_running_jobs]
        if freeing is not None:
            args.append(freeing)
            freeing = None
        moved = _script(redis, _PROMOTE)(
            keys=[_ACTIVE.format(tenant), _PENDING.format(tenant)], args=args
        )
        if not moved:
            return queued
        for raw in moved:
            job_id = _text(raw)
            rec = records.get_job(job_id)
            if rec is None or rec.status.terminal or rec.cancel_requested:
                # Canceled while waiting (or gone): its slot goes to the next one.
                redis.srem(_ACTIVE.format(tenant), job_id)
                continue
            queue_job(redis, settings, rec)
            log.info("job %s of tenant %s: its turn, queued", job_id, tenant)
            queued.append(job_id)


def repair(redis: Redis, settings: Settings, tenants: list[str] | None = None) -> list[str]:
    """Drop slots held by jobs that ended or vanished, then queue what waits; for ``tenants``
    (default: every tenant that has used the queues). → ids queued."""
    records = Records(redis)
    names = tenants if tenants is not None else sorted(_text(t) for t in redis.smembers(_TENANTS))
    queued: list[str] = []
    for tenant in names:
        key = _ACTIVE.format(tenant)
        for raw in redis.smembers(key):
            job_id = _text(raw)
            rec = records.get_job(job_id)
            if rec is None or rec.status.terminal:
                redis.srem(key, job_id)
        queued += _promote(redis, settings, tenant)
    return queued
