"""The SDK a pipeline leans on, against the real stack (Redis, workers, uvicorn): the
AsyncClient, retries through a real proxy that fails on purpose (503s, lost answers, a service
that comes up late or goes away during a wait), Idempotency-Keys, labels, paginated lists,
problem types, compare and bundles."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flaky_proxy import FlakyProxy
from stack_helpers import fcnn_weights, manifest_for

from deepscope.client import (
    AsyncClient,
    Client,
    CompareOut,
    DeepscopeError,
    JobOut,
    JobStatus,
    ModelOut,
    ModelStatus,
    RetryPolicy,
)
from deepscope.service.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Service = Any  # conftest.Service
FAST = RetryPolicy(retries=4, backoff=0.05, max_backoff=0.5)


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[Client]:
    with Client(service.url, service.key_a, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: Client, tmp_path_factory: pytest.TempPathFactory) -> ModelOut:
    weights = fcnn_weights(tmp_path_factory.mktemp("sdk-async"), seed=11)
    uploaded = client.upload_model(weights, manifest_for(), wait=True, timeout=120)
    assert uploaded.status is ModelStatus.READY, uploaded.error
    return uploaded


@pytest.fixture
def proxy(service: Service) -> Iterator[FlakyProxy]:
    flaky = FlakyProxy(service.url, free_port()).start()
    try:
        yield flaky
    finally:
        flaky.stop()


# --- AsyncClient --------------------------------------------------------------------------


def test_async_client_submits_waits_lists_and_downloads(
    service: Service, model: ModelOut, tmp_path: Path
) -> None:
    async def scenario() -> tuple[JobOut, list[JobOut], list[Path], CompareOut]:
        async with AsyncClient(service.url, service.key_a) as ds:
            # Two jobs at once: the async client's point.
            first, second = await asyncio.gather(
                ds.submit(model, "signal_space", {"vectors": 2}, labels={"suite": "async"}),
                ds.submit(model, "residuals", dataset="digits", labels={"suite": "async"}),
            )
            done = await asyncio.gather(ds.wait(first), ds.wait(second))
            listed = [j async for j in ds.iter_jobs(model_id=model.id, limit=1)]
            files = await ds.download_artifacts(done[0], tmp_path / "out")
            same = await ds.compare(done[0], done[0])
            return done[0], listed, files, same

    job, listed, files, same = asyncio.run(scenario())
    assert job.status is JobStatus.SUCCEEDED and job.result is not None
    assert job.labels == {"suite": "async"}
    # iter_jobs followed the cursors one job per page, newest first, and found both.
    assert {j.analysis for j in listed} >= {"signal_space", "residuals"}
    assert [j.created_at for j in listed] == sorted((j.created_at for j in listed), reverse=True)
    assert {p.name for p in files} >= {"result.json", "spectra.png"}
    (layer,) = same.layers
    assert layer.layer == "fc1" and layer.metrics["condition_number"].difference == 0.0


def test_async_client_errors_carry_the_problem_type(service: Service) -> None:
    async def scenario() -> DeepscopeError:
        async with AsyncClient(service.url, service.key_a) as ds:
            try:
                await ds.get_job("0" * 32)
            except DeepscopeError as exc:
                return exc
        raise AssertionError("no error")

    err = asyncio.run(scenario())
    assert err.status_code == 404 and err.type == "not_found"
    assert str(err).startswith("404: ")


# --- retries ------------------------------------------------------------------------------


def test_transient_errors_are_retried_for_safe_requests(
    service: Service, proxy: FlakyProxy, model: ModelOut
) -> None:
    with Client(proxy.url, service.key_a, retries=FAST) as ds:
        proxy.plan = ["503", "503"]
        assert ds.get_model(model).id == model.id
        assert [s.action for s in proxy.requests_to("GET /v1/models/")] == ["503", "503", "pass"]
        # Past its retries the 503 comes through, marked transient.
        proxy.plan = ["503"] * 5
        with pytest.raises(DeepscopeError) as err:
            ds.get_model(model)
        assert err.value.status_code == 503 and err.value.transient
        assert len(proxy.requests_to("GET /v1/models/")) == 3 + 5
        # A POST without an Idempotency-Key (a dataset upload) is never sent twice.
        proxy.seen.clear()
        proxy.plan = ["503"]
        with pytest.raises(DeepscopeError) as err:
            ds.upload_dataset(Path(__file__))
        assert err.value.status_code == 503
        assert len(proxy.requests_to("POST /v1/datasets")) == 1


def test_a_lost_answer_to_a_submit_or_an_upload_returns_the_same_object(
    service: Service, proxy: FlakyProxy, client: Client, tmp_path: Path
) -> None:
    with Client(proxy.url, service.key_a, retries=FAST) as ds:
        proxy.only, proxy.plan = "POST /v1/models", ["lose"]
        weights = fcnn_weights(tmp_path, seed=12)
        uploaded = ds.upload_model(weights, manifest_for())
        first, second = proxy.requests_to("POST /v1/models")
        assert (first.action, second.action) == ("lose", "pass")
        key = first.headers["Idempotency-Key"]
        assert key and second.headers["Idempotency-Key"] == key
        assert first.upstream_status is not None and first.upstream_status < 300
        assert json.loads(first.upstream_body)["id"] == uploaded.id
        client.wait_model(uploaded)

        proxy.only, proxy.plan = "POST /v1/jobs", ["lose"]
        job = ds.submit(uploaded, "signal_space", {"vectors": 3})
        first, second = proxy.requests_to("POST /v1/jobs")
        assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
        assert json.loads(first.upstream_body)["id"] == job.id
        # The server made one job of the two requests.
        assert [j.id for j in client.list_jobs(model_id=uploaded.id)] == [job.id]
        # A logical call of its own gets a key of its own.
        ds.submit(uploaded, "signal_space", {"vectors": 3})
        keys = {s.headers["Idempotency-Key"] for s in proxy.requests_to("POST /v1/jobs")}
        assert len(keys) == 2


def test_an_explicit_idempotency_key_makes_a_rerun_safe(client: Client, model: ModelOut) -> None:
    key = f"pipeline-run-{time.time_ns()}"
    job = client.submit(model, "signal_space", {"vectors": 5}, idempotency_key=key)
    again = client.submit(model, "signal_space", {"vectors": 5}, idempotency_key=key)
    assert again.id == job.id
    with pytest.raises(DeepscopeError) as err:
        client.submit(model, "signal_space", {"vectors": 6}, idempotency_key=key)
    assert err.value.status_code == 409 and err.value.type == "idempotency_conflict"


def test_a_client_started_before_its_server_retries_until_it_answers(
    service: Service, model: ModelOut
) -> None:
    port = free_port()
    late = FlakyProxy(service.url, port)
    timer = threading.Timer(1.0, late.start)
    timer.start()
    try:
        policy = RetryPolicy(retries=10, backoff=0.1, max_backoff=0.5)
        with Client(late.url, service.key_a, retries=policy) as ds:
            started = time.monotonic()
            assert ds.get_model(model).id == model.id
            assert time.monotonic() - started >= 0.9
    finally:
        timer.join()
        late.stop()


def test_wait_polls_through_an_outage(
    service: Service, proxy: FlakyProxy, client: Client, model: ModelOut
) -> None:
    job = client.submit(model, "residuals", dataset="digits")
    proxy.stop()  # connection refused from now on
    restart = threading.Timer(2.0, proxy.start)
    restart.start()
    try:
        with Client(proxy.url, service.key_a, retries=0) as ds:
            started = time.monotonic()
            done = ds.wait(job.id, progress=False, timeout=120)
            assert time.monotonic() - started >= 1.9
        assert done.status is JobStatus.SUCCEEDED
    finally:
        restart.join()
    # Not forever: with a short unreachable_timeout the wait gives up with the real cause.
    proxy.stop()
    with Client(proxy.url, service.key_a, retries=0, unreachable_timeout=0.5) as ds:
        with pytest.raises(DeepscopeError, match="cannot reach") as err:
            ds.wait(job.id, progress=False)
        assert err.value.transient


# --- lists, labels, problems, compare, bundle -------------------------------------------


def test_labels_filter_and_cursor_pagination(client: Client, model: ModelOut) -> None:
    run = f"r{time.time_ns()}"
    jobs = [
        client.submit(model, "signal_space", {"vectors": v}, labels={"run": run, "v": str(v)})
        for v in (1, 2, 3)
    ]
    page = client.list_jobs(labels={"run": run}, limit=2)
    assert [j.id for j in page] == [jobs[2].id, jobs[1].id] and page.next_cursor
    rest = client.list_jobs(labels={"run": run}, limit=2, cursor=page.next_cursor)
    assert [j.id for j in rest] == [jobs[0].id] and rest.next_cursor is None
    assert [j.id for j in client.iter_jobs(labels={"run": run}, limit=1)] == [
        j.id for j in reversed(jobs)
    ]
    assert [j.id for j in client.list_jobs(labels={"run": run, "v": "2"})] == [jobs[1].id]
    assert len(client.list_jobs(labels={"run": run}, analysis="residuals")) == 0
    assert model.id in {m.id for m in client.iter_models(status="ready", limit=1)}


def test_errors_carry_the_problem_type_and_fields(client: Client, model: ModelOut) -> None:
    with pytest.raises(DeepscopeError) as err:
        client.submit(model, "signal_space", {"vectors": -1})
    assert err.value.status_code == 422 and err.value.type == "invalid_params"
    assert err.value.errors and any("vectors" in map(str, e["loc"]) for e in err.value.errors)
    assert "vectors" in str(err.value)
    with pytest.raises(DeepscopeError) as err:
        client.submit(model, "signal_space", callback_url="ftp://example.com/hook")
    assert err.value.status_code == 422 and err.value.type == "callback_not_allowed"
    job = client.wait(client.submit(model, "signal_space", {"vectors": 2}), progress=False)
    with pytest.raises(DeepscopeError) as err:
        client.cancel(job)
    assert err.value.status_code == 409 and err.value.type == "job_finished"


def test_compare_and_bundle(client: Client, model: ModelOut, tmp_path: Path) -> None:
    weights = fcnn_weights(tmp_path, seed=13)
    other = client.upload_model(weights, manifest_for(), wait=True)
    mine = client.wait(client.submit(model, "signal_space"), progress=False)
    base = client.wait(client.submit(other, "signal_space"), progress=False)
    comparison = client.compare(mine, base)
    assert comparison.job_id == mine.id and comparison.baseline_id == base.id
    (layer,) = comparison.layers
    cond = layer.metrics["condition_number"]
    assert mine.result is not None and base.result is not None
    assert cond.value == mine.result.metrics.layer_values()["fc1"]["condition_number"]
    assert cond.baseline == base.result.metrics.layer_values()["fc1"]["condition_number"]
    residuals = client.wait(client.submit(model, "residuals", dataset="digits"), progress=False)
    with pytest.raises(DeepscopeError) as err:
        client.compare(mine, residuals)
    assert err.value.status_code == 422 and err.value.type == "analysis_mismatch"

    path = client.download_bundle(mine, tmp_path)
    assert path == tmp_path / f"{mine.id}.zip"
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as zf:
        names = set(zf.namelist())
        assert {"result.json", "report.html", "artifacts/spectra.png"} <= names
        assert json.loads(zf.read("result.json"))["id"] == mine.id
    assert not list(tmp_path.glob(".*.part"))
