"""Two results of the same analysis side by side: every numeric metric of the job against the
baseline's, per layer (layers matched by name) and for the whole job. Pydantic only and pure,
so the service's ``GET /v1/jobs/{id}/compare``, the SDK and ``deepscope diff`` / ``check
--baseline`` compute the same thing."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

from deepscope.contract.api import JobOut
from deepscope.contract.result import LayerValues, Result, as_number, is_number

__all__ = [
    "AnalysisMismatchError",
    "CompareOut",
    "LayerDiff",
    "MetricDiff",
    "NotComparableError",
    "compare_results",
    "diff_values",
]


class MetricDiff(BaseModel):
    """One metric of the job against the baseline's. None: absent or unbounded (∞, NaN)."""

    value: float | None = Field(description="the job's value")
    baseline: float | None = Field(description="the baseline's value")
    difference: float | None = Field(description="value − baseline; null if either is null")
    relative_change: float | None = Field(
        description="(value − baseline) / |baseline|; null when the baseline is 0 or either is null"
    )


class LayerDiff(BaseModel):
    """Every numeric metric of one layer both results have."""

    layer: str
    metrics: dict[str, MetricDiff]


class CompareOut(BaseModel):
    """A job compared with a baseline job of the same analysis."""

    job_id: str | None = None
    baseline_id: str | None = None
    analysis: str
    layers: list[LayerDiff] = Field(
        description="layers both results have, matched by name, in the job's order"
    )
    only_in_job: list[str] = Field(default_factory=list, description="layers the baseline lacks")
    only_in_baseline: list[str] = Field(default_factory=list, description="layers the job lacks")
    metrics: dict[str, MetricDiff] = Field(
        default_factory=dict, description="job-level numeric metrics both results have"
    )


class NotComparableError(ValueError):
    """A job without a result (not succeeded) cannot be compared."""


class AnalysisMismatchError(ValueError):
    """The two results are of different analyses."""

    def __init__(self, analysis: str, baseline: str) -> None:
        self.analysis = analysis
        self.baseline = baseline
        super().__init__(
            f"cannot compare a {analysis} result with a {baseline} baseline: "
            "both jobs must run the same analysis"
        )


def _finite(value: float | None) -> float | None:
    return None if value is None else as_number(float(value))


def diff_values(value: float | None, baseline: float | None) -> MetricDiff:
    """One metric's difference. Non-finite values count as unbounded (None)."""
    v, b = _finite(value), _finite(baseline)
    difference = None if v is None or b is None else v - b
    relative = None
    if difference is not None and b is not None and b != 0:
        relative = difference / abs(b)
        if not math.isfinite(relative):  # a subnormal baseline overflows the ratio
            relative = None
    if difference is not None and not math.isfinite(difference):
        difference = None
    return MetricDiff(value=v, baseline=b, difference=difference, relative_change=relative)


def _job_level(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The top-level numbers of a metrics dump (per-layer records and lists are elsewhere)."""
    return {
        k: (None if v is None else as_number(float(v)))
        for k, v in metrics.items()
        if v is not None and is_number(v)
    }


def _result_of(item: JobOut | Result, what: str) -> tuple[str | None, Result]:
    if isinstance(item, JobOut):
        if item.result is None:
            raise NotComparableError(
                f"{what} {item.id} has no result (status {item.status.value}); "
                "only succeeded jobs can be compared"
            )
        return item.id, item.result
    return None, item


def compare_results(
    job: JobOut | Result,
    baseline: JobOut | Result,
    *,
    job_id: str | None = None,
    baseline_id: str | None = None,
) -> CompareOut:
    """Compare ``job`` with ``baseline`` (jobs with their results, or results).

    Per-layer numbers come from each result's metrics model (``layer_values()``, the same
    numbers ``check --max`` gates on); layers are matched by name, in the job's order, and a
    metric is compared where both layers report it. Job-level numbers are the metrics' numeric
    top-level fields. ``job_id`` / ``baseline_id`` override the ids taken from a JobOut.

    Raises:
        NotComparableError: a JobOut without a result.
        AnalysisMismatchError: the results are of different analyses.
    """
    jid, result = _result_of(job, "job")
    bid, base = _result_of(baseline, "baseline")
    if result.analysis != base.analysis:
        raise AnalysisMismatchError(result.analysis, base.analysis)
    mine: LayerValues = result.metrics.layer_values()
    theirs: LayerValues = base.metrics.layer_values()
    layers = [
        LayerDiff(
            layer=name,
            metrics={
                metric: diff_values(value, theirs[name][metric])
                for metric, value in values.items()
                if metric in theirs[name]
            },
        )
        for name, values in mine.items()
        if name in theirs
    ]
    top = _job_level(result.metrics.model_dump())
    top_base = _job_level(base.metrics.model_dump())
    return CompareOut(
        job_id=job_id if job_id is not None else jid,
        baseline_id=baseline_id if baseline_id is not None else bid,
        analysis=result.analysis,
        layers=layers,
        only_in_job=[name for name in mine if name not in theirs],
        only_in_baseline=[name for name in theirs if name not in mine],
        metrics={k: diff_values(v, top_base[k]) for k, v in top.items() if k in top_base},
    )
