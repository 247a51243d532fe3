"""The typed contract between deepscope's processes and its clients: statuses, job errors,
results and the HTTP bodies. Pydantic only: no torch, no redis, no web framework, so the
workers build it, the service stores and serves it, and the SDK, the CLI and the report read it.
"""

from deepscope.contract.api import (
    DatasetList,
    DatasetOut,
    ErrorOut,
    HealthOut,
    JobIn,
    JobList,
    JobOut,
    LinkOut,
    ModelList,
    ModelOut,
    PredictOut,
    ReadyOut,
)
from deepscope.contract.result import (
    Artifact,
    GeneratedPrediction,
    GeneratedPredictions,
    LayerValues,
    Metrics,
    ModelInfo,
    Prediction,
    PredictMetrics,
    Result,
    TopK,
)
from deepscope.contract.status import JobError, JobStatus, LayerInfo, ModelStatus
from deepscope.contract.tables import Table, fmt

__all__ = [
    "Artifact",
    "DatasetList",
    "DatasetOut",
    "ErrorOut",
    "GeneratedPrediction",
    "GeneratedPredictions",
    "HealthOut",
    "JobError",
    "JobIn",
    "JobList",
    "JobOut",
    "JobStatus",
    "LayerInfo",
    "LayerValues",
    "LinkOut",
    "Metrics",
    "ModelInfo",
    "ModelList",
    "ModelOut",
    "ModelStatus",
    "PredictMetrics",
    "PredictOut",
    "Prediction",
    "ReadyOut",
    "Result",
    "Table",
    "TopK",
    "fmt",
]
