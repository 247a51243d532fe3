"""The RQ job that validates an uploaded model: load it, list its layers, count its
parameters, run one forward pass; the model becomes ``ready`` or ``invalid`` with the reason."""

from __future__ import annotations

import logging
from typing import Any

import torch

from deepscope.contract.errors import user_message
from deepscope.contract.status import LayerInfo
from deepscope.manifest import Manifest
from deepscope.models.loading import LoadedModel
from deepscope.store import lifecycle
from deepscope.store.backend import Backend
from deepscope.store.records import ModelRecord
from deepscope.workers import model_cache, runtime

__all__ = ["validate", "validate_model"]

log = logging.getLogger("deepscope.worker")


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


def validate(backend: Backend, rec: ModelRecord) -> ModelRecord:
    """Validate ``rec`` in this process and record the verdict."""
    info: dict[str, Any] | None
    try:
        info = _inspect(model_cache.load(backend, rec, "cpu"), rec.manifest)
        error = None
    except Exception as exc:  # a broken or hostile file: whatever it raises is the reason
        if not isinstance(exc, ValueError):
            log.warning("model %s failed validation", rec.id, exc_info=True)
        error = (
            user_message(exc)
            if isinstance(exc, ValueError)
            else (f"{type(exc).__name__}: {user_message(exc)}")
        )
        info = None
    return lifecycle.validation_verdict(backend.records, rec.id, info, error) or rec


def validate_model(model_id: str) -> dict[str, Any]:
    """RQ job: ``validating`` → ``ready`` (layers, parameters, classes) or ``invalid``."""
    backend = runtime.backend()
    rec = backend.records.get_model(model_id)
    if rec is None:
        return {"status": "deleted"}
    rec = validate(backend, rec)
    return {"status": rec.status.value, "error": rec.error}
