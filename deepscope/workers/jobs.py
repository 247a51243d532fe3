"""RQ job functions. They take ids (and JSON) only, read everything else from the records and
the storage, and write their outcome back to the records.

* :func:`validate_model` — load an uploaded model, list its layers, count its parameters, run
  one forward pass: the model becomes ``ready`` or ``invalid`` with the reason;
* :func:`run_job` — one analysis: model and dataset from storage, :func:`run_analysis` with
  progress in the RQ job's meta, generated images predicted by the same model, artifacts
  uploaded, result stored and cached;
* :func:`predict` — logits, probabilities and top-k classes for posted images;
* :func:`seed_demo` — train the paper's networks on ``digits`` and register them for a tenant.

User errors (a bad layer name, a dataset that does not fit) end the job ``failed`` with a
readable ``error``; anything else is also re-raised so that RQ keeps the traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from rq import get_current_job

from deepscope.analysis.layers import weight_layers
from deepscope.manifest import Manifest, ModelFormat
from deepscope.models.datasets import Dataset, load_dataset
from deepscope.models.loading import LoadedModel, load_model
from deepscope.params import AnalysisKind, parse_params
from deepscope.settings import Settings
from deepscope.store.backend import Backend
from deepscope.store.queues import connect
from deepscope.store.records import (
    BUILTIN_DATASETS,
    JobError,
    JobRecord,
    JobStatus,
    LayerInfo,
    ModelRecord,
    ModelStatus,
    utcnow,
)
from deepscope.store.storage import Storage, safe_relpath
from deepscope.workers.pipeline import resolve_device, run_analysis

__all__ = [
    "JobCanceledError",
    "configure",
    "predict",
    "run_job",
    "seed_demo",
    "user_message",
    "validate_model",
]

log = logging.getLogger("deepscope.worker")

_FILE_NAMES = {
    ModelFormat.SAFETENSORS: "model.safetensors",
    ModelFormat.STATE_DICT: "model.pt",
    ModelFormat.PT2: "model.pt2",
    ModelFormat.TORCHSCRIPT: "model.pt",
}
_PROGRESS_INTERVAL_S = 0.5
_PREDICT_BATCH = 256
#: Generated images a job predicts (the first ones), and the classes it keeps per image.
_MAX_GENERATED_PREDICTIONS = 2048
_GENERATED_TOP_K = 3


class JobCanceledError(Exception):
    """The job's record says it was canceled: stop where we are."""


@dataclasses.dataclass
class _Config:
    device: str = "cpu"
    model_cache: int = 0


_CONFIG = _Config()
#: (sha256, manifest sha256, device) → model; only in long-lived (non-forking) workers.
_MODELS: OrderedDict[tuple[str, str, str], LoadedModel] = OrderedDict()


def configure(*, device: str = "cpu", model_cache: int = 0) -> None:
    """Set by the worker process: where jobs compute (``cpu``, ``cuda``, ``auto`` — resolved at
    job time) and how many loaded models to keep (only useful without forking)."""
    _CONFIG.device = device
    _CONFIG.model_cache = model_cache
    _MODELS.clear()


@functools.lru_cache(maxsize=1)
def _settings() -> Settings:
    return Settings()


def _backend() -> Backend:
    settings = _settings()
    job = get_current_job()
    redis = job.connection if job is not None else connect(settings.resolved_redis_url())
    return Backend(settings, redis=redis, storage=_storage(settings.storage_location))


@functools.lru_cache(maxsize=4)
def _storage(location: str) -> Storage:
    return Storage(location)


def user_message(exc: BaseException) -> str:
    """One readable line; pydantic errors become ``field: problem; ...``."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"][1:]] or [str(p) for p in err["loc"]]
            parts.append(f"{'.'.join(loc)}: {err['msg']}")
        return "invalid parameters: " + "; ".join(parts)
    text = str(exc).strip()
    if text.startswith("The following operation failed in the TorchScript interpreter"):
        # The model's own exception is the last line, after a TorchScript traceback.
        return "the model raised " + text.splitlines()[-1].removeprefix("builtins.")
    return text.splitlines()[0] if text else type(exc).__name__


def _job_error(exc: BaseException) -> JobError:
    kind = type(exc).__name__
    if kind == "JobTimeoutException":
        job = get_current_job()
        limit = job.timeout if job is not None and job.timeout else _settings().job_timeout
        return JobError(
            type="timeout", message=f"the job timed out after {limit} s (DEEPSCOPE_JOB_TIMEOUT)"
        )
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
        allowance = _settings().job_memory_bytes() // (1024 * 1024)
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


@contextmanager
def _local_blob(storage: Storage, sha256: str, name: str) -> Iterator[Path]:
    """The blob as a local file called ``name`` (a link on local storage, else a copy)."""
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


def _sanitized(manifest: Manifest) -> Manifest:
    # A manifest's training dataset may be a path on the trainer's machine; the worker never
    # opens paths from uploads, so only a built-in name is kept.
    training = manifest.training
    if training is not None and training.dataset not in BUILTIN_DATASETS:
        return manifest.model_copy(update={"training": None})
    return manifest


def _device() -> str:
    return str(resolve_device(None if _CONFIG.device == "auto" else _CONFIG.device))


def _load(backend: Backend, rec: ModelRecord, device: str) -> LoadedModel:
    key = (rec.sha256, rec.manifest_sha256, device)
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    with _local_blob(backend.storage, rec.sha256, _FILE_NAMES[rec.format]) as path:
        try:
            loaded = load_model(
                path,
                manifest=_sanitized(rec.manifest),
                allow_code=backend.settings.allow_code_models,
            )
        except ValueError as exc:
            # The temporary path means nothing to the user.
            text = user_message(exc).replace(str(path), "the model file")
            raise ValueError(text) from None
    if loaded.format is not rec.format:
        raise ValueError(
            f"the manifest says {rec.format.value} but the file is {loaded.format.value}"
        )
    if device != "cpu" and loaded.format in (ModelFormat.SAFETENSORS, ModelFormat.STATE_DICT):
        # Kept on the device between jobs (GPU workers). The layers hold detached views of the
        # CPU weights, so they are taken again from the moved module.
        loaded.module.to(device)
        loaded = dataclasses.replace(loaded, layers=weight_layers(loaded.module))
    if _CONFIG.model_cache > 0:
        _MODELS[key] = loaded
        while len(_MODELS) > _CONFIG.model_cache:
            _MODELS.popitem(last=False)
    return loaded


# --- validation ---------------------------------------------------------------------------


def _inspect(loaded: LoadedModel, manifest: Manifest) -> dict[str, Any]:
    """Layers, parameter count, and the class count from one forward pass on zeros."""
    module = loaded.module
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    with torch.no_grad():
        out = module(torch.zeros((1, *loaded.input_shape), dtype=dtype))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits (batch, classes); it returned {shape}")
    num_classes = int(out.shape[1])
    names = manifest.class_names
    if names is not None and len(names) != num_classes:
        raise ValueError(
            f"manifest.class_names has {len(names)} names but the model has {num_classes} outputs"
        )
    return {
        "layers": [
            LayerInfo(name=layer.name, kind=str(layer.kind), weight_shape=list(layer.weight.shape))
            for layer in loaded.layers
        ],
        "num_parameters": loaded.num_parameters,
        "input_shape": list(loaded.input_shape),
        "num_classes": num_classes,
    }


def _validate(backend: Backend, rec: ModelRecord) -> ModelRecord:
    try:
        info = _inspect(_load(backend, rec, "cpu"), rec.manifest)
        error = None
    except Exception as exc:  # a broken or hostile file: whatever it raises is the reason
        if not isinstance(exc, ValueError):
            log.warning("model %s failed validation", rec.id, exc_info=True)
        error = (
            user_message(exc)
            if isinstance(exc, ValueError)
            else (f"{type(exc).__name__}: {user_message(exc)}")
        )
        info = {}

    def verdict(current: ModelRecord) -> ModelRecord:
        current.validated_at = utcnow()
        if error is not None:
            current.status, current.error = ModelStatus.INVALID, error
        else:
            current.status, current.error = ModelStatus.READY, None
            current.layers = info["layers"]
            current.num_parameters = info["num_parameters"]
            current.input_shape = info["input_shape"]
            current.num_classes = info["num_classes"]
        return current

    return backend.records.update_model(rec.id, verdict) or rec


def validate_model(model_id: str) -> dict[str, Any]:
    """RQ job: ``validating`` → ``ready`` (layers, parameters, classes) or ``invalid``."""
    backend = _backend()
    rec = backend.records.get_model(model_id)
    if rec is None:
        return {"status": "deleted"}
    rec = _validate(backend, rec)
    return {"status": rec.status.value, "error": rec.error}


# --- analyses -----------------------------------------------------------------------------


class _Progress:
    """``progress(fraction, message)`` → the RQ job's meta, at most every 0.5 s; also where a
    canceled job notices (a worker that does not fork cannot be killed from outside)."""

    def __init__(self, backend: Backend, job_id: str) -> None:
        self.backend = backend
        self.job_id = job_id
        self.last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self.last < _PROGRESS_INTERVAL_S and fraction < 1.0:
            return
        self.last = now
        job = get_current_job()
        if job is not None:
            job.meta["progress"] = round(float(fraction), 4)
            job.meta["message"] = message
            job.save_meta()  # type: ignore[no-untyped-call]
        rec = self.backend.records.get_job(self.job_id)
        if rec is None or rec.cancel_requested:
            raise JobCanceledError(self.job_id)


def _dataset(backend: Backend, job: JobRecord, stack: ExitStack) -> Dataset | None:
    name = job.dataset
    if name is None:
        return None
    if name in BUILTIN_DATASETS:
        return load_dataset(name, "train", fashion_mnist_dir=backend.settings.fashion_mnist_dir)
    rec = backend.records.get_dataset(name, job.tenant)
    if rec is None:
        raise ValueError(f"dataset {name} was deleted")
    path = stack.enter_context(_local_blob(backend.storage, rec.sha256, "dataset.npz"))
    return dataclasses.replace(load_dataset(str(path), "train"), name=rec.name)


def _upload_artifacts(
    backend: Backend, job: JobRecord, out_dir: Path, result: dict[str, Any]
) -> None:
    for artifact in result["artifacts"]:
        rel = safe_relpath(str(artifact["url"]))
        backend.storage.put_file(out_dir / rel, Storage.artifact_key(job.tenant, job.id, rel))
    result["artifacts"].append(
        {
            "name": "result",
            "url": "result.json",
            "media_type": "application/json",
            "description": "the whole result (metrics, artifacts, warnings)",
        }
    )
    backend.storage.put_file(
        out_dir / "result.json", Storage.artifact_key(job.tenant, job.id, "result.json")
    )


def _start(backend: Backend, job_id: str) -> JobRecord | None:
    def start(current: JobRecord) -> JobRecord | None:
        if current.status is not JobStatus.QUEUED or current.cancel_requested:
            return None
        current.status = JobStatus.RUNNING
        current.started_at = utcnow()
        current.progress = 0.0
        return current

    rec = backend.records.update_job(job_id, start)
    if rec is None or rec.status is not JobStatus.RUNNING:
        return None
    return rec


def _finish(
    backend: Backend,
    job_id: str,
    status: JobStatus,
    error: JobError | None = None,
) -> JobRecord | None:
    def finish(current: JobRecord) -> JobRecord | None:
        if current.status is not JobStatus.RUNNING:
            return None  # canceled meanwhile: the cancel stands
        current.status = status
        current.error = error
        current.finished_at = utcnow()
        current.message = None
        if status is JobStatus.SUCCEEDED:
            current.progress = 1.0
        return current

    return backend.records.update_job(job_id, finish)


def run_job(job_id: str) -> dict[str, Any]:
    """RQ job: run one analysis job (its record holds model, analysis, params, dataset)."""
    backend = _backend()
    job = _start(backend, job_id)
    if job is None:
        return {"status": "skipped"}
    try:
        with ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="deepscope-job-"))
            model = backend.records.get_model(job.model_id, job.tenant)
            if model is None:
                raise ValueError(f"model {job.model_id} was deleted")
            device = _device()
            progress = _Progress(backend, job_id)
            progress(0.0, "loading the model")
            loaded = _load(backend, model, device)
            dataset = _dataset(backend, job, stack)
            params = parse_params(job.analysis, job.params, max_steps=backend.settings.max_steps)
            out_dir = Path(tmp) / "out"
            result = run_analysis(
                loaded,
                AnalysisKind(job.analysis),
                params,
                out_dir,
                dataset=dataset,
                device=device,
                progress=progress,
            )
            _predict_generated(loaded, model, out_dir, result, device)
            _upload_artifacts(backend, job, out_dir, result)
        backend.records.put_result(job_id, result)
        done = _finish(backend, job_id, JobStatus.SUCCEEDED)
        if done is not None and done.status is JobStatus.SUCCEEDED and done.cache_key:
            backend.records.cache_set(done.tenant, done.cache_key, job_id)
        return {"status": "succeeded"}
    except JobCanceledError:
        return {"status": "canceled"}
    except Exception as exc:
        _finish(backend, job_id, JobStatus.FAILED, _job_error(exc))
        if isinstance(exc, ValueError):
            return {"status": "failed", "error": user_message(exc)}
        raise


# --- prediction ---------------------------------------------------------------------------


def _decode_inputs(backend: Backend, job: JobRecord, shape: tuple[int, int, int]) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1] from the stored PNGs or .npz."""
    from PIL import Image

    c, h, w = shape
    storage = backend.storage
    if job.params.get("inputs") == "npz":
        with storage.open(Storage.input_key(job.tenant, job.id, "images.npz")) as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            images = np.asarray(data["images"])
        if images.ndim == 3:
            images = images[:, None]
        if images.dtype == np.uint8:
            arr = images.astype(np.float32) / 255.0
        else:
            arr = images.astype(np.float32)
            if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
                raise ValueError("float images must be finite and lie in [0, 1]")
        if tuple(arr.shape[1:]) != shape:
            raise ValueError(
                f"the images are {'×'.join(map(str, arr.shape[1:]))} but the model takes "
                f"{'×'.join(map(str, shape))}"
            )
        return arr
    names = list(job.params.get("files", []))
    out = []
    for i in range(int(job.params.get("count", 0))):
        label = names[i] if i < len(names) else f"image {i}"
        with storage.open(Storage.input_key(job.tenant, job.id, f"{i:05d}.png")) as f:
            try:
                image = Image.open(io.BytesIO(f.read()))
            except Exception as exc:
                raise ValueError(f"{label}: not a readable PNG ({exc})") from None
        # The header's size is checked before any pixel is decoded (a small file may
        # declare a huge image: a decompression bomb).
        if image.size != (w, h):
            raise ValueError(f"{label} is {image.width}×{image.height} but the model takes {w}×{h}")
        try:
            image.load()
        except Exception as exc:
            raise ValueError(f"{label}: not a readable PNG ({exc})") from None
        if c == 1:
            arr = np.asarray(image.convert("L"), dtype=np.float32)[None] / 255.0
        elif c == 3:
            arr = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
        else:
            raise ValueError(f"PNG input needs a 1- or 3-channel model; this one takes {c}")
        out.append(arr)
    return np.stack(out)


def _predictions(
    loaded: LoadedModel, images: np.ndarray, top_k: int, device: str
) -> list[dict[str, Any]]:
    norm = loaded.manifest.normalization
    x = torch.from_numpy(np.ascontiguousarray(images))
    mean = torch.tensor(norm.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - mean) / std
    dtype = next(
        (p.dtype for p in loaded.module.parameters() if p.is_floating_point()), torch.float32
    )
    chunks = []
    with torch.no_grad():
        for start in range(0, x.shape[0], _PREDICT_BATCH):
            batch = x[start : start + _PREDICT_BATCH].to(device=device, dtype=dtype)
            chunks.append(loaded.module(batch).detach().double().cpu())
    logits = torch.cat(chunks)
    probs = torch.softmax(logits, dim=1)
    k = min(top_k, logits.shape[1])
    top = torch.topk(probs, k, dim=1)
    names = loaded.manifest.class_names
    out = []
    for row in range(logits.shape[0]):
        out.append(
            {
                "top_k": [
                    {
                        "class": names[i] if names and i < len(names) else str(i),
                        "index": i,
                        "probability": float(p),
                    }
                    for p, i in zip(
                        top.values[row].tolist(), top.indices[row].tolist(), strict=True
                    )
                ],
                "logits": [float(v) for v in logits[row].tolist()],
            }
        )
    return out


def _generated_arrays(
    out_dir: Path, result: dict[str, Any], shape: tuple[int, int, int]
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(artifact url, array name, (N, C, H, W) images) of every ``.npz`` artifact array that
    holds float images of the model's input shape (generated inputs, in [0, 1] pixel space)."""
    for artifact in result["artifacts"]:
        if artifact.get("media_type") != "application/x-npz":
            continue
        url = str(artifact["url"])
        with np.load(out_dir / safe_relpath(url), allow_pickle=False) as data:
            for key in data.files:
                arr = np.asarray(data[key])
                if arr.ndim == 3 and shape[0] == 1:
                    arr = arr[:, None]
                if arr.ndim == 4 and tuple(arr.shape[1:]) == shape and arr.dtype.kind == "f":
                    yield url, key, arr


def _predict_generated(
    loaded: LoadedModel, model: ModelRecord, out_dir: Path, result: dict[str, Any], device: str
) -> None:
    """Add ``result["predictions"]``: what the model says about each generated image.

    The analyses that generate inputs (inverse images, input optimization) write them as
    ``.npz`` artifacts; each image is clipped to [0, 1] (what a PNG of it holds, and what
    ``POST /v1/models/{id}/predict`` accepts) and predicted by the same model, so the result
    answers "does the model see its class in it?" and the user can check any other image
    through the link. ``result.json`` is rewritten with them.
    """
    entries: list[dict[str, Any]] = []
    for url, key, arr in _generated_arrays(out_dir, result, loaded.input_shape):
        room = _MAX_GENERATED_PREDICTIONS - len(entries)
        if room <= 0:
            result["warnings"].append(
                f"only the first {_MAX_GENERATED_PREDICTIONS} generated images were predicted"
            )
            break
        images = np.clip(np.nan_to_num(arr[:room].astype(np.float32)), 0.0, 1.0)
        for index, pred in enumerate(_predictions(loaded, images, _GENERATED_TOP_K, device)):
            best = pred["top_k"][0]
            entries.append(
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
    if not entries:
        return
    result["predictions"] = {
        "model_id": model.id,
        "url": f"/v1/models/{model.id}/predict",
        "input": "each generated image clipped to [0, 1] pixel space",
        "images": entries,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def predict(job_id: str) -> dict[str, Any]:
    """RQ job: predictions for the images stored under the job's id."""
    backend = _backend()
    job = _start(backend, job_id)
    if job is None:
        return {"status": "skipped"}
    try:
        model = backend.records.get_model(job.model_id, job.tenant)
        if model is None:
            raise ValueError(f"model {job.model_id} was deleted")
        device = _device()
        loaded = _load(backend, model, device)
        images = _decode_inputs(backend, job, loaded.input_shape)
        top_k = int(job.params.get("top_k", 5))
        result = {
            "metrics": {"predictions": _predictions(loaded, images, top_k, device)},
            "artifacts": [],
            "warnings": [],
        }
        backend.records.put_result(job_id, result)
        _finish(backend, job_id, JobStatus.SUCCEEDED)
        return {"status": "succeeded"}
    except Exception as exc:
        _finish(backend, job_id, JobStatus.FAILED, _job_error(exc))
        if isinstance(exc, ValueError):
            return {"status": "failed", "error": user_message(exc)}
        raise


# --- demo ---------------------------------------------------------------------------------


def seed_demo(tenant: str, epochs: int = 10) -> dict[str, Any]:
    """RQ job: train fcnn1 and fcnn5 on ``digits`` (seconds), register them for ``tenant``
    (validated here), and queue ``signal_space`` and ``residuals`` on fcnn1."""
    from deepscope.models.training import Recipe, train_model

    backend = _backend()
    made: list[str] = []
    for arch in ("fcnn1", "fcnn5"):
        with tempfile.TemporaryDirectory(prefix="deepscope-demo-") as tmp:
            weights = Path(tmp) / f"{arch}-digits.safetensors"
            train, manifest = train_model(
                arch, "digits", weights, epochs=epochs, recipe=Recipe.FAST, seed=0
            )
            with weights.open("rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
            backend.storage.put_file(weights, Storage.blob_key(sha))
            rec = backend.register_model(
                tenant,
                manifest,
                sha,
                weights.stat().st_size,
                name=f"{arch}-digits (demo, {train.accuracy:.0%} held-out accuracy)",
                demo=True,
                validate=False,
            )
        rec = _validate(backend, rec)
        made.append(rec.id)
        if arch == "fcnn1" and rec.status is ModelStatus.READY:
            for kind in (AnalysisKind.SIGNAL_SPACE, AnalysisKind.RESIDUALS):
                backend.submit_analysis(tenant, rec, kind.value, parse_params(kind.value), "digits")
    log.info("demo models for tenant %s: %s (pid %d)", tenant, made, os.getpid())
    return {"models": made}
