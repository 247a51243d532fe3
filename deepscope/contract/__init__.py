"""The typed contract between deepscope's processes and its clients: statuses, job errors,
results and the HTTP bodies. Pydantic only: no torch, no redis, no web framework, so the
workers build it, the service stores and serves it, and the SDK, the CLI and the report read it.
"""

from deepscope.contract.api import (
    DatasetList,
    DatasetOut,
    HealthOut,
    JobIn,
    JobList,
    JobOut,
    LinkOut,
    ModelList,
    ModelOut,
    PredictOut,
    ProblemFieldError,
    ProblemOut,
    ReadyOut,
)
from deepscope.contract.compare import (
    AnalysisMismatchError,
    CompareOut,
    LayerDiff,
    MetricDiff,
    NotComparableError,
    compare_results,
)
from deepscope.contract.errors import ProblemType
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
    "AnalysisMismatchError",
    "Artifact",
    "CompareOut",
    "DatasetList",
    "DatasetOut",
    "GeneratedPrediction",
    "GeneratedPredictions",
    "HealthOut",
    "JobError",
    "JobIn",
    "JobList",
    "JobOut",
    "JobStatus",
    "LayerDiff",
    "LayerInfo",
    "LayerValues",
    "LinkOut",
    "MetricDiff",
    "Metrics",
    "ModelInfo",
    "ModelList",
    "ModelOut",
    "ModelStatus",
    "NotComparableError",
    "PredictMetrics",
    "PredictOut",
    "Prediction",
    "ProblemFieldError",
    "ProblemOut",
    "ProblemType",
    "ReadyOut",
    "Result",
    "Table",
    "TopK",
    "compare_results",
    "fmt",
]
