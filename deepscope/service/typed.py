"""HTTP bodies typed by the analysis registry, built when the app is: a job's ``params`` and its
``result`` as unions discriminated by ``analysis``, so that FastAPI validates a submission
against its analysis's params model and ``/docs`` shows every analysis's params and metrics.

Built from whatever is registered when :func:`job_models` runs (plugins included).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from deepscope.analyses.registry import AnalysisSpec, list_analyses
from deepscope.contract.api import JobIn, JobOut
from deepscope.contract.result import PREDICT_ANALYSIS, Metrics, PredictMetrics, Result

__all__ = ["JobModels", "job_models"]


class JobModels(BaseModel):
    """The request and response types of ``/v1/jobs`` for the registered analyses."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    job_in: Any
    job_out: type[JobOut]


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _tag(name: str) -> Any:
    return Literal[name]


def _job_in(spec: AnalysisSpec) -> type[BaseModel]:
    return create_model(
        f"{_camel(spec.name)}JobIn",
        __base__=JobIn,
        __doc__=f"A ``{spec.name}`` job: {spec.summary}.",
        analysis=(_tag(spec.name), ...),
        params=(spec.params, Field(default_factory=spec.params)),
    )


def _result(name: str, metrics: type[Metrics], summary: str) -> type[Result]:
    return create_model(
        f"{_camel(name)}Result",
        __base__=Result,
        __doc__=f"The result of a ``{name}`` job: {summary}.",
        analysis=(_tag(name), ...),
        metrics=(metrics, ...),
    )


def job_models() -> JobModels:
    """``JobIn`` and ``JobOut`` for every registered analysis."""
    specs = list_analyses()
    ins = tuple(_job_in(spec) for spec in specs)
    results = (
        *(_result(s.name, s.metrics, s.summary) for s in specs),
        _result(PREDICT_ANALYSIS, PredictMetrics, "what the model says about posted images"),
    )
    union: Any = Union
    job_in = Annotated[union[ins], Field(discriminator="analysis")]
    result = Annotated[union[results], Field(discriminator="analysis")]
    job_out = create_model("JobOut", __base__=JobOut, result=(result | None, None))
    return JobModels(job_in=job_in, job_out=job_out)
