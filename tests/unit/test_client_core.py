"""The SDK's shared core without a server: problem+json parsing, which requests are retried and
how long it waits, and the baseline gate of ``deepscope check``."""

from __future__ import annotations

import json

import httpx
import pytest

from deepscope.client._core import (
    IDEMPOTENCY_HEADER,
    DeepscopeError,
    Request,
    RetryPolicy,
    response_error,
    submit_request,
)
from deepscope.contract.compare import CompareOut, LayerDiff, diff_values
from deepscope.gates import gate_increase, parse_increase


def _response(status: int, body: object, media: str = "application/json") -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(body).encode(), headers={"content-type": media}
    )


def test_problem_details_become_type_and_errors() -> None:
    body = {
        "type": "/v1/problems/invalid_params",
        "title": "Invalid parameters",
        "status": 422,
        "detail": "params.vectors: must be at least 1",
        "instance": "/v1/jobs",
        "errors": [{"loc": ["body", "params", "vectors"], "msg": "too small", "type": "ge"}],
    }
    err = response_error(_response(422, body, "application/problem+json"))
    assert err.type == "invalid_params" and err.status_code == 422
    assert err.errors == body["errors"]
    assert str(err) == "422: params.vectors: must be at least 1"
    assert not err.transient
    # An old server's {"detail": ...}: no type, the same text.
    old = response_error(_response(404, {"detail": "job x not found"}))
    assert old.type is None and old.errors is None and str(old) == "404: job x not found"
    # A proxy's page: its text, and worth a retry.
    gateway = response_error(httpx.Response(503, text="try again later"))
    assert gateway.transient and gateway.detail == "try again later" and gateway.type is None


def test_what_is_retried() -> None:
    policy = RetryPolicy(retries=2, backoff=0.1, max_backoff=1.0)
    transient = DeepscopeError(503, "busy", transient=True)
    get = Request("GET", "/v1/jobs")
    assert policy.delay(get, 0, transient) is not None
    assert policy.delay(get, 2, transient) is None  # out of retries
    assert policy.delay(get, 0, DeepscopeError(404, "no", problem="not_found")) is None
    # A POST only with an Idempotency-Key (which submit always sends, fresh per call).
    assert policy.delay(Request("POST", "/v1/datasets"), 0, transient) is None
    submit = submit_request("m" * 32, "signal_space")
    assert submit.headers[IDEMPOTENCY_HEADER]
    assert submit.headers != submit_request("m" * 32, "signal_space").headers
    assert submit_request("m", "x", idempotency_key="k").headers[IDEMPOTENCY_HEADER] == "k"
    assert policy.delay(submit, 0, transient) is not None
    in_progress = DeepscopeError(409, "busy", problem="idempotency_in_progress")
    delay = policy.delay(submit, 0, in_progress, {"retry-after": "1"})
    assert delay == pytest.approx(1.0)
    # Backoff doubles, with jitter, up to the ceiling.
    assert 0.05 <= (policy.delay(get, 0, transient) or 0) <= 0.1
    assert 0.1 <= (policy.delay(get, 1, transient) or 0) <= 0.2


def _comparison(value: float | None, baseline: float | None) -> CompareOut:
    return CompareOut(
        job_id="j" * 32,
        baseline_id="b" * 32,
        analysis="signal_space",
        layers=[LayerDiff(layer="fc1", metrics={"condition_number": diff_values(value, baseline)})],
        only_in_job=["fc2"],
    )


def test_max_increase() -> None:
    assert parse_increase("condition_number=50%") == ("condition_number", 50.0)
    assert parse_increase("condition_number= 12.5 ") == ("condition_number", 12.5)
    for bad in ("condition_number", "condition_number=x%", "nope=5", "condition_number=inf"):
        with pytest.raises(ValueError, match="--max-increase"):
            parse_increase(bad)
    grew = gate_increase([_comparison(30.0, 10.0)], "condition_number", 150.0)
    (line,) = grew.failures
    assert "layer fc1" in line and "10 → 30" in line and "+200.0%" in line
    assert not gate_increase([_comparison(30.0, 10.0)], "condition_number", 250.0).failures
    # To ∞ fails; from ∞ or down does not; a layer only the job has is noted.
    assert gate_increase([_comparison(None, 10.0)], "condition_number", 1e9).failures
    assert not gate_increase([_comparison(5.0, None)], "condition_number", 0).failures
    fine = gate_increase([_comparison(5.0, 10.0)], "condition_number", 0)
    assert not fine.failures and any("fc2" in c for c in fine.checked)
    # A metric no layer has fails rather than passes.
    assert gate_increase([_comparison(1.0, 1.0)], "lost_fraction_max", 10).failures


def test_submit_and_wait_in_one_request() -> None:
    from deepscope.client import _core

    request = _core.submit_request("m" * 32, "signal_space", wait=12.0)
    assert request.headers["Prefer"] == "wait=12"
    assert "Prefer" not in _core.submit_request("m" * 32, "signal_space").headers
    # The hold stays under the client's read timeout, or the transport would give up first.
    assert _core.held(30.0, 60.0) == 30.0 and _core.held(30.0, 20.0) == 15.0
    assert _core.held(30.0, None) == 30.0
