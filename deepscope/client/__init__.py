"""The Python SDK of the deepscope service (httpx; never imports torch).

``Client(url, key)`` uploads models and datasets, submits analyses, waits for them with a
progress bar, predicts, and downloads results; the ``deepscope submit | wait | predict | check
| report`` commands are built on it.
"""

from deepscope.client.sdk import DEFAULT_URL, Client, DeepscopeError, resolve_credentials
from deepscope.contract import (
    Artifact,
    DatasetOut,
    GeneratedPrediction,
    GeneratedPredictions,
    JobError,
    JobOut,
    JobStatus,
    ModelOut,
    ModelStatus,
    Prediction,
    Result,
    TopK,
)

__all__ = [
    "DEFAULT_URL",
    "Artifact",
    "Client",
    "DatasetOut",
    "DeepscopeError",
    "GeneratedPrediction",
    "GeneratedPredictions",
    "JobError",
    "JobOut",
    "JobStatus",
    "ModelOut",
    "ModelStatus",
    "Prediction",
    "Result",
    "TopK",
    "resolve_credentials",
]
