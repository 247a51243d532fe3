"""The Python SDK of the deepscope service (httpx; never imports torch).

``Client(url, key)`` uploads models and datasets, submits analyses, waits for them with a
progress bar, predicts, and downloads results; the ``deepscope submit | wait | predict | check
| report`` commands are built on it.
"""

from deepscope.client.sdk import DEFAULT_URL, Client, DeepscopeError, resolve_credentials
from deepscope.service.schemas import (
    ArtifactOut,
    DatasetOut,
    GeneratedPrediction,
    GeneratedPredictions,
    JobOut,
    JobResultOut,
    ModelOut,
    Prediction,
    TopK,
)
from deepscope.store.records import JobError, JobStatus, ModelStatus

__all__ = [
    "DEFAULT_URL",
    "ArtifactOut",
    "Client",
    "DatasetOut",
    "DeepscopeError",
    "GeneratedPrediction",
    "GeneratedPredictions",
    "JobError",
    "JobOut",
    "JobResultOut",
    "JobStatus",
    "ModelOut",
    "ModelStatus",
    "Prediction",
    "TopK",
    "resolve_credentials",
]
