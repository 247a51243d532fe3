"""The RQ job that gives a new deployment something to look at: the paper's networks trained
on the digits and analyzed."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from deepscope.analyses.registry import parse_params
from deepscope.contract.status import ModelStatus
from deepscope.store.storage import Storage
from deepscope.workers import runtime
from deepscope.workers.validation import validate

__all__ = ["seed_demo"]

log = logging.getLogger("deepscope.worker")


def seed_demo(tenant: str, epochs: int = 10) -> dict[str, Any]:
    """RQ job: train fcnn1 and fcnn5 on ``digits`` (seconds), register them for ``tenant``
    (validated here), and queue ``signal_space`` and ``residuals`` on fcnn1."""
    from deepscope.models.training import Recipe, train_model

    backend = runtime.backend()
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
        rec = validate(backend, rec)
        made.append(rec.id)
        if arch == "fcnn1" and rec.status is ModelStatus.READY:
            for analysis in ("signal_space", "residuals"):
                backend.submit_analysis(tenant, rec, analysis, parse_params(analysis), "digits")
    log.info("demo models for tenant %s: %s (pid %d)", tenant, made, os.getpid())
    return {"models": made}
