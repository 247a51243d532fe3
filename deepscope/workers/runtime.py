"""What every job function of a worker shares: its configuration (device, model cache), the
backend it talks to, progress reports, the error a failure records, and the blobs it reads."""

from __future__ import annotations

import dataclasses
import functools
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis import Redis
from rq import get_current_job

from deepscope.analyses.run import resolve_device
from deepscope.contract.errors import user_message
from deepscope.contract.result import Result
from deepscope.contract.status import JobError, JobStatus
from deepscope.settings import Settings
from deepscope.store import lifecycle
from deepscope.store.backend import Backend
from deepscope.store.queues import connect
from deepscope.store.records import JobRecord
from deepscope.store.storage import Storage

if TYPE_CHECKING:  # (computing reads blobs through this module)
    from deepscope.workers.computing import Run

__all__ = [
    "JobCanceledError",
    "ProgressReporter",
    "backend",
    "config",
    "configure",
    "device",
    "fail",
    "job_error",
    "local_blob",
    "settings",
    "single_threaded",
    "storage",
    "succeed",
]

_PROGRESS_INTERVAL_S = 0.5


class JobCanceledError(Exception):
    """The job's record says it was canceled: stop where we are."""


@dataclasses.dataclass
class Config:
    device: str = "cpu"
    #: Loaded models kept in this process (count), and the bytes of their files at most.
    model_cache: int = 0
    model_cache_bytes: int | None = None
    #: The running job's connection to the worker's helper, the helper's pid and the run
    #: handed to it (set by the worker before it forks the job's process); None: the job
    #: computes itself.
    helper: socket.socket | None = None
    helper_pid: int | None = None
    helper_run: Run | None = None


_CONFIG = Config()


def config() -> Config:
    return _CONFIG


def configure(
    *, device: str = "cpu", model_cache: int = 0, model_cache_bytes: int | None = None
) -> None:
    """Set by the worker process: where jobs compute (``cpu``, ``cuda``, ``auto`` — resolved at
    job time) and how many loaded models to keep (``model_cache``; their files ``model_cache_bytes``
    at most), in the worker's own process (a forking worker loads them before it forks)."""
    from deepscope.workers import model_cache as cache

    _CONFIG.device = device
    _CONFIG.model_cache = model_cache
    _CONFIG.model_cache_bytes = model_cache_bytes
    cache.clear()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Torch on one thread in the block. A process that forks afterwards (a CPU worker) must
    compute only so: GNU OpenMP does not survive a fork after it ran a parallel region (the
    child hangs in its first one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()


def backend(redis: Redis | None = None) -> Backend:
    """The backend of ``redis``, else of the running job's Redis (or the settings' Redis
    outside a job)."""
    current = settings()
    if redis is None:
        job = get_current_job()
        redis = job.connection if job is not None else connect(current.resolved_redis_url())
    return Backend(current, redis=redis, storage=storage(current.storage_location))


@functools.lru_cache(maxsize=4)
def storage(location: str) -> Storage:
    return Storage(location)


def device() -> str:
    """The device this job computes on, chosen now (never at import: a forked work horse must
    not inherit a CUDA context)."""
    return str(resolve_device(None if _CONFIG.device == "auto" else _CONFIG.device))


def job_error(exc: BaseException) -> JobError:
    """What a failed job records: a stable type and one readable line."""
    kind = type(exc).__name__
    if kind == "JobTimeoutException":
        job = get_current_job()
        limit = job.timeout if job is not None and job.timeout else settings().job_timeout
        return JobError(
            type="timeout", message=f"the job timed out after {limit} s (DEEPSCOPE_JOB_TIMEOUT)"
        )
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
        allowance = settings().job_memory_bytes() // (1024 * 1024)
        what = f"the {allowance} MiB a job may use" if allowance else "the memory available"
        detail = user_message(exc).split("DefaultCPUAllocator: ")[-1]
        return JobError(
            type="out_of_memory",
            message=f"the job ran out of memory: it needed more than {what} "
            f"(DEEPSCOPE_JOB_MEMORY_MB): {detail}",
        )
    if isinstance(exc, ValueError):
        return JobError(type="invalid_input", message=user_message(exc))
    return JobError(type=kind, message=user_message(exc))


def succeed(backend: Backend, job: JobRecord, result: Result) -> JobRecord | None:
    """Store ``result`` and move the run ``job`` to ``succeeded`` (or leave it canceled).

    → the record, or None when this run was given up for dead and queued again meanwhile:
    the new run has the last word (a job never succeeds twice)."""
    backend.records.put_result(job.id, result.model_dump(mode="json", by_alias=True))
    done = lifecycle.finish(
        backend.records, job.id, JobStatus.SUCCEEDED, run_started_at=job.started_at
    )
    if done is None or done.started_at != job.started_at:
        return None
    return done


def fail(backend: Backend, job: JobRecord, exc: Exception) -> dict[str, Any]:
    """The run ``job`` failed with ``exc`` (being handled): record it ``failed``. → RQ's return
    value for a user error (``ValueError``: the job failed, the worker did not); anything else
    is raised again, so that RQ keeps its traceback."""
    lifecycle.finish(
        backend.records, job.id, JobStatus.FAILED, job_error(exc), run_started_at=job.started_at
    )
    if isinstance(exc, ValueError):
        return {"status": "failed", "error": user_message(exc)}
    raise exc


@contextmanager
def local_blob(
    storage: Storage, sha256: str, name: str, *, any_name: bool = False
) -> Iterator[Path]:
    """The blob as a local file called ``name`` (a link on local storage, else a copy).

    ``any_name``: the reader does not go by the file's name (model files are told apart by
    their content), so on local storage the stored file itself is given, no link made."""
    if any_name:
        local = storage.local_path(Storage.blob_key(sha256))
        if local is not None:
            if not local.is_file():
                raise ValueError("the uploaded file is missing from storage")
            yield local
            return
    with tempfile.TemporaryDirectory(prefix="deepscope-") as tmp:
        target = Path(tmp) / name
        key = Storage.blob_key(sha256)
        local = storage.local_path(key)
        if local is not None:
            if not local.is_file():
                raise ValueError("the uploaded file is missing from storage")
            target.symlink_to(local)
        else:
            storage.get_file(key, target)
        yield target


def _phase(message: str) -> str:
    """What a progress message says the job is doing, without its counts: ``"optimizing"`` for
    ``"optimizing: step 3/512, ..."``, ``"scoring training images"``."""
    return re.sub(r"\d+", "", message.split(":", 1)[0]).strip()


class ProgressReporter:
    """``progress(fraction, message)`` → the RQ job's meta, at most every 0.5 s within a phase
    (the first report of each phase always goes through, so the message says what the job
    does now); also where a canceled job notices (a worker that does not fork cannot be killed
    from outside). The final ``1.0`` is not sent: the job's status says it, and each report
    costs two Redis round trips, a fair share of a short job."""

    def __init__(self, backend: Backend, job_id: str, said: str | None = None) -> None:
        """``said``: the message the job's record says already (:func:`lifecycle.start`), so
        that reporting it again at once costs nothing."""
        self.backend = backend
        self.job_id = job_id
        self.last = time.monotonic() if said is not None else 0.0
        self.phase: str | None = None if said is None else _phase(said)

    def __call__(self, fraction: float, message: str) -> None:
        if fraction >= 1.0:
            return
        now = time.monotonic()
        phase = _phase(message)
        if now - self.last < _PROGRESS_INTERVAL_S and phase == self.phase:
            return
        self.last = now
        self.phase = phase
        job = get_current_job()
        if job is not None:
            job.meta["progress"] = round(float(fraction), 4)
            job.meta["message"] = message
            job.save_meta()  # type: ignore[no-untyped-call]
        rec = self.backend.records.get_job(self.job_id)
        if rec is None or rec.cancel_requested:
            raise JobCanceledError(self.job_id)
