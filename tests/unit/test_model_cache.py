"""A CPU worker's model cache: what it loads before forking a job (validated safetensors models
within its budget), what it refuses (and leaves to the job), and what it evicts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from deepscope.contract.status import ModelStatus
from deepscope.manifest import Manifest, ModelFormat
from deepscope.models.registry import get_model
from deepscope.settings import Settings
from deepscope.store.backend import Backend, manifest_sha256
from deepscope.store.records import ModelRecord, new_id
from deepscope.store.storage import Storage
from deepscope.workers import model_cache, runtime


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    # Loading reads the storage only (no Redis command is sent).
    yield Backend(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"))
    runtime.configure()


def _stored(backend: Backend, data: bytes, **fields: object) -> ModelRecord:
    sha = hashlib.sha256(data).hexdigest()
    backend.storage.put_bytes(Storage.blob_key(sha), data)
    manifest = Manifest.model_validate({"arch": "fcnn1", "input_shape": [1, 28, 28]})
    values: dict[str, object] = {
        "id": new_id(),
        "tenant": "t",
        "name": "m",
        "format": ModelFormat.SAFETENSORS,
        "sha256": sha,
        "size_bytes": len(data),
        "manifest": manifest,
        "manifest_sha256": manifest_sha256(manifest),
        "status": ModelStatus.READY,
    }
    return ModelRecord.model_validate(values | fields)


def _weights(seed: int) -> bytes:
    torch.manual_seed(seed)
    state = get_model("fcnn1", num_classes=10).state_dict()
    return save({k: v.contiguous() for k, v in state.items()})


def test_a_validated_model_is_loaded_ahead_and_kept(backend: Backend) -> None:
    data = _weights(0)
    runtime.configure(model_cache=4, model_cache_bytes=10 * len(data))
    rec = _stored(backend, data)
    assert model_cache.prefetch(backend, rec)
    loaded = model_cache.load(backend, rec, "cpu")
    assert model_cache.load(backend, rec, "cpu") is loaded  # the job's load finds it
    torch.manual_seed(0)
    expected = get_model("fcnn1", num_classes=10).state_dict()
    for key, value in loaded.module.state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_what_is_left_to_the_job(backend: Backend) -> None:
    data = _weights(1)
    runtime.configure(model_cache=4, model_cache_bytes=10 * len(data))
    # Not validated yet, a format that is not safetensors, none at all: not loaded here.
    assert not model_cache.prefetch(backend, _stored(backend, data, status=ModelStatus.VALIDATING))
    assert not model_cache.prefetch(backend, _stored(backend, data, format=ModelFormat.PT2))
    assert not model_cache.prefetch(backend, None)
    # Over the budget.
    runtime.configure(model_cache=4, model_cache_bytes=len(data) - 1)
    assert not model_cache.prefetch(backend, _stored(backend, data))
    # A file that does not load: no error here (the job meets it and says what it is).
    runtime.configure(model_cache=4, model_cache_bytes=10 * len(data))
    assert not model_cache.prefetch(backend, _stored(backend, b"not safetensors at all"))
    # Caching off.
    runtime.configure(model_cache=0)
    assert not model_cache.prefetch(backend, _stored(backend, data))


def test_the_budget_evicts_the_least_recently_used(backend: Backend) -> None:
    first, second, third = (_weights(seed) for seed in (2, 3, 4))
    runtime.configure(model_cache=8, model_cache_bytes=len(first) + len(second))
    recs = [_stored(backend, data) for data in (first, second, third)]
    loaded = [model_cache.load(backend, rec, "cpu") for rec in recs[:2]]
    assert model_cache.load(backend, recs[0], "cpu") is loaded[0]  # first: used last now
    model_cache.load(backend, recs[2], "cpu")  # over the budget: the second goes
    assert model_cache.load(backend, recs[0], "cpu") is loaded[0]
    assert model_cache.load(backend, recs[1], "cpu") is not loaded[1]
