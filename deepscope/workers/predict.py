"""The RQ job that predicts: logits, probabilities and top-k classes of posted images, and the
same for the images an analysis generated."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from deepscope.contract.result import PREDICT_ANALYSIS, PredictMetrics, Result
from deepscope.models.loading import LoadedModel
from deepscope.store import lifecycle
from deepscope.store.backend import Backend
from deepscope.store.records import JobRecord
from deepscope.store.storage import Storage
from deepscope.workers import model_cache, runtime

__all__ = ["predict", "predictions"]

_PREDICT_BATCH = 256


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


def predictions(
    loaded: LoadedModel, images: np.ndarray, top_k: int, device: str
) -> list[dict[str, Any]]:
    x = loaded.normalization.normalize(torch.from_numpy(np.ascontiguousarray(images)))
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


def predict(job_id: str) -> dict[str, Any]:
    """RQ job: predictions for the images stored under the job's id."""
    backend = runtime.backend()
    job = lifecycle.start(backend.records, job_id)
    if job is None:
        return {"status": "skipped"}
    try:
        model = backend.records.get_model(job.model_id, job.tenant)
        if model is None:
            raise ValueError(f"model {job.model_id} was deleted")
        device = runtime.device()
        loaded = model_cache.load(backend, model, device)
        images = _decode_inputs(backend, job, loaded.input_shape)
        top_k = int(job.params.get("top_k", 5))
        result = Result(
            analysis=PREDICT_ANALYSIS,
            params=job.params,
            metrics=PredictMetrics.model_validate(
                {"predictions": predictions(loaded, images, top_k, device)}
            ),
        )
        if runtime.succeed(backend, job, result) is None:
            return {"status": "superseded"}
        return {"status": "succeeded"}
    except Exception as exc:
        return runtime.fail(backend, job, exc)
