"""Long polling: ``GET /v1/jobs/{id}?wait=S`` answers as soon as the job ends (or after ``S``),
and so does ``POST /v1/jobs`` sent with ``Prefer: wait=S`` (RFC 7240): submit and wait in one
request.

A client that polls finds out late (half its interval on average) and loads the API with every
poll; one that waits is told within a Redis round trip of the end, as RQ's own blocking result
read is. Every change of a job's record into a terminal status publishes on the job's channel
(:func:`deepscope.store.records.job_done_channel`, in the same transaction as the write); a
waiter subscribes first, then reads the record, so an end between the two is never missed. It
also reads again every :data:`RECHECK_S`: a job settled by a path that publishes nothing (a
dead worker's job, settled by this very read) still ends the wait.

The waits hold no thread: they use :mod:`redis.asyncio`, one connection per waiter, at most
:data:`MAX_WAITERS` per API process (past that a request answers at once, as without ``wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from deepscope.contract import JobOut
from deepscope.store.records import job_done_channel

__all__ = ["MAX_WAITERS", "MAX_WAIT_S", "RECHECK_S", "JobWaiter", "preferred_wait"]

#: The longest wait one request may ask for (seconds); proxies often cut idle requests at 60 s.
MAX_WAIT_S = 50.0
#: Concurrent waits per API process (each holds one Redis connection while it waits).
MAX_WAITERS = 512
#: How often a wait reads the job again whatever it heard.
RECHECK_S = 1.0


def preferred_wait(prefer: str | None) -> float:
    """The seconds a ``Prefer`` header (RFC 7240) asks the answer to wait for: its ``wait``
    preference, capped at :data:`MAX_WAIT_S`; 0 without one (or with a malformed one, which
    the RFC says to ignore). ``"respond-async, wait=30"`` → 30.0."""
    if not prefer:
        return 0.0
    for preference in prefer.split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(value.strip().strip('"'))
        except ValueError:
            return 0.0
        return min(seconds, MAX_WAIT_S) if math.isfinite(seconds) and seconds > 0 else 0.0
    return 0.0


class JobWaiter:
    """Waits for jobs to end, for one API process (one event loop)."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._redis: AsyncRedis | None = None
        self._slots = asyncio.Semaphore(MAX_WAITERS)

    def _client(self) -> AsyncRedis:
        if self._redis is None:
            # Created on the event loop that uses it (uvicorn's, one per process).
            self._redis = AsyncRedis.from_url(self._url, max_connections=MAX_WAITERS + 8)
        return self._redis

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def wait(
        self,
        job_id: str,
        seconds: float,
        read: Callable[[], Awaitable[JobOut]],
        job: JobOut | None = None,
    ) -> JobOut:
        """``read()`` once the job is terminal, or when ``seconds`` have passed.

        ``read`` returns the job's current view (it raises for a job that isn't the tenant's,
        which ends the wait with that error); ``job``: its view just read, if the caller has
        one (a submission's)."""
        if job is None:
            job = await read()
        if job.status.terminal or seconds <= 0 or self._slots.locked():
            return job
        deadline = time.monotonic() + min(seconds, MAX_WAIT_S)
        async with self._slots:
            try:
                pubsub = self._client().pubsub(ignore_subscribe_messages=True)
            except RedisError:
                return job
            try:
                await pubsub.subscribe(job_done_channel(job_id))
                while True:
                    # Read after subscribing: an end published before is in the record.
                    job = await read()
                    left = deadline - time.monotonic()
                    if job.status.terminal or left <= 0:
                        return job
                    with contextlib.suppress(asyncio.TimeoutError):
                        await pubsub.get_message(timeout=min(RECHECK_S, left))
            except RedisError:
                # Redis went away while waiting: answer with what is known (the client
                # waits again, or sees the 503 of its next request).
                return job
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
