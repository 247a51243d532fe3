"""The job lifecycle, in one place: every status change of a job (and of a model's
validation), and the queue a job goes to.

::

    queued ──start──▶ running ──finish──▶ succeeded | failed | canceled
      │  ▲                │
      │  └──retry─────────┤   (its worker died; retries left)
      │  └──requeue───────┤   (its worker was stopped; past the grace period)
      └──cancel / settle──┴──▶ canceled | failed

The submitter (``Backend.submit_analysis``), the worker (``start`` / ``finish``), recovery
(``retry_or_fail``, ``requeue``), the API's reconciliation with RQ (``settle``) and cancel all
change statuses only through these functions. Each is a read-modify-write of the record under WATCH
(:meth:`Records.update_job`), so when several processes race (a worker finishing while a
reaper decides it died), exactly one transition wins and the others see the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis import Redis

from deepscope.analyses.registry import Resource, get_analysis
from deepscope.contract.result import PREDICT_ANALYSIS
from deepscope.contract.status import JobError, JobStatus, ModelStatus
from deepscope.store.queues import QueueName, alive_workers
from deepscope.store.records import JobRecord, ModelRecord, Records, utcnow

__all__ = [
    "PREDICT_ANALYSIS",
    "Death",
    "IllegalTransitionError",
    "JobConflictError",
    "cancel",
    "finish",
    "fixed_queue",
    "queue_for",
    "requeue",
    "retry_or_fail",
    "retry_or_fail_validation",
    "settle",
    "settle_validation",
    "start",
    "validation_verdict",
]


#: Which status may follow which. Anything else is a bug in the caller.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


class IllegalTransitionError(RuntimeError):
    """A status change the lifecycle does not allow (a bug, never a user error)."""


class JobConflictError(ValueError):
    """The job is already in a state the request cannot change (cancel of a finished job)."""


@dataclass(frozen=True)
class Death:
    """Why a job stopped without writing its outcome.

    Attributes:
        reason: one clause for the error message ("its process was killed by SIGKILL").
        timed_out_after: the time limit in seconds when the job was killed for exceeding it
            (then it is not retried).
    """

    reason: str
    timed_out_after: int | None = None


def _move(job: JobRecord, status: JobStatus) -> None:
    if status is not job.status and status not in TRANSITIONS[job.status]:
        raise IllegalTransitionError(f"job {job.id}: {job.status.value} → {status.value}")
    job.status = status


def fixed_queue(analysis: str, *, gpu_fallback: bool) -> str | None:
    """:func:`queue_for` when it does not depend on the live workers (no Redis read), else
    None (a gpu analysis where the deployment falls back to ``cpu``)."""
    if analysis == PREDICT_ANALYSIS or get_analysis(analysis).resource is Resource.CPU:
        return QueueName.CPU.value
    return None if gpu_fallback else QueueName.GPU.value


def queue_for(redis: Redis, analysis: str, *, gpu_fallback: bool) -> str:
    """The queue of a job: its analysis's resource (the registry), falling back to ``cpu``
    when no gpu worker is alive and the deployment allows it. Predictions go to ``cpu``."""
    fixed = fixed_queue(analysis, gpu_fallback=gpu_fallback)
    if fixed is not None:
        return fixed
    if alive_workers(redis).get(QueueName.GPU.value, 0) == 0:
        return QueueName.CPU.value
    return QueueName.GPU.value


def start(records: Records, job_id: str, message: str | None = None) -> JobRecord | None:
    """queued → running, by the worker that took it, saying what it does first (``message``).
    None when the job is not queued (canceled meanwhile, or another run took it)."""

    def change(current: JobRecord) -> JobRecord | None:
        if current.status is not JobStatus.QUEUED or current.cancel_requested:
            return None
        _move(current, JobStatus.RUNNING)
        current.started_at = utcnow()
        current.progress = 0.0
        current.message = message
        return current

    rec = records.update_job(job_id, change)
    if rec is None or rec.status is not JobStatus.RUNNING:
        return None
    return rec


def finish(
    records: Records,
    job_id: str,
    status: JobStatus,
    error: JobError | None = None,
    *,
    run_started_at: datetime | None = None,
) -> JobRecord | None:
    """running → succeeded | failed | canceled, by the worker that ran it. A job canceled
    meanwhile stays canceled.

    ``run_started_at`` (the ``started_at`` that :func:`start` gave this run) makes it the run's
    own word only: a run that was given up for dead and queued again (then started anew)
    cannot finish the new run, so a job never succeeds twice.
    """

    def change(current: JobRecord) -> JobRecord | None:
        if current.status is not JobStatus.RUNNING:
            return None
        if run_started_at is not None and current.started_at != run_started_at:
            return None
        _move(current, status)
        current.error = error
        current.finished_at = utcnow()
        current.message = None
        if status is JobStatus.SUCCEEDED:
            current.progress = 1.0
        return current

    return records.update_job(job_id, change)


def cancel(records: Records, job_id: str) -> JobRecord | None:
    """queued | running → canceled, by the user. JobConflictError when it already finished."""

    def change(current: JobRecord) -> JobRecord | None:
        if current.status.terminal:
            raise JobConflictError(f"job {current.id} already {current.status.value}")
        current.cancel_requested = True
        _move(current, JobStatus.CANCELED)
        current.finished_at = utcnow()
        return current

    return records.update_job(job_id, change)


def requeue(records: Records, job_id: str, reason: str) -> JobRecord | None:
    """running (or queued) → queued, because its worker was told to stop and the job did not
    finish within the worker's grace period. No retry is spent: nothing failed. → the record
    when it moved; None when it had finished, was canceled, or is gone."""
    moved = False

    def change(current: JobRecord) -> JobRecord | None:
        nonlocal moved
        moved = False  # called again when the record changed meanwhile (WATCH)
        if current.status.terminal or current.cancel_requested:
            return None
        _move(current, JobStatus.QUEUED)
        current.started_at = None
        current.progress = 0.0
        current.message = f"queued again: {reason}"
        moved = True
        return current

    rec = records.update_job(job_id, change)
    return rec if moved else None


def settle(
    records: Records, rec: JobRecord, status: JobStatus, error: JobError | None
) -> JobRecord | None:
    """An unfinished job → ``status`` because RQ says its run ended without the worker writing
    it (the API reconciling). Only the run ``rec`` describes: a retry queued since is left."""

    def change(current: JobRecord) -> JobRecord | None:
        if current.status.terminal or current.attempts != rec.attempts:
            return None
        _move(current, status)
        current.error = error
        current.finished_at = utcnow()
        return current

    return records.update_job(rec.id, change)


def _death_error(death: Death, attempts: int, what: str) -> JobError:
    if death.timed_out_after is not None:
        return JobError(
            type="timeout",
            message=f"{what} timed out after {death.timed_out_after} s and was stopped "
            "(DEEPSCOPE_JOB_TIMEOUT)",
        )
    runs = "once" if attempts == 1 else f"{attempts} times"
    return JobError(
        type="worker_died",
        message=f"worker died while running {what}: {death.reason} (tried {runs})",
    )


def retry_or_fail(
    records: Records,
    job_id: str,
    death: Death,
    *,
    retries: int,
    expected_attempts: int | None = None,
) -> tuple[JobRecord | None, str]:
    """A job whose run died: → queued again while fewer than ``retries`` retries were made
    (not after a timeout), else → failed (``worker_died`` or ``timeout``).

    Returns ``(record, outcome)``, outcome ``retried``, ``failed`` or ``unchanged`` (it finished
    or was canceled, or was retried since ``expected_attempts`` was read).
    """
    outcome = "unchanged"

    def change(current: JobRecord) -> JobRecord | None:
        nonlocal outcome
        if current.status.terminal or current.cancel_requested:
            return None
        if expected_attempts is not None and current.attempts != expected_attempts:
            return None
        if death.timed_out_after is None and current.attempts < retries:
            outcome = "retried"
            current.attempts += 1
            _move(current, JobStatus.QUEUED)
            current.started_at = None
            current.progress = 0.0
            current.message = (
                f"retry {current.attempts} of {retries}: the worker died ({death.reason})"
            )
            return current
        outcome = "failed"
        _move(current, JobStatus.FAILED)
        current.error = _death_error(death, current.attempts + 1, "the job")
        current.finished_at = utcnow()
        current.message = None
        return current

    return records.update_job(job_id, change), outcome


# --- a model's validation -----------------------------------------------------------------


def validation_verdict(
    records: Records, model_id: str, info: dict[str, Any] | None, error: str | None
) -> ModelRecord | None:
    """validating → ready (with what the worker found: ``layers``, ``num_parameters``,
    ``input_shape``, ``num_classes``) or → invalid with ``error``."""

    def change(current: ModelRecord) -> ModelRecord:
        current.validated_at = utcnow()
        if error is not None or info is None:
            current.status, current.error = ModelStatus.INVALID, error
        else:
            current.status, current.error = ModelStatus.READY, None
            current.layers = info["layers"]
            current.num_parameters = info["num_parameters"]
            current.input_shape = info["input_shape"]
            current.num_classes = info["num_classes"]
        return current

    return records.update_model(model_id, change)


def settle_validation(records: Records, rec: ModelRecord, reason: str) -> ModelRecord | None:
    """validating → invalid because the validation's RQ job ended without a verdict."""

    def change(current: ModelRecord) -> ModelRecord | None:
        if (
            current.status is not ModelStatus.VALIDATING
            or current.validation_attempts != rec.validation_attempts
        ):
            return None
        current.status = ModelStatus.INVALID
        current.error = reason
        current.validated_at = utcnow()
        return current

    return records.update_model(rec.id, change)


def retry_or_fail_validation(
    records: Records,
    model_id: str,
    death: Death,
    *,
    retries: int,
    expected_attempts: int | None = None,
) -> tuple[ModelRecord | None, str]:
    """A validation whose run died: validate again while retries are left, else → invalid.
    Returns ``(record, outcome)`` as :func:`retry_or_fail`."""
    outcome = "unchanged"

    def change(current: ModelRecord) -> ModelRecord | None:
        nonlocal outcome
        if current.status is not ModelStatus.VALIDATING:
            return None
        if expected_attempts is not None and current.validation_attempts != expected_attempts:
            return None
        if death.timed_out_after is None and current.validation_attempts < retries:
            outcome = "retried"
            current.validation_attempts += 1
            return current
        outcome = "failed"
        error = _death_error(death, current.validation_attempts + 1, "the validation")
        current.status = ModelStatus.INVALID
        current.error = f"validation failed: {error.message}"
        current.validated_at = utcnow()
        return current

    return records.update_model(model_id, change), outcome
