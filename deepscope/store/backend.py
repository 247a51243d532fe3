"""The service core without HTTP: register models and datasets, submit, reconcile and cancel
jobs. The API routes and the worker (demo seeding) both go through :class:`Backend`.

Record statuses are written by the workers; when a worker dies before it could write (killed,
timed out, out of memory), :meth:`Backend.refresh_job` / :meth:`Backend.refresh_model` read
RQ's view of the job and settle the record, so nothing stays ``running`` forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from redis import Redis
from redis.client import Pipeline
from redis.lock import Lock

from deepscope import __version__
from deepscope.contract.errors import add_private_root, public_text
from deepscope.contract.status import JobError, JobStatus, ModelStatus
from deepscope.manifest import Manifest
from deepscope.settings import Settings
from deepscope.store import fairness, lifecycle
from deepscope.store.lifecycle import PREDICT_ANALYSIS, Death, JobConflictError
from deepscope.store.queues import (
    PREDICT,
    RUN_JOB,
    VALIDATE_MODEL,
    QueueName,
    RQState,
    cancel_rq_job,
    connect,
    enqueue,
    rq_state,
)
from deepscope.store.records import (
    DatasetRecord,
    JobRecord,
    ModelRecord,
    Records,
    cache_key,
    canonical_json,
    is_id,
    new_id,
    utcnow,
)
from deepscope.store.recovery import is_crash, recover_job, recover_validation
from deepscope.store.storage import Storage, UploadSink

__all__ = [
    "Backend",
    "JobConflictError",
    "QuotaExceededError",
    "Submission",
    "error_from_rq",
    "manifest_sha256",
]

#: Seconds a blob's lock is held at most (storing a large upload on remote storage).
_BLOB_LOCK_S = 600
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")


class QuotaExceededError(ValueError):
    """The tenant has as many models (or datasets) as the deployment allows (HTTP 409)."""


def manifest_sha256(manifest: Manifest) -> str:
    return hashlib.sha256(canonical_json(manifest.model_dump(mode="json")).encode()).hexdigest()


def error_from_rq(state: RQState) -> JobError:
    """RQ's last traceback line → ``{type, message}``; a killed work horse reads as such."""
    line = state.error or "the worker stopped without reporting an error"
    match = _EXC_LINE.match(line)
    if match:
        kind = match.group(1).rsplit(".", 1)[-1]
        message = match.group(2) or kind
        if kind == "JobTimeoutException":
            limit = re.search(r"\((\d+) seconds?\)", message)
            after = f"{limit.group(1)} s" if limit else "its time limit"
            return JobError(
                type="timeout",
                message=f"the job timed out after {after} (DEEPSCOPE_JOB_TIMEOUT)",
            )
        return JobError(type=kind, message=public_text(message))
    if "terminated unexpectedly" in line:
        return JobError(
            type="worker_crashed",
            message="the worker process died while running the job (out of memory, or a crash "
            f"in native code): {line.rstrip(';')}",
        )
    return JobError(type="worker_error", message=public_text(line))


#: Seconds a ready model's record is reused by :meth:`Backend.model_for_job`, and how many.
_READY_CACHE_S = 2.0
_READY_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Submission:
    """A submitted job's record, with its result when the cache answered it at once."""

    record: JobRecord
    result: dict[str, Any] | None = None


class Backend:
    """Records + storage + queues for one deployment."""

    def __init__(
        self, settings: Settings, redis: Redis | None = None, storage: Storage | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis if redis is not None else connect(settings.resolved_redis_url())
        self.records = Records(self.redis)
        self.storage = storage if storage is not None else Storage(settings.storage_location)
        #: (tenant, model id) → (when, record) of ready models: :meth:`model_for_job`.
        self._ready: dict[tuple[str, str], tuple[float, ModelRecord]] = {}
        add_private_root(settings.data_dir)
        if self.storage.local:
            add_private_root(self.storage.root)

    # --- blobs ----------------------------------------------------------------------------

    def _blob_lock(self, sha256: str) -> Lock:
        """Serializes writing a blob with deleting it (one sha256, every process)."""
        lock: Lock = self.redis.lock(
            f"ds:lock:blob:{sha256}",
            timeout=_BLOB_LOCK_S,
            blocking_timeout=_BLOB_LOCK_S,
            sleep=0.01,
        )
        return lock

    @contextmanager
    def stored_upload(self, sink: UploadSink) -> Iterator[str]:
        """Store a finished upload under its sha256 for the registration in the block. → sha256.

        The blob is pinned (a pending reference) while the block runs; afterwards it is
        deleted unless a record references it, so a failed registration (a quota, an invalid
        field, Redis) leaves no file behind. Blobs are shared by content: one that another
        record (or another upload in flight) uses stays.
        """
        sink.close()
        sha = sink.sha256
        pin = self.records.pin_blob(sha)
        try:
            # Under the lock: a concurrent delete of the same blob either ran before (and the
            # file is written again) or sees the pin (and keeps it).
            with self._blob_lock(sha):
                self.storage.put_blob(sink)
            yield sha
        finally:
            if self.records.unpin_blob(sha, pin) == 0:
                self._delete_blob_if_unused(sha)

    def _delete_blob_if_unused(self, sha256: str) -> bool:
        """Delete the blob when no record and no upload in flight references it. → deleted?"""
        with self._blob_lock(sha256):
            if self.records.blob_refs(sha256):
                return False
            self.storage.delete(Storage.blob_key(sha256))
            return True

    def sweep_blobs(self, max_age_s: float) -> list[str]:
        """Delete the blobs nothing references that are older than ``max_age_s`` (left by an
        API process that died between storing and registering an upload, or by a lost Redis),
        stale pending references, and leftover temporary files. → the keys deleted."""
        cutoff = time.time() - max_age_s
        deleted = []
        for key, sha, mtime in list(self.storage.blobs()):
            if mtime is None or mtime > cutoff:
                continue
            if not sha:  # a temporary file of a write that never finished
                with contextlib.suppress(FileNotFoundError):  # another API swept it first
                    self.storage.delete(key)
                    deleted.append(key)
            elif self.records.drop_stale_pins(sha, cutoff) == 0 and self._delete_blob_if_unused(
                sha
            ):
                deleted.append(key)
        return deleted

    # --- models ---------------------------------------------------------------------------

    def register_model(
        self,
        tenant: str,
        manifest: Manifest,
        sha256: str,
        size_bytes: int,
        *,
        name: str | None = None,
        demo: bool = False,
        validate: bool = True,
        labels: dict[str, str] | None = None,
    ) -> ModelRecord:
        """Record an uploaded model (status ``validating``) and queue its validation."""
        rec = ModelRecord(
            id=new_id(),
            tenant=tenant,
            name=name or manifest.name or f"model-{sha256[:8]}",
            format=manifest.format,
            sha256=sha256,
            size_bytes=size_bytes,
            manifest=manifest,
            manifest_sha256=manifest_sha256(manifest),
            input_shape=list(manifest.input_shape) if manifest.input_shape else None,
            demo=demo,
            labels=labels or {},
        )
        limit = None if demo else self.settings.max_models_per_tenant
        if not self.records.put_model(rec, limit=limit):
            raise QuotaExceededError(
                f"model limit reached ({self.settings.max_models_per_tenant} per tenant, "
                "DEEPSCOPE_MAX_MODELS_PER_TENANT); delete one first"
            )
        if validate:
            enqueue(
                self.redis,
                QueueName.CPU.value,
                VALIDATE_MODEL,
                [rec.id],
                job_id=rec.validation_job_id,
                timeout=self.settings.validation_timeout,
                description=f"validate model {rec.id}",
                at_front=True,
                settings=self.settings,
            )
        return rec

    def model_for_job(self, model_id: str, tenant: str) -> ModelRecord | None:
        """The tenant's model, reconciled (:meth:`refresh_model`). A ``ready`` record is kept
        for a moment in this process: it does not change once ready (a deletion is seen
        within ``_READY_CACHE_S``; a job on a model deleted meanwhile fails with "deleted"),
        and submissions of many jobs on one model are the API's hottest path."""
        now = time.monotonic()
        hit = self._ready.get((tenant, model_id))
        if hit is not None and now - hit[0] < _READY_CACHE_S:
            return hit[1]
        rec = self.records.get_model(model_id, tenant)
        if rec is None:
            self._ready.pop((tenant, model_id), None)
            return None
        rec = self.refresh_model(rec)
        if rec.status is ModelStatus.READY:
            if len(self._ready) >= _READY_CACHE_SIZE:
                self._ready.clear()
            self._ready[(tenant, model_id)] = (now, rec)
        return rec

    def refresh_model(self, rec: ModelRecord) -> ModelRecord:
        """Settle a model whose validation job died without writing its verdict."""
        if rec.status is not ModelStatus.VALIDATING:
            return rec
        state = rq_state(self.redis, rec.validation_job_id)
        if state is None:
            reason = "the validation job was lost (Redis lost its data); upload the model again"
        elif state.status == "failed" and is_crash(state.error):
            death = Death(f"its process died ({state.error})")
            settled = recover_validation(
                self.redis,
                self.settings,
                rec.id,
                death,
                expected_attempts=rec.validation_attempts,
            )
            return settled or rec
        elif state.status in ("failed", "stopped", "canceled"):
            err = error_from_rq(state)
            reason = f"validation failed: {err.message}"
        else:
            return rec
        return lifecycle.settle_validation(self.records, rec, reason) or rec

    def delete_model(self, rec: ModelRecord) -> None:
        self._ready.pop((rec.tenant, rec.id), None)
        if self.records.delete_model(rec):
            self._delete_blob_if_unused(rec.sha256)

    # --- datasets -------------------------------------------------------------------------

    def register_dataset(self, rec: DatasetRecord) -> None:
        """Record an uploaded dataset; QuotaExceededError when the tenant has as many as the
        deployment allows (checked and written in one transaction)."""
        if not self.records.put_dataset(rec, limit=self.settings.max_datasets_per_tenant):
            raise QuotaExceededError(
                f"dataset limit reached ({self.settings.max_datasets_per_tenant} per tenant, "
                "DEEPSCOPE_MAX_DATASETS_PER_TENANT); delete one first"
            )

    def delete_dataset(self, rec: DatasetRecord) -> None:
        if self.records.delete_dataset(rec):
            self._delete_blob_if_unused(rec.sha256)

    # --- jobs -----------------------------------------------------------------------------

    def submit_analysis(
        self,
        tenant: str,
        model: ModelRecord,
        analysis: str,
        params: BaseModel,
        dataset: str | None,
        *,
        labels: dict[str, str] | None = None,
        callback_url: str | None = None,
    ) -> Submission:
        """Queue an analysis, or answer it from the result cache at once (``cached: true``).

        ``params`` is the validated params model (its defaults are part of the cache key).
        ``callback_url`` (checked by the caller) receives the job when it ends, a cache hit
        included (:mod:`deepscope.store.webhooks`).
        """
        params_json: dict[str, Any] = params.model_dump(mode="json", exclude={"analysis"})
        key = cache_key(
            model_sha256=model.sha256,
            manifest_sha256=model.manifest_sha256,
            dataset=dataset,
            analysis=analysis,
            params=params_json,
            version=__version__,
        )
        common: dict[str, Any] = {
            "tenant": tenant,
            "analysis": analysis,
            "params": params_json,
            "model_id": model.id,
            "model_sha256": model.sha256,
            "dataset": dataset,
            "cache_key": key,
            "labels": labels or {},
            "callback_url": callback_url,
        }
        # One round trip for the cache lookup and the tenant's admission (the submission path
        # is the API's hottest): a cached answer takes no slot, and comes with the cached
        # job's record and result. When the job's queue is known without asking Redis, the
        # same script also writes the record and the queue entry if it admits the job, so a
        # new computation costs that one round trip.
        job_id = new_id()
        queue = lifecycle.fixed_queue(analysis, gpu_fallback=self.settings.gpu_queue_fallback)
        cache_name = self.records.cache_name(tenant, key)
        rec = None if queue is None else self._queued_record(job_id, queue, common)
        admitted, cached = fairness.admit_unless_cached(
            self.redis,
            self.settings,
            tenant,
            job_id,
            cache_name,
            hit_prefixes=(Records.JOB_KEY_PREFIX, Records.RESULT_KEY_PREFIX),
            then=() if rec is None else self._queue_commands(rec, model),
        )
        if admitted and rec is not None:
            return Submission(rec)  # written and queued by the script
        hit = None if cached is None else self._cache_source(tenant, key, cached)
        if cached is not None and hit is None:
            admitted = fairness.admit(self.redis, self.settings, tenant, job_id)
        if hit is not None:
            source, result = hit
            now = utcnow()
            rec = JobRecord(
                id=job_id,
                status=JobStatus.SUCCEEDED,
                progress=1.0,
                cached=True,
                source_job=source.source_job or source.id,
                started_at=now,
                finished_at=now,
                **common,
            )
            self.records.put_job(rec)
            return Submission(rec, result)
        if rec is None:
            queue = lifecycle.queue_for(
                self.redis, analysis, gpu_fallback=self.settings.gpu_queue_fallback
            )
            rec = self._queued_record(job_id, queue, common)
        if not admitted:
            # The tenant's share of the queues is in use: the job waits its turn, and is
            # queued when one of the tenant's jobs ends (fairness.release).
            ahead = fairness.waiting(self.redis, tenant)
            rec.message = (
                f"waiting for its turn: {ahead} of your jobs wait before it, and "
                f"{self.settings.tenant_running_jobs} run or are queued "
                "(DEEPSCOPE_TENANT_RUNNING_JOBS)"
            )
            self.records.put_job(rec)
            fairness.wait_turn(self.redis, self.settings, tenant, rec.id)
            # A slot held by a job that ended without releasing it (its process died) is
            # taken back here rather than only by the reaper.
            fairness.repair(self.redis, self.settings, tenants=[tenant])
            return Submission(self.records.get_job(rec.id) or rec)
        # The record and the queue entry in one transaction: one round trip, and never one
        # without the other.
        with self.redis.pipeline() as pipe:
            self._write_queued(rec, model, pipe)
            pipe.execute()
        return Submission(rec)

    @staticmethod
    def _queued_record(job_id: str, queue: str, common: dict[str, Any]) -> JobRecord:
        rec = JobRecord(id=job_id, queue=queue, **common)
        rec.source_job = rec.id
        return rec

    def _write_queued(self, rec: JobRecord, model: ModelRecord, pipe: Pipeline) -> None:
        """Add to ``pipe`` (a transaction) a new job's record and its RQ queue entry."""
        pipe.multi()  # explicitly: RQ only adds to a transaction that has begun
        self.records.put_job(rec, pipeline=pipe)
        enqueue(
            self.redis,
            rec.queue or QueueName.CPU.value,
            RUN_JOB,
            [rec.id],
            job_id=rec.id,
            timeout=self.settings.job_timeout,
            description=f"{rec.analysis} on model {model.id}",
            settings=self.settings,
            pipeline=pipe,
        )

    def _queue_commands(self, rec: JobRecord, model: ModelRecord) -> list[tuple[Any, ...]]:
        """The commands of :meth:`_write_queued`, for the admission script to run: written
        on a transaction that is never executed."""
        with self.redis.pipeline() as pipe:
            self._write_queued(rec, model, pipe)
            return [args for args, _options in pipe.command_stack]

    def _cache_source(
        self, tenant: str, key: str, cached: fairness.CacheHit
    ) -> tuple[JobRecord, dict[str, Any]] | None:
        """The succeeded job the cache names for ``key`` and its result, if that still exists
        (else the entry is dropped). The cache names jobs that computed their result."""
        src, result = (None, None)
        if is_id(cached.job_id):
            src, result = self.records.decode_job_and_result(cached.record, cached.result, tenant)
        if src is not None and src.source_job not in (None, src.id):
            result = self.records.get_result(src.source_job)
        if src is None or src.status is not JobStatus.SUCCEEDED or result is None:
            self.records.cache_drop(tenant, key)
            return None
        return src, result

    def submit_predict(
        self, tenant: str, model: ModelRecord, params: dict[str, Any], *, urgent: bool
    ) -> JobRecord:
        """Queue a prediction whose inputs are already stored under ``inputs/{tenant}/{id}``.

        ``params`` must hold ``job_id`` (the id the inputs were stored under)."""
        job_id = str(params["job_id"])
        rec = JobRecord(
            id=job_id,
            tenant=tenant,
            analysis=PREDICT_ANALYSIS,
            params={k: v for k, v in params.items() if k != "job_id"},
            model_id=model.id,
            model_sha256=model.sha256,
            queue=QueueName.CPU.value,
            source_job=job_id,
        )
        self.records.put_job(rec)
        enqueue(
            self.redis,
            QueueName.CPU.value,
            PREDICT,
            [rec.id],
            job_id=rec.id,
            timeout=self.settings.job_timeout,
            description=f"predict with model {model.id}",
            at_front=urgent,
            settings=self.settings,
        )
        return rec

    def refresh_job(self, rec: JobRecord) -> tuple[JobRecord, dict[str, Any]]:
        """Settle a job whose worker died; also returns RQ's meta (live progress)."""
        if rec.status.terminal:
            return rec, {}
        state = rq_state(self.redis, rec.id)
        meta = dict(state.meta or {}) if state is not None else {}
        if state is None and rec.status is JobStatus.QUEUED and rec.analysis != PREDICT_ANALYSIS:
            if fairness.is_waiting(self.redis, rec.tenant, rec.id):
                return rec, meta  # waiting for its tenant's turn: not in RQ yet
            # Promoted between the two reads: RQ has it now.
            state = rq_state(self.redis, rec.id)
            meta = dict(state.meta or {}) if state is not None else {}
        if state is None:
            error = JobError(
                type="lost",
                message="the queue lost this job (Redis lost its data); submit it again",
            )
            final = JobStatus.FAILED
        elif state.status == "failed" and is_crash(state.error):
            # The job's process died without a word (killed, out of memory): run it again
            # while retries are left (the worker that saw it die usually did so already).
            death = Death(f"its process died ({state.error})")
            settled = recover_job(
                self.redis, self.settings, rec.id, death, expected_attempts=rec.attempts
            )
            return settled or rec, meta
        elif state.status == "failed":
            error, final = error_from_rq(state), JobStatus.FAILED
        elif state.status in ("stopped", "canceled"):
            error, final = None, JobStatus.CANCELED
        elif state.status == "finished":
            # run_job writes its record before it returns; a finished RQ job with an open
            # record means the record write itself failed.
            error = JobError(type="worker_error", message="the worker finished without a result")
            final = JobStatus.FAILED
        else:
            return rec, meta
        settled = lifecycle.settle(self.records, rec, final, error)
        if settled is not None and settled.status.terminal:
            self.job_ended(settled)
        return settled or rec, meta

    def cancel_job(self, rec: JobRecord) -> JobRecord:
        """Cancel a queued job, stop a running one. JobConflictError when it already finished."""
        updated = lifecycle.cancel(self.records, rec.id)
        # A forking worker stops at once; a GPU worker (in-process) stops at its next progress
        # report, when it sees ``cancel_requested``.
        cancel_rq_job(self.redis, rec.id)
        if updated is not None:
            self.job_ended(updated)
        return updated or rec

    def job_ended(self, rec: JobRecord) -> None:
        """An analysis job ended (or will not run): its slot goes to the tenant's next job."""
        if rec.analysis != PREDICT_ANALYSIS:
            fairness.release(self.redis, self.settings, rec.tenant, rec.id)

    def result_of(self, rec: JobRecord) -> dict[str, Any] | None:
        if rec.status is not JobStatus.SUCCEEDED:
            return None
        return self.records.get_result(rec.source_job or rec.id)
