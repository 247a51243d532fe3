"""Uploaded models loaded for jobs, from storage, and kept per device in long-lived workers."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from deepscope.analysis.layers import weight_layers
from deepscope.catalog import BUILTIN_DATASETS
from deepscope.contract.errors import user_message
from deepscope.manifest import Manifest, ModelFormat
from deepscope.models.loading import LoadedModel, load_model
from deepscope.store.backend import Backend
from deepscope.store.records import ModelRecord
from deepscope.workers.runtime import config, local_blob

__all__ = ["clear", "load"]

_FILE_NAMES = {
    ModelFormat.SAFETENSORS: "model.safetensors",
    ModelFormat.STATE_DICT: "model.pt",
    ModelFormat.PT2: "model.pt2",
    ModelFormat.TORCHSCRIPT: "model.pt",
}
#: (sha256, manifest sha256, device) → model; only in long-lived (non-forking) workers.
_MODELS: OrderedDict[tuple[str, str, str], LoadedModel] = OrderedDict()


def clear() -> None:
    _MODELS.clear()


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
        return _MODELS[key]
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
    if config().model_cache > 0:
        _MODELS[key] = loaded
        while len(_MODELS) > config().model_cache:
            _MODELS.popitem(last=False)
    return loaded
