"""The RQ job that runs one analysis: the model and dataset from storage, the analysis (the
registry's compute entry, through :func:`run_analysis`) with progress in the RQ job's meta, the
generated images predicted by the same model, the artifacts uploaded, the result stored and
cached. User errors (a bad layer name, a dataset that does not fit) end the job ``failed`` with
a readable ``error``; anything else is also re-raised so that RQ keeps the traceback."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from deepscope.analyses.registry import get_analysis, parse_params
from deepscope.analyses.run import run_analysis, write_result
from deepscope.catalog import BUILTIN_DATASETS
from deepscope.contract.result import Artifact, GeneratedPrediction, GeneratedPredictions, Result
from deepscope.contract.status import JobStatus
from deepscope.models.datasets import Dataset, load_dataset
from deepscope.models.loading import LoadedModel
from deepscope.store import lifecycle
from deepscope.store.backend import Backend
from deepscope.store.records import JobRecord, ModelRecord
from deepscope.store.storage import Storage, safe_relpath
from deepscope.workers import model_cache, runtime
from deepscope.workers.painter import RemotePainter
from deepscope.workers.predict import predictions

__all__ = ["run_job"]

#: Generated images a job predicts (the first ones), and the classes it keeps per image.
_MAX_GENERATED_PREDICTIONS = 2048
_GENERATED_TOP_K = 3
#: What a job does first (its record says it from the start: no report needed).
_LOADING = "loading the model"


def _dataset(backend: Backend, job: JobRecord, stack: ExitStack) -> Dataset | None:
    name = job.dataset
    if name is None:
        return None
    if name in BUILTIN_DATASETS:
        return load_dataset(name, "train", fashion_mnist_dir=backend.settings.fashion_mnist_dir)
    rec = backend.records.get_dataset(name, job.tenant)
    if rec is None:
        raise ValueError(f"dataset {name} was deleted")
    path = stack.enter_context(runtime.local_blob(backend.storage, rec.sha256, "dataset.npz"))
    return dataclasses.replace(load_dataset(str(path), "train"), name=rec.name)


class _Output:
    """Where a run writes its artifacts, and how they reach storage.

    On local storage the run writes into a directory of its own beside the job's artifact
    directory, renamed into place when it succeeded: nothing is copied, a reader never sees
    half a run, and a run given up for dead cannot mix its files with its successor's. On any
    other storage it writes into a temporary directory, uploaded file by file at the end."""

    def __init__(self, backend: Backend, job: JobRecord, stack: ExitStack) -> None:
        self.backend = backend
        self.job = job
        final = backend.storage.local_path(Storage.job_prefix("artifacts", job.tenant, job.id))
        self.final = final
        if final is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="deepscope-job-"))
            self.dir = Path(tmp) / "out"
        else:
            self.dir = final.with_name(f".{final.name}.run-{uuid.uuid4().hex}")
            # Whatever happens to the run, its own directory does not outlive it (a published
            # one has been renamed away by then).
            stack.callback(shutil.rmtree, self.dir, ignore_errors=True)

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
        with ExitStack() as stack:
            output = _Output(backend, job, stack)
            model = backend.records.get_model(job.model_id, job.tenant)
            if model is None:
                raise ValueError(f"model {job.model_id} was deleted")
            device = runtime.device()
            progress = runtime.ProgressReporter(backend, job_id, said=_LOADING)
            conn = runtime.config().painter
            painter = None if conn is None else RemotePainter(conn, runtime.config().painter_pid)
            loaded = model_cache.load(backend, model, device)
            dataset = _dataset(backend, job, stack)
            params = parse_params(job.analysis, job.params, max_steps=backend.settings.max_steps)
            out_dir = output.dir
            result = run_analysis(
                loaded,
                job.analysis,
                params,
                out_dir,
                dataset=dataset,
                device=device,
                progress=progress,
                painter=painter,
            )
            result = _predict_generated(loaded, model, out_dir, result, device)
            result = output.publish(result)
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


def _generated_arrays(
    out_dir: Path, result: Result, shape: tuple[int, int, int]
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(artifact url, array name, (N, C, H, W) images) of every ``.npz`` artifact array that
    holds float images of the model's input shape (generated inputs, in [0, 1] pixel space)."""
    for artifact in result.artifacts:
        if artifact.media_type != "application/x-npz":
            continue
        url = artifact.url
        with np.load(out_dir / safe_relpath(url), allow_pickle=False) as data:
            for key in data.files:
                arr = np.asarray(data[key])
                if arr.ndim == 3 and shape[0] == 1:
                    arr = arr[:, None]
                if arr.ndim == 4 and tuple(arr.shape[1:]) == shape and arr.dtype.kind == "f":
                    yield url, key, arr


def _predict_generated(
    loaded: LoadedModel, model: ModelRecord, out_dir: Path, result: Result, device: str
) -> Result:
    """``result`` with ``predictions``: what the model says about each generated image.

    The analyses that generate inputs (inverse images, input optimization) write them as
    ``.npz`` artifacts; each image is clipped to [0, 1] (what a PNG of it holds, and what
    ``POST /v1/models/{id}/predict`` accepts) and predicted by the same model, so the result
    answers "does the model see its class in it?" and the user can check any other image
    through the link. ``result.json`` is rewritten with them.
    """
    if not get_analysis(result.analysis).generates_images:
        return result
    entries: list[GeneratedPrediction] = []
    warnings = list(result.warnings)
    for url, key, arr in _generated_arrays(out_dir, result, loaded.input_shape):
        room = _MAX_GENERATED_PREDICTIONS - len(entries)
        if room <= 0:
            warnings.append(
                f"only the first {_MAX_GENERATED_PREDICTIONS} generated images were predicted"
            )
            break
        images = np.clip(np.nan_to_num(arr[:room].astype(np.float32)), 0.0, 1.0)
        for index, pred in enumerate(predictions(loaded, images, _GENERATED_TOP_K, device)):
            best = pred["top_k"][0]
            entries.append(
                GeneratedPrediction.model_validate(
                    {
                        "artifact": url,
                        "array": key,
                        "index": index,
                        "predicted_class": best["class"],
                        "predicted_index": best["index"],
                        "probability": best["probability"],
                        "top_k": pred["top_k"],
                    }
                )
            )
    if not entries:
        return result
    result = result.model_copy(
        update={
            "warnings": warnings,
            "predictions": GeneratedPredictions(
                model_id=model.id,
                url=f"/v1/models/{model.id}/predict",
                input="each generated image clipped to [0, 1] pixel space",
                images=entries,
            ),
        }
    )
    write_result(result, out_dir)
    return result
