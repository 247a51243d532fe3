"""``compare_results`` with known answers: hand-built results whose differences are worked out
by hand (matched layers, layers on one side only, a zero baseline, unbounded values, job-level
metrics, mismatched analyses and jobs without a result)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest

from deepscope.contract import (
    AnalysisMismatchError,
    CompareOut,
    JobOut,
    JobStatus,
    NotComparableError,
    Result,
    compare_results,
)
from deepscope.contract.compare import diff_values


def _spectrum(smallest: float, largest: float) -> dict[str, Any]:
    return {
        "count": 2,
        "max": largest,
        "min": smallest,
        "profile": {"indices": [0, 1], "values": [largest, smallest]},
        "top": [largest, smallest],
        "bottom": [smallest, largest],
        "quantiles": {"0.5": (largest + smallest) / 2},
        "histogram": {"log10_edges": [0.0, 1.0], "counts": [2], "zeros": 0},
    }


def _layer(name: str, cond: float | None, stable: float, norm: float, rank: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "linear",
        "view": "kernels",
        "matrix_shape": [2, 2],
        "rank": rank,
        "condition_number": cond,
        "stable_rank": stable,
        "spectral_norm": norm,
        "spectrum": _spectrum(1.0, norm),
    }


def _signal_space(*layers: dict[str, Any]) -> Result:
    return Result.model_validate(
        {"analysis": "signal_space", "metrics": {"view": "kernels", "layers": list(layers)}}
    )


def _job(job_id: str, result: Result | None, status: JobStatus) -> JobOut:
    now = datetime.now(UTC)
    return JobOut(
        id=job_id,
        status=status,
        progress=1.0,
        analysis="signal_space",
        params={},
        model_id="m",
        dataset=None,
        queue="cpu",
        cached=False,
        created_at=now,
        started_at=now,
        finished_at=now,
        result=result,
    )


def test_matched_layers_in_the_jobs_order_and_unmatched_on_both_sides() -> None:
    job = _signal_space(
        _layer("conv2", 30.0, 1.5, 4.0, 2),
        _layer("fc", 12.0, 2.0, 2.0, 2),
        _layer("new", 1.0, 1.0, 1.0, 1),
    )
    base = _signal_space(
        _layer("fc", 8.0, 2.5, 4.0, 2),
        _layer("old", 1.0, 1.0, 1.0, 1),
        _layer("conv2", 20.0, 1.0, 2.0, 2),
    )
    out = compare_results(_job("J", job, JobStatus.SUCCEEDED), _job("B", base, JobStatus.SUCCEEDED))
    assert isinstance(out, CompareOut)
    assert (out.job_id, out.baseline_id, out.analysis) == ("J", "B", "signal_space")
    assert [d.layer for d in out.layers] == ["conv2", "fc"]
    assert out.only_in_job == ["new"]
    assert out.only_in_baseline == ["old"]
    conv = out.layers[0].metrics
    assert set(conv) == {
        "rank",
        "condition_number",
        "stable_rank",
        "spectral_norm",
        "smallest_singular_value",
    }
    # 30 against 20: +10, +50 %.
    assert conv["condition_number"].model_dump() == {
        "value": 30.0,
        "baseline": 20.0,
        "difference": 10.0,
        "relative_change": 0.5,
    }
    assert conv["stable_rank"].relative_change == pytest.approx(0.5)
    fc = out.layers[1].metrics
    # 12 against 8: +50 %; 2 against 2.5: -20 %; 2 against 4: -50 %.
    assert fc["condition_number"].relative_change == pytest.approx(0.5)
    assert fc["stable_rank"].difference == pytest.approx(-0.5)
    assert fc["stable_rank"].relative_change == pytest.approx(-0.2)
    assert fc["spectral_norm"].relative_change == pytest.approx(-0.5)
    assert fc["rank"].difference == 0.0 and fc["rank"].relative_change == 0.0
    # The only job-level number signal_space has is none (view is text).
    assert out.metrics == {}
    # The wire form round-trips.
    assert CompareOut.model_validate_json(out.model_dump_json()) == out


def test_unbounded_and_zero_baselines() -> None:
    job = _signal_space(_layer("fc", None, 1.0, 2.0, 2))
    base = _signal_space(_layer("fc", 5.0, 0.0, 2.0, 2))
    out = compare_results(job, base, job_id="a", baseline_id="b")
    assert (out.job_id, out.baseline_id) == ("a", "b")
    fc = out.layers[0].metrics
    # An unbounded (singular) condition number: no difference, no relative change.
    assert fc["condition_number"].model_dump() == {
        "value": None,
        "baseline": 5.0,
        "difference": None,
        "relative_change": None,
    }
    # A zero baseline has a difference but no relative change.
    assert fc["stable_rank"].difference == 1.0
    assert fc["stable_rank"].relative_change is None


@pytest.mark.parametrize(
    ("value", "baseline", "expected"),
    [
        (3.0, 2.0, (3.0, 2.0, 1.0, 0.5)),
        (1.0, -4.0, (1.0, -4.0, 5.0, 1.25)),  # relative to |baseline|
        (0.0, 0.0, (0.0, 0.0, 0.0, None)),
        (math.inf, 2.0, (None, 2.0, None, None)),
        (2.0, math.nan, (2.0, None, None, None)),
        (None, None, (None, None, None, None)),
        (1e308, -1e308, (1e308, -1e308, None, None)),  # the difference overflows
    ],
)
def test_diff_values(
    value: float | None, baseline: float | None, expected: tuple[float | None, ...]
) -> None:
    d = diff_values(value, baseline)
    assert (d.value, d.baseline, d.difference, d.relative_change) == expected


def test_job_level_numbers_of_an_open_metrics_model() -> None:
    # An analysis this process does not know: open Metrics, layers[] read by the default.
    job = Result.model_validate(
        {
            "analysis": "someday",
            "metrics": {
                "accuracy": 0.9,
                "loss": 0.5,
                "name": "x",
                "flag": True,
                "only_mine": 1.0,
                "layers": [{"name": "a", "score": 2.0}, {"name": "b", "score": 1.0}],
            },
        }
    )
    base = Result.model_validate(
        {
            "analysis": "someday",
            "metrics": {
                "accuracy": 0.8,
                "loss": 1.0,
                "name": "y",
                "flag": False,
                "layers": [{"name": "a", "score": 4.0}],
            },
        }
    )
    out = compare_results(job, base)
    assert set(out.metrics) == {"accuracy", "loss"}  # numbers both have; no bools, no text
    assert out.metrics["accuracy"].difference == pytest.approx(0.1)
    assert out.metrics["accuracy"].relative_change == pytest.approx(0.125)
    assert out.metrics["loss"].relative_change == pytest.approx(-0.5)
    assert [d.layer for d in out.layers] == ["a"]
    assert out.layers[0].metrics["score"].relative_change == pytest.approx(-0.5)
    assert out.only_in_job == ["b"] and out.only_in_baseline == []


def test_what_cannot_be_compared() -> None:
    job = _signal_space(_layer("fc", 1.0, 1.0, 1.0, 1))
    other = Result.model_validate(
        {"analysis": "residuals", "metrics": {"inputs": "class_averages", "layers": []}}
    )
    with pytest.raises(AnalysisMismatchError, match=r"signal_space.*residuals") as err:
        compare_results(job, other)
    assert (err.value.analysis, err.value.baseline) == ("signal_space", "residuals")
    with pytest.raises(NotComparableError, match="baseline B has no result"):
        compare_results(_job("J", job, JobStatus.SUCCEEDED), _job("B", None, JobStatus.RUNNING))
