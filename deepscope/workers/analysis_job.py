"""The RQ job that runs one analysis: its records read, the run computed (by the worker's
helper when it has one for this job, else here: :mod:`deepscope.workers.computing`) with
progress in the RQ job's meta, the artifacts published, the result stored and cached. User
errors (a bad layer name, a dataset that does not fit) end the job ``failed`` with a readable
``error``; anything else is also re-raised so that RQ keeps the traceback."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from deepscope.catalog import BUILTIN_DATASETS
from deepscope.contract.result import Artifact, Result
from deepscope.contract.status import JobStatus
from deepscope.store import lifecycle
from deepscope.store.backend import Backend
from deepscope.store.records import DatasetRecord, JobRecord, ModelRecord
from deepscope.store.storage import Storage, safe_relpath
from deepscope.workers import runtime
from deepscope.workers.computing import Run, compute
from deepscope.workers.helper import collect

__all__ = ["discard", "plan", "run_job"]

#: What a job does first (its record says it from the start: no report needed).
_LOADING = "loading the model"


def _dataset(backend: Backend, job: JobRecord) -> str | DatasetRecord | None:
    """The job's dataset: a built-in's name, an uploaded dataset's record, or None."""
    name = job.dataset
    if name is None or name in BUILTIN_DATASETS:
        return name
    rec = backend.records.get_dataset(name, job.tenant)
    if rec is None:
        raise ValueError(f"dataset {name} was deleted")
    return rec


def plan(backend: Backend, job: JobRecord, model: ModelRecord) -> Run:
    """The run of ``job`` on ``model``, into a new directory of its own (:func:`discard` it
    when it was not published).

    Raises:
        ValueError: the job's dataset was deleted.
    """
    return Run(
        model=model,
        dataset=_dataset(backend, job),
        analysis=job.analysis,
        params=job.params,
        max_steps=backend.settings.max_steps,
        out_dir=_run_dir(backend, job),
        device=runtime.device(),
    )


def _run_dir(backend: Backend, job: JobRecord) -> Path:
    """On local storage, a directory beside the job's artifact directory, renamed into place
    when the run succeeded: nothing is copied, a reader never sees half a run, and a run given
    up for dead cannot mix its files with its successor's. On any other storage, in a
    temporary directory, uploaded file by file at the end."""
    final = backend.storage.local_path(Storage.job_prefix("artifacts", job.tenant, job.id))
    if final is None:
        return Path(tempfile.mkdtemp(prefix="deepscope-job-")) / "out"
    return final.with_name(f".{final.name}.run-{uuid.uuid4().hex}")


def discard(backend: Backend, run: Run) -> None:
    """Remove what is left of ``run``'s directory (nothing, once published)."""
    local = backend.storage.local
    shutil.rmtree(run.out_dir if local else run.out_dir.parent, ignore_errors=True)


class _Output:
    """Where a run writes its artifacts (:func:`plan`), and how they reach storage."""

    def __init__(self, backend: Backend, job: JobRecord, run: Run) -> None:
        self.backend = backend
        self.job = job
        self.dir = run.out_dir
        self.final = backend.storage.local_path(Storage.job_prefix("artifacts", job.tenant, job.id))

    def publish(self, result: Result) -> Result:
        """Every artifact and ``result.json`` to storage; → the result listing ``result.json``."""
        if self.final is None:
            for artifact in result.artifacts:
                rel = safe_relpath(artifact.url)
                key = Storage.artifact_key(self.job.tenant, self.job.id, rel)
                self.backend.storage.put_file(self.dir / rel, key)
            key = Storage.artifact_key(self.job.tenant, self.job.id, "result.json")
            self.backend.storage.put_file(self.dir / "result.json", key)
        else:
            # An earlier run's files (a retry after its worker died) make way.
            shutil.rmtree(self.final, ignore_errors=True)
            os.replace(self.dir, self.final)
        return _listed(result)


def _listed(result: Result) -> Result:
    """``result`` with ``result.json`` among its artifacts."""
    listed = Artifact(
        name="result",
        url="result.json",
        media_type="application/json",
        description="the whole result (metrics, artifacts, warnings)",
    )
    return result.model_copy(update={"artifacts": [*result.artifacts, listed]})


def run_job(job_id: str) -> dict[str, Any]:
    """RQ job: run one analysis job (its record holds model, analysis, params, dataset)."""
    backend = runtime.backend()
    job = lifecycle.start(backend.records, job_id, _LOADING)
    if job is None:
        return {"status": "skipped"}
    try:
        model = backend.records.get_model(job.model_id, job.tenant)
        if model is None:
            raise ValueError(f"model {job.model_id} was deleted")
        # The worker may have planned the run and handed it to its helper already; then it
        # also removes what is left of it, once this process has ended.
        sent = runtime.config().helper_run
        run = sent if sent is not None else plan(backend, job, model)
        try:
            output = _Output(backend, job, run)
            progress = runtime.ProgressReporter(backend, job_id, said=_LOADING)
            result = _in_helper(run, progress) if sent is not None else None
            if result is None:
                result = compute(backend, run, progress)
            result = output.publish(result)
        finally:
            if sent is None:
                discard(backend, run)  # whatever happened to the run, its directory goes
        done = runtime.succeed(backend, job, result)
        if done is None:
            return {"status": "superseded"}
        # (Its result-cache entry was written with its status: Records, _on_transition.)
        return {"status": "succeeded" if done.status is JobStatus.SUCCEEDED else "canceled"}
    except runtime.JobCanceledError:
        return {"status": "canceled"}
    except Exception as exc:
        return runtime.fail(backend, job, exc)
    finally:
        # Whatever the outcome, the tenant's next job may take this one's slot (releasing a
        # slot twice is harmless: it is a set).
        backend.job_ended(job)


def _in_helper(run: Run, progress: runtime.ProgressReporter) -> Result | None:
    """The result of ``run``, which the worker handed to its helper; None when the helper
    could not compute it (then this process does, from a clean directory)."""
    config = runtime.config()
    assert config.helper is not None  # (set with helper_run)
    result = collect(config.helper, progress, config.helper_pid)
    if result is None:
        shutil.rmtree(run.out_dir, ignore_errors=True)
    return result
