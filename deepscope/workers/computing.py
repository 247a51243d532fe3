"""What one analysis job computes, once its records are read: the model and dataset loaded,
the analysis run into a directory, the images it generated predicted by the same model.

It reads files (storage) and writes the run's directory, never Redis, so it runs where it is
cheapest: in the worker's helper (:mod:`deepscope.workers.helper`), a long-lived process, or
in the job's own process (:mod:`deepscope.workers.analysis_job`). A :class:`Run` says all of
it, as JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from deepscope.analyses.context import Progress
from deepscope.analyses.registry import get_analysis, parse_params
from deepscope.analyses.run import run_analysis, write_result
from deepscope.contract.result import GeneratedPrediction, GeneratedPredictions, Result
from deepscope.models.datasets import Dataset, load_dataset
from deepscope.models.loading import LoadedModel
from deepscope.store.backend import Backend
from deepscope.store.records import DatasetRecord, ModelRecord
from deepscope.store.storage import safe_relpath
from deepscope.workers import model_cache, runtime
from deepscope.workers.predict import predictions

__all__ = ["Run", "compute"]

#: Generated images a job predicts (the first ones), and the classes it keeps per image.
_MAX_GENERATED_PREDICTIONS = 2048
_GENERATED_TOP_K = 3


class Run(BaseModel):
    """One analysis run: what :func:`compute` needs, with the records already read."""

    model_config = ConfigDict(frozen=True)

    model: ModelRecord
    #: A built-in dataset's name, an uploaded dataset's record, or None (the analysis needs none).
    dataset: str | DatasetRecord | None
    analysis: str
    #: The job's params, as submitted (parsed here: ``max_steps`` is the deployment's cap).
    params: dict[str, Any]
    max_steps: int
    out_dir: Path
    device: str


def compute(backend: Backend, run: Run, progress: Progress) -> Result:
    """Run ``run`` into ``run.out_dir`` (its artifacts and ``result.json``) → its result.

    Raises:
        ValueError: the user's error (bad params for this model, a dataset that does not fit).
    """
    with ExitStack() as stack:
        loaded = model_cache.load(backend, run.model, run.device)
        dataset = _dataset(backend, run.dataset, stack)
        params = parse_params(run.analysis, run.params, max_steps=run.max_steps)
        result = run_analysis(
            loaded,
            run.analysis,
            params,
            run.out_dir,
            dataset=dataset,
            device=run.device,
            progress=progress,
        )
        return _predict_generated(loaded, run.model, run.out_dir, result, run.device)


def _dataset(
    backend: Backend, dataset: str | DatasetRecord | None, stack: ExitStack
) -> Dataset | None:
    if dataset is None:
        return None
    if isinstance(dataset, str):
        return load_dataset(dataset, "train", fashion_mnist_dir=backend.settings.fashion_mnist_dir)
    path = stack.enter_context(runtime.local_blob(backend.storage, dataset.sha256, "dataset.npz"))
    return dataclasses.replace(load_dataset(str(path), "train"), name=dataset.name)


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
