"""Uploaded models loaded for jobs, from storage, and kept per device in long-lived workers.

A GPU worker runs its jobs in its own process and keeps the models they load; so does a CPU
worker's helper, which computes its analyses (:mod:`deepscope.workers.helper`). For the jobs
it does not hand to its helper, a CPU worker loads the model itself just before it forks the
job's process (:func:`prefetch`), which inherits it loaded, and keeps it for the next job on
that model. Only validated safetensors models are loaded ahead: parsing one runs no code, and
its tensors take what the file takes (a budget in file bytes bounds what a process keeps)."""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

from deepscope.analysis.layers import weight_layers
from deepscope.catalog import BUILTIN_DATASETS
from deepscope.contract.errors import user_message
from deepscope.contract.status import ModelStatus
from deepscope.manifest import Manifest, ModelFormat
from deepscope.models.loading import LoadedModel, load_model
from deepscope.store.backend import Backend
from deepscope.store.records import ModelRecord
from deepscope.workers.runtime import config, local_blob, single_threaded

__all__ = ["clear", "load", "prefetch"]

log = logging.getLogger("deepscope.worker")

_FILE_NAMES = {
    ModelFormat.SAFETENSORS: "model.safetensors",
    ModelFormat.STATE_DICT: "model.pt",
    ModelFormat.PT2: "model.pt2",
    ModelFormat.TORCHSCRIPT: "model.pt",
}
#: (sha256, manifest sha256, device) → (model, its file's bytes), least recently used first.
_MODELS: OrderedDict[tuple[str, str, str], tuple[LoadedModel, int]] = OrderedDict()


def clear() -> None:
    _MODELS.clear()


def prefetch(backend: Backend, model: ModelRecord | None) -> bool:
    """(A forking worker, before it forks a job's process) load ``model`` into this process's
    cache when it is a validated safetensors model within the cache's budget. → whether it is
    loaded now. Any failure leaves it to the job, which loads it and reports the error."""
    budget = config().model_cache_bytes
    if (
        model is None
        or config().model_cache <= 0
        or model.status is not ModelStatus.READY
        or model.format is not ModelFormat.SAFETENSORS
        or (budget is not None and model.size_bytes > budget)
    ):
        return False
    try:
        with single_threaded():  # this process forks afterwards
            load(backend, model, "cpu")
    except Exception as exc:  # the job's own process meets it again and says what it is
        log.info("model %s not loaded ahead of its job: %s", model.id, user_message(exc))
        return False
    return True


def _sanitized(manifest: Manifest) -> Manifest:
    # A manifest's training dataset may be a path on the trainer's machine; the worker never
    # opens paths from uploads, so only a built-in name is kept.
    training = manifest.training
    if training is not None and training.dataset not in BUILTIN_DATASETS:
        return manifest.model_copy(update={"training": None})
    return manifest


def load(backend: Backend, rec: ModelRecord, device: str) -> LoadedModel:
    """The model of ``rec`` loaded on ``device`` (from the cache when this worker keeps one)."""
    key = (rec.sha256, rec.manifest_sha256, device)
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key][0]
    # Formats are told apart by content (loading.detect_format), and the stored file is
    # read in place on local storage.
    with local_blob(backend.storage, rec.sha256, _FILE_NAMES[rec.format], any_name=True) as path:
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
    keep, budget = config().model_cache, config().model_cache_bytes
    if keep > 0 and (budget is None or rec.size_bytes <= budget):
        _MODELS[key] = (loaded, rec.size_bytes)
        while len(_MODELS) > keep or (
            budget is not None and sum(size for _, size in _MODELS.values()) > budget
        ):
            _MODELS.popitem(last=False)
    return loaded
