"""Prometheus metrics of the API: requests, their durations, queue depth, running jobs, live
workers, submitted jobs, jobs by analysis and status, job run times. A registry per app, so that
several apps (tests) do not collide.

Job statuses change in the workers, so the job counts and durations are not counted in this
process: :class:`~deepscope.store.records.Records` keeps them in Redis (in the transaction of
each status change) and every API replica exports the same totals, read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq.registry import StartedJobRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepscope.settings import Settings
from deepscope.store.queues import QueueName, get_queue
from deepscope.store.records import DURATION_BUCKETS, Records, job_stats
from deepscope.store.recovery import live_workers

__all__ = ["JobStatsCollector", "Metrics", "MetricsMiddleware"]


class JobStatsCollector(Collector):
    """``deepscope_jobs_total{analysis,status}`` and ``deepscope_job_duration_seconds`` from the
    last snapshot of Redis' statistics (taken by :meth:`Metrics.refresh`)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.durations: dict[tuple[str, str], tuple[list[int], float]] = {}

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        jobs = CounterMetricFamily(
            "deepscope_jobs",
            "jobs that entered each status, by analysis (cached answers enter succeeded)",
            labels=["analysis", "status"],
        )
        durations = HistogramMetricFamily(
            "deepscope_job_duration_seconds",
            "run time of finished jobs (started to finished), by analysis and final status",
            labels=["analysis", "status"],
        )
        return jobs, durations

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        jobs, durations = self._families()
        for (analysis, status), value in sorted(self.counts.items()):
            jobs.add_metric([analysis, status], value)
        bounds = [*(str(b) for b in DURATION_BUCKETS), "+Inf"]
        for (analysis, status), (per_bucket, total) in sorted(self.durations.items()):
            cumulative, running = [], 0
            for bound, count in zip(bounds, per_bucket, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            durations.add_metric([analysis, status], cumulative, total)
        yield jobs
        yield durations


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "deepscope_http_requests_total",
            "HTTP requests by route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "deepscope_http_request_duration_seconds",
            "HTTP request durations",
            ["method", "route"],
            registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "deepscope_jobs_submitted_total",
            "jobs submitted, by analysis and whether the result cache answered",
            ["analysis", "cached"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "deepscope_queue_depth", "jobs waiting per queue", ["queue"], registry=self.registry
        )
        self.workers = Gauge(
            "deepscope_workers", "live workers per queue", ["queue"], registry=self.registry
        )
        self.running = Gauge(
            "deepscope_jobs_running", "jobs a worker is running, per queue", ["queue"],
            registry=self.registry,
        )  # fmt: skip
        self.job_stats = JobStatsCollector()
        self.registry.register(self.job_stats)
        # Each label set's children, found once: ``labels()`` builds and looks up its key
        # under a lock on every call, and every request counts (the label sets are few:
        # route templates, methods, statuses, analyses).
        self._observed: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._submitted: dict[tuple[str, bool], Counter] = {}

    def refresh(self, redis: Redis, settings: Settings) -> None:
        """Read queue depths, running jobs, live workers (by heartbeat) and job statistics
        from Redis (at scrape time)."""
        try:
            alive = live_workers(redis, settings)
            for q in QueueName:
                queue = get_queue(redis, q.value)
                self.queue_depth.labels(q.value).set(len(queue))
                self.running.labels(q.value).set(StartedJobRegistry(queue=queue).count)
                self.workers.labels(q.value).set(alive.get(q.value, 0))
            counts, seconds = Records(redis).job_stats()
            self.job_stats.counts, self.job_stats.durations = job_stats(counts, seconds)
        except RedisError:
            pass

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        children = self._observed.get((method, route, status))
        if children is None:
            children = self._observed[(method, route, status)] = (
                self.requests.labels(method, route, str(status)),
                self.duration.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def submitted(self, analysis: str, cached: bool) -> None:
        """Count a submitted job (``deepscope_jobs_submitted_total``)."""
        child = self._submitted.get((analysis, cached))
        if child is None:
            child = self._submitted[(analysis, cached)] = self.jobs_submitted.labels(
                analysis, str(cached).lower()
            )
        child.inc()


class MetricsMiddleware:
    """Counts and times every HTTP request by route template and status (a plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` costs a task group and memory streams per
    request)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router puts the matched route in the scope; its template (not the raw path)
            # keeps the label set small.
            template = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - start)
