"""The Python SDK of the deepscope service (httpx; never imports torch).

``Client(url, key)`` uploads models and datasets, submits analyses, waits for them with a
progress bar, predicts, compares jobs, downloads results and logs them to MLflow;
``AsyncClient`` is the same for asyncio. The ``deepscope submit | wait | jobs | diff | check |
…`` commands are built on it. ``verify_signature`` checks a webhook delivery's
``Deepscope-Signature``.
"""

from deepscope.client._core import Page, RetryPolicy
from deepscope.client.async_client import AsyncClient
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
from deepscope.contract.compare import CompareOut, LayerDiff, MetricDiff
from deepscope.contract.signing import verify_signature

__all__ = [
    "DEFAULT_URL",
    "Artifact",
    "AsyncClient",
    "Client",
    "CompareOut",
    "DatasetOut",
    "DeepscopeError",
    "GeneratedPrediction",
    "GeneratedPredictions",
    "JobError",
    "JobOut",
    "JobStatus",
    "LayerDiff",
    "MetricDiff",
    "ModelOut",
    "ModelStatus",
    "Page",
    "Prediction",
    "Result",
    "RetryPolicy",
    "TopK",
    "resolve_credentials",
    "verify_signature",
]
