"""Worker processes: ``deepscope worker [--queues cpu,gpu]``.

* CPU workers fork a work horse per job (RQ's ``Worker``), so a hostile or broken model can
  only take down that job. Torch, the analyses and the registry are imported *before* the
  first fork, so each horse starts warm; the parent warms up single-threaded only, because
  GNU OpenMP does not survive a fork after it ran a parallel region (the child hangs). A fresh
  horse still pays a page fault for every page it writes, so the worker keeps a warm helper
  process that computes the analyses of models without code for their horses
  (:mod:`deepscope.workers.helper`); for other jobs it loads the model itself before it forks,
  kept for later jobs (``model_cache.prefetch``).
* GPU workers (any worker listening on ``gpu``) run jobs in-process (like RQ's
  ``SimpleWorker``): one long-lived process owns the device and keeps recently used models on
  it (LRU by sha256). The parent never touches CUDA before that; the device is chosen at job
  time. Jobs on code-bearing models still get a forked, limited process of their own.
* Every job process has a memory and a time limit, every worker a heartbeat; a job whose
  process or worker died is retried or failed, never left ``running``
  (:mod:`deepscope.workers.supervision`, :mod:`deepscope.store.recovery`). A worker whose RQ
  loop ends on an error (Redis gone longer than the client's retries) serves again.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import time
from collections.abc import Sequence
from enum import StrEnum

from redis.exceptions import RedisError
from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer

from deepscope.settings import Settings
from deepscope.store.queues import WORKER_TTL, QueueName, connect
from deepscope.store.records import Records
from deepscope.store.recovery import forget
from deepscope.store.storage import Storage
from deepscope.workers.helper import HelperProcess
from deepscope.workers.supervision import ForkingWorker, InProcessWorker, Supervisor

__all__ = ["WorkerKind", "parse_queues", "preload", "run_worker"]

log = logging.getLogger("deepscope.worker")


class WorkerKind(StrEnum):
    AUTO = "auto"
    FORK = "fork"
    SIMPLE = "simple"


#: Models a CPU worker keeps loaded at most (within DEEPSCOPE_CPU_MODEL_CACHE_MB).
_CPU_MODELS = 8


def parse_queues(text: str) -> list[str]:
    """``"cpu,gpu"`` → ``["cpu", "gpu"]``; ValueError for unknown names."""
    valid = [q.value for q in QueueName]
    names = [q.strip() for q in text.split(",") if q.strip()]
    bad = [q for q in names if q not in valid]
    if not names or bad:
        raise ValueError(f"unknown queue {', '.join(bad) or '(none)'}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def preload() -> list[str]:
    """Import everything a job needs and warm it up, single-threaded. → architecture names."""
    import torch

    import deepscope.workers.analysis_job
    import deepscope.workers.demo
    import deepscope.workers.validation  # noqa: F401  (the job functions RQ will call)
    from deepscope import render
    from deepscope.analyses.registry import list_analyses, load_compute
    from deepscope.models.datasets import load_dataset
    from deepscope.models.registry import get_model, list_models
    from deepscope.workers import runtime

    with runtime.single_threaded():
        names = list_models()
        # Lazy kernels and the built-in digits (cached) are paid once here, not per job.
        model = get_model("fcnn1", num_classes=10)
        with torch.no_grad():
            model(torch.zeros(2, 1, 28, 28))
        torch.linalg.svdvals(torch.randn(8, 8, dtype=torch.float64))
        load_dataset("digits", "train")
        # Fonts, colour tables, caption measurements and matplotlib's Agg backend load on
        # the first drawing: paid here once, inherited by every forked job.
        render.warm_up()
        for spec in list_analyses():
            load_compute(spec)  # every analysis's worker side, imported once before forking
    return names


def _stopping(worker: ForkingWorker) -> bool:
    """Was the worker asked to stop (SIGTERM/SIGINT), rather than left by an error?"""
    return bool(worker._stop_requested or worker._shutdown_requested_date is not None)


def run_worker(
    settings: Settings,
    queues: Sequence[str],
    *,
    kind: WorkerKind = WorkerKind.AUTO,
    name: str | None = None,
    burst: bool = False,
) -> bool:
    """Serve ``queues`` until stopped (SIGTERM/SIGINT: finish the current job, then exit).

    Returns whether any job ran (for ``burst``).
    """
    from deepscope.workers import runtime

    if kind is WorkerKind.AUTO:
        kind = WorkerKind.SIMPLE if QueueName.GPU.value in queues else WorkerKind.FORK
    redis = connect(settings.resolved_redis_url())
    # Storage's filesystem (s3fs) is imported once here, not in every work horse; a missing one
    # stops the worker at start, as it stops the API.
    Storage.preload(settings.storage_location)
    names = preload()
    Records(redis).set_archs(names)
    # The jobs' settings and storage, built once here and inherited by every work horse
    # (reading the environment into Settings costs each forked job several milliseconds).
    runtime.settings()
    runtime.storage(settings.storage_location)
    helper: HelperProcess | None = None
    if kind is WorkerKind.SIMPLE:
        runtime.configure(device="auto", model_cache=settings.gpu_model_cache)
        worker_class: type[ForkingWorker] = InProcessWorker
    else:
        budget = settings.cpu_model_cache_mb * 1024 * 1024
        runtime.configure(
            device="cpu", model_cache=_CPU_MODELS if budget else 0, model_cache_bytes=budget
        )
        worker_class = ForkingWorker
        # Everything imported and warmed so far is shared with every forked work horse, page by
        # page, until one writes to it. The garbage collector's passes write to every object
        # they visit, so a horse's first full one would copy the parent's whole heap (torch
        # included); frozen objects are never visited.
        gc.collect()
        gc.freeze()
        if settings.worker_helper:
            # Forked now, warm and before any thread starts (see workers/helper.py).
            helper = HelperProcess(settings)
            helper.start()
    worked = False
    supervisor: Supervisor | None = None
    base_name = name
    try:
        for restart in itertools.count():
            worker = worker_class(
                list(queues),
                connection=redis,
                serializer=JSONSerializer,
                worker_ttl=WORKER_TTL,
                name=name,
                settings=settings,
                helper=helper,
            )
            if supervisor is None:
                supervisor = Supervisor(settings, worker.name)
                supervisor.start()
            elif supervisor.worker_name != worker.name:
                forget(supervisor.redis, supervisor.worker_name)
                supervisor.worker_name = worker.name
            log.info(
                "deepscope worker %s (pid %d, %s) on queues %s",
                worker.name,
                os.getpid(),
                kind.value,
                ",".join(queues),
            )
            try:
                worked |= bool(worker.work(burst=burst, logging_level="INFO", with_scheduler=False))
            except RedisError as exc:
                log.warning("worker %s lost Redis (%s)", worker.name, exc)
            # RQ's loop ends on a stop request, or on an error it does not handle (Redis gone
            # for longer than the client's retries): then serve again rather than exit.
            if burst or _stopping(worker):
                return worked
            try:
                time.sleep(1.0)
            except StopRequested:  # SIGTERM meanwhile, through RQ's handler
                return worked
            if _stopping(worker):
                return worked
            name = f"{base_name or worker.name}.{restart + 1}"
            log.warning("worker %s stopped on an error; serving again as %s", worker.name, name)
    finally:
        if supervisor is not None:
            supervisor.stop()
        if helper is not None:
            helper.stop()
    return worked
