"""Webhooks: when a job with a ``callback_url`` ends, its final job object is POSTed there,
signed, retried with exponential backoff, at least once.

The queue is durable, in Redis:

- ``ds:webhook:{delivery id}``: a hash with the job, its tenant, the URL, the event
  (``job.<status>``), the attempts made and, once rendered, the body (every attempt sends the
  same bytes and the same ``Deepscope-Delivery``, so a receiver can drop duplicates);
- ``ds:webhooks:due``: a sorted set of delivery ids scored by when each is due.

:func:`enqueue_delivery` adds one in the transaction that writes the job's terminal status
(``Records`` calls it for every job status change, whoever makes it: worker, reaper, cancel,
the cache), so a job never ends without its delivery nor the other way round.
:class:`WebhookDispatcher`, a thread of each API process, claims due deliveries with one
atomic script that pushes their due time a lease ahead; a delivery whose dispatcher died
becomes due again when the lease runs out (at least once). Success deletes it; a failure
(connection error, timeout, any non-2xx, redirects included: a redirect could lead off the
allowed hosts) schedules the next attempt ``backoff · 2^(attempt-1)`` seconds later, until
``callback_attempts``; then it is dropped and logged (``ds:webhooks:failed`` keeps the last
1000 for an operator).

This module imports nothing of :mod:`deepscope.store.records` at import time (records import
it); rendering the job object is the API's, passed in as a function.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from deepscope.contract.signing import SIGNATURE_HEADER, sign
from deepscope.settings import Settings
from deepscope.store.queues import connect

__all__ = [
    "DUE_KEY",
    "FAILED_KEY",
    "CallbackNotAllowedError",
    "Render",
    "WebhookDispatcher",
    "check_callback_url",
    "deliver_due",
    "delivery_key",
    "enqueue_delivery",
    "tenant_key",
]

log = logging.getLogger("deepscope.webhooks")

_P = "ds:"
#: Delivery ids scored by the unix time they are due (or their claim's lease ends).
DUE_KEY = f"{_P}webhooks:due"
#: The last deliveries given up on (JSON lines), for an operator.
FAILED_KEY = f"{_P}webhooks:failed"
_FAILED_KEEP = 1000
_MAX_URL = 2048

#: ``render(job_id, tenant)`` → the job object's JSON, or None when the job is gone.
Render = Callable[[str, str], bytes | None]


class CallbackNotAllowedError(ValueError):
    """A callback URL that is not http(s), or whose host the deployment does not allow."""


def _allowed(hosts: str) -> list[tuple[str, int | None]]:
    """``"a.example, b.example:8443, [::1]:9000"`` → ``[(host, port or None for any)]``."""
    out: list[tuple[str, int | None]] = []
    for raw in hosts.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        # A bare IPv6 address has colons but no port: it must be bracketed to carry one.
        bare_ipv6 = entry.count(":") > 1 and not entry.startswith("[")
        if sep and port.isdigit() and not bare_ipv6:
            out.append((host.strip("[]"), int(port)))
        else:
            out.append((entry.strip("[]"), None))
    return out


def check_callback_url(url: str, hosts: str) -> str:
    """``url`` when it may receive callbacks: http or https, no credentials in it, and its
    host (``host``, or ``host:port`` exactly) listed in ``hosts`` (``DEEPSCOPE_CALLBACK_HOSTS``,
    comma-separated; empty: callbacks refused). CallbackNotAllowedError saying why else."""
    if len(url) > _MAX_URL:
        raise CallbackNotAllowedError(f"callback_url is longer than {_MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise CallbackNotAllowedError(f"callback_url {url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise CallbackNotAllowedError(
            f"callback_url must be an http or https URL, got scheme {parts.scheme or 'none'!r}"
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise CallbackNotAllowedError(f"callback_url {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackNotAllowedError("callback_url may not carry credentials (user:password@)")
    effective = port if port is not None else (443 if parts.scheme == "https" else 80)
    allowed = _allowed(hosts)
    if not allowed:
        raise CallbackNotAllowedError(
            "this deployment accepts no callback URLs (DEEPSCOPE_CALLBACK_HOSTS is empty)"
        )
    if not any(h == host and (p is None or p == effective) for h, p in allowed):
        raise CallbackNotAllowedError(
            f"callback host {host}:{effective} is not allowed; allowed: "
            + ", ".join(h if p is None else f"{h}:{p}" for h, p in allowed)
        )
    return url


def delivery_key(delivery_id: str) -> str:
    return f"{_P}webhook:{delivery_id}"


def enqueue_delivery(
    pipe: Pipeline, job_id: str, tenant: str, url: str, status: str, *, now: float | None = None
) -> str:
    """Add the delivery of a job's end to ``pipe`` (the transaction that writes the terminal
    status). → its delivery id."""
    delivery = uuid.uuid4().hex
    pipe.hset(
        delivery_key(delivery),
        mapping={
            "job_id": job_id,
            "tenant": tenant,
            "url": url,
            "event": f"job.{status}",
            "attempts": 0,
            "created": f"{time.time() if now is None else now:.3f}",
        },
    )
    pipe.zadd(DUE_KEY, {delivery: time.time() if now is None else now})
    return delivery


# Take up to ARGV[3] deliveries due at ARGV[1], each pushed to ARGV[2] (its lease's end), in
# one step: two dispatchers never claim the same one.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
end
return ids
"""


def tenant_key(settings: Settings, tenant: str) -> str | None:
    """The key a tenant's deliveries are signed with: its first configured API key."""
    for key, owner in settings.key_table().items():
        if owner == tenant:
            return key
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _attempt(
    redis: Redis,
    settings: Settings,
    http: httpx.Client,
    render: Render,
    delivery: str,
) -> bool | None:
    """One attempt of one claimed delivery. → True delivered, False failed, None gone."""
    key = delivery_key(delivery)
    raw = {_text(k): v for k, v in redis.hgetall(key).items()}
    if not raw:
        redis.zrem(DUE_KEY, delivery)
        return None
    job_id, tenant, url = _text(raw["job_id"]), _text(raw["tenant"]), _text(raw["url"])
    body = raw.get("body")
    if body is None:
        body = render(job_id, tenant)
        if body is None:  # the job was deleted meanwhile: nothing to tell
            redis.delete(key)
            redis.zrem(DUE_KEY, delivery)
            return None
        # Kept, so that every attempt sends the same bytes.
        redis.hset(key, "body", body)
    body_bytes = body if isinstance(body, bytes) else str(body).encode()
    secret = tenant_key(settings, tenant)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "deepscope-webhooks",
        "Deepscope-Event": _text(raw["event"]),
        "Deepscope-Delivery": delivery,
    }
    if secret is not None:
        headers[SIGNATURE_HEADER] = sign(body_bytes, secret)
    attempts = int(raw.get("attempts", 0)) + 1
    error = None
    try:
        response = http.post(url, content=body_bytes, headers=headers)
        if 200 <= response.status_code < 300:
            pipe = redis.pipeline()
            pipe.delete(key)
            pipe.zrem(DUE_KEY, delivery)
            pipe.execute()
            log.info("delivered %s of job %s to %s", raw["event"], job_id, url)
            return True
        error = f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    if attempts >= settings.callback_attempts:
        pipe = redis.pipeline()
        pipe.delete(key)
        pipe.zrem(DUE_KEY, delivery)
        record = {"delivery": delivery, "job_id": job_id, "url": url, "error": error}
        pipe.lpush(FAILED_KEY, json.dumps(record))
        pipe.ltrim(FAILED_KEY, 0, _FAILED_KEEP - 1)
        pipe.execute()
        log.error(
            "gave up delivering %s of job %s to %s after %d attempts: %s",
            raw["event"], job_id, url, attempts, error,
        )  # fmt: skip
        return False
    delay = settings.callback_backoff_s * 2 ** (attempts - 1)
    pipe = redis.pipeline()
    pipe.hset(key, "attempts", attempts)
    pipe.hset(key, "last_error", error)
    pipe.zadd(DUE_KEY, {delivery: time.time() + delay})
    pipe.execute()
    log.warning(
        "delivery %s of job %s to %s failed (%s); attempt %d of %d in %.1f s",
        delivery, job_id, url, error, attempts + 1, settings.callback_attempts, delay,
    )  # fmt: skip
    return False


def _lease_s(settings: Settings) -> float:
    # Past one attempt's longest time (connect + read), so a live dispatcher's claim holds.
    return 2 * settings.callback_timeout_s + 10.0


def deliver_due(
    redis: Redis,
    settings: Settings,
    http: httpx.Client,
    render: Render,
    *,
    limit: int = 16,
    pool: ThreadPoolExecutor | None = None,
) -> int:
    """Claim the deliveries due now (up to ``limit``) and attempt each. → how many were
    claimed."""
    now = time.time()
    claimed = redis.eval(_CLAIM, 1, DUE_KEY, f"{now}", f"{now + _lease_s(settings)}", str(limit))
    ids = [_text(d) for d in claimed or []]
    if not ids:
        return 0

    def one(delivery: str) -> None:
        try:
            _attempt(redis, settings, http, render, delivery)
        except Exception:
            # Left claimed: due again when its lease ends.
            log.exception("webhook delivery %s: unexpected error", delivery)

    if pool is None:
        for delivery in ids:
            one(delivery)
    else:
        list(pool.map(one, ids))
    return len(ids)


class WebhookDispatcher:
    """The thread of an API process that delivers due webhooks (any number of API processes
    may run one: claims are atomic)."""

    def __init__(
        self, settings: Settings, render: Render, *, interval_s: float = 0.25, workers: int = 4
    ) -> None:
        self.settings = settings
        self.render = render
        self.interval_s = interval_s
        self._workers = workers
        self._stop = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deepscope-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        redis: Redis | None = None
        failing = False
        timeout = httpx.Timeout(self.settings.callback_timeout_s)
        with (
            httpx.Client(timeout=timeout, follow_redirects=False) as http,
            ThreadPoolExecutor(self._workers, thread_name_prefix="deepscope-webhook") as pool,
        ):
            while not self._stop:
                busy = 0
                try:
                    if redis is None:
                        redis = connect(self.settings.resolved_redis_url(), retry_for_s=1.0)
                    busy = deliver_due(redis, self.settings, http, self.render, pool=pool)
                    failing = False
                except (RedisError, ValueError) as exc:
                    if not failing:
                        log.warning("webhooks: Redis unreachable (%s); retrying", exc)
                    failing = True
                except Exception:
                    log.exception("webhooks: unexpected error")
                if not busy:
                    self._wake.wait(self.interval_s)
        if redis is not None:
            with contextlib.suppress(RedisError):
                redis.close()
