"""Long polling, ``GET /v1/jobs/{id}?wait=S``, against the real stack: the answer comes when the
job ends (told through Redis pub/sub, not found by polling), or after ``S`` seconds."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from conftest import Service
from stack_helpers import fcnn_weights, manifest_for, upload_model, wait_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(alice: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    weights = fcnn_weights(tmp_path_factory.mktemp("wait"), seed=7)
    resp = upload_model(alice, weights.read_bytes(), manifest_for(), "fcnn1.safetensors")
    assert resp.status_code == 202, resp.text
    ready = wait_model(alice, resp.json()["id"])
    assert ready["status"] == "ready", ready
    return ready


@contextmanager
def paused_workers(service: Service) -> Iterator[None]:
    """Stopped workers take nothing: a job submitted meanwhile stays queued."""
    for proc in service.workers:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in service.workers:
            os.kill(proc.pid, signal.SIGCONT)


def _submit(client: httpx.Client, model: dict[str, Any], vectors: int) -> str:
    body = {
        "model_id": model["id"],
        "analysis": "signal_space",
        "params": {"vectors": vectors, "images": False},
    }
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_a_wait_ends_when_the_job_ends(
    service: Service, alice: httpx.Client, model: dict[str, Any]
) -> None:
    with paused_workers(service):
        job_id = _submit(alice, model, 41)
        # Nothing runs: the wait lasts what was asked, then says where the job is.
        start = time.monotonic()
        resp = alice.get(f"/v1/jobs/{job_id}", params={"wait": 1.0})
        waited = time.monotonic() - start
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "queued"
        assert 0.9 <= waited < 3.0, waited

        # Canceled from elsewhere half a second into a 20-second wait: the wait ends then.
        timer = threading.Timer(0.5, lambda: alice.delete(f"/v1/jobs/{job_id}"))
        start = time.monotonic()
        timer.start()
        try:
            with service.client(service.key_a) as other:
                resp = other.get(f"/v1/jobs/{job_id}", params={"wait": 20})
        finally:
            timer.join()
        waited = time.monotonic() - start
        assert resp.json()["status"] == "canceled", resp.json()
        assert 0.4 <= waited < 3.0, waited

    # A job that runs: one request from submission to the result.
    job_id = _submit(alice, model, 42)
    resp = alice.get(f"/v1/jobs/{job_id}", params={"wait": 40}, timeout=60)
    body = resp.json()
    assert body["status"] == "succeeded", body
    assert body["result"]["metrics"]["layers"], body


def test_wait_bounds_and_tenants(
    alice: httpx.Client, bob: httpx.Client, model: dict[str, Any]
) -> None:
    job_id = _submit(alice, model, 43)
    too_long = alice.get(f"/v1/jobs/{job_id}", params={"wait": 3600})
    assert too_long.status_code == 422, too_long.text
    assert "wait" in too_long.text
    # Another tenant's job is not found at once, whatever the wait.
    start = time.monotonic()
    assert bob.get(f"/v1/jobs/{job_id}", params={"wait": 10}).status_code == 404
    assert time.monotonic() - start < 2.0


def test_a_finished_job_answers_at_once(alice: httpx.Client, model: dict[str, Any]) -> None:
    job_id = _submit(alice, model, 44)
    done = alice.get(f"/v1/jobs/{job_id}", params={"wait": 40}, timeout=60).json()
    assert done["status"] == "succeeded"
    start = time.monotonic()
    again = alice.get(f"/v1/jobs/{job_id}", params={"wait": 40}).json()
    assert again["status"] == "succeeded"
    assert time.monotonic() - start < 1.0


def test_the_sdk_waits_by_long_polling(service: Service, model: dict[str, Any]) -> None:
    from deepscope.client import Client

    paths: list[str] = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            paths.append(f"{request.url.path}?{request.url.query.decode()}")
            return super().handle_request(request)

    def resume() -> None:
        for proc in service.workers:
            os.kill(proc.pid, signal.SIGCONT)

    with Client(service.url, service.key_a, transport=Counting()) as ds:
        for proc in service.workers:
            os.kill(proc.pid, signal.SIGSTOP)
        timer = threading.Timer(1.5, resume)
        try:
            job = ds.submit(model["id"], "signal_space", {"vectors": 46, "images": False})
            timer.start()
            done = ds.wait(job, progress=False, timeout=60)
        finally:
            timer.cancel()
            resume()
    assert done.status.value == "succeeded"
    # Told by the service when the job ended: one held request (a poller would have sent a
    # dozen in those seconds).
    polls = [p for p in paths if p.startswith(f"/v1/jobs/{job.id}")]
    assert 1 <= len(polls) <= 2, polls
    assert "wait=30" in polls[0], polls


def test_the_cache_answers_the_moment_the_end_is_known(
    alice: httpx.Client, model: dict[str, Any]
) -> None:
    # The result-cache entry is written in the transaction that ends the job, so a client told
    # of the end (long polling) and resubmitting at once is answered from the cache.
    for vectors in (47, 48, 49):
        job_id = _submit(alice, model, vectors)
        done = alice.get(f"/v1/jobs/{job_id}", params={"wait": 40}, timeout=60).json()
        assert done["status"] == "succeeded", done
        again = alice.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "analysis": "signal_space",
                "params": {"vectors": vectors, "images": False},
            },
        ).json()
        assert again["cached"] is True and again["status"] == "succeeded", again


def test_prefer_wait_submits_and_waits_in_one_request(
    service: Service, alice: httpx.Client, model: dict[str, Any]
) -> None:
    body = {"model_id": model["id"], "analysis": "signal_space", "params": {"vectors": 51}}
    # The answer comes when the job ended, with its result (the pictures drawn by then).
    resp = alice.post("/v1/jobs", json=body, headers={"Prefer": "wait=40"}, timeout=60)
    assert resp.status_code == 202, resp.text
    assert resp.headers["Preference-Applied"] == "wait=40"
    done = resp.json()
    assert done["status"] == "succeeded", done
    assert resp.headers["Location"] == f"/v1/jobs/{done['id']}"
    pictures = [a["url"] for a in done["result"]["artifacts"] if a["url"].endswith(".png")]
    assert any(url.endswith("/spectra.png") for url in pictures), pictures
    for url in pictures:
        art = alice.get(url)
        assert art.status_code == 200 and art.content[:4] == b"\x89PNG", url

    # Nothing runs: the answer comes after the wait asked for, with the job queued.
    with paused_workers(service):
        start = time.monotonic()
        resp = alice.post(
            "/v1/jobs",
            json=body | {"params": {"vectors": 52, "images": False}},
            headers={"Prefer": "respond-async, wait=1"},
        )
        waited = time.monotonic() - start
        assert resp.status_code == 202 and resp.json()["status"] == "queued", resp.text
        assert 0.9 <= waited < 3.0, waited
        # A malformed preference is ignored (RFC 7240): answered at once.
        start = time.monotonic()
        resp = alice.post(
            "/v1/jobs",
            json=body | {"params": {"vectors": 53, "images": False}},
            headers={"Prefer": "wait=soon"},
        )
        assert resp.json()["status"] == "queued" and "Preference-Applied" not in resp.headers
        assert time.monotonic() - start < 1.0

    # A result already known answers at once.
    start = time.monotonic()
    again = alice.post("/v1/jobs", json=body, headers={"Prefer": "wait=40"}).json()
    assert again["cached"] is True and again["status"] == "succeeded", again
    assert time.monotonic() - start < 1.0


def test_the_sdk_submits_and_waits_in_one_request(service: Service, model: dict[str, Any]) -> None:
    from deepscope.client import Client

    sent: list[httpx.Request] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request)
            return super().handle_request(request)

    with Client(service.url, service.key_a, transport=Recording(), timeout=60) as ds:
        job = ds.submit(model["id"], "signal_space", {"vectors": 54, "images": False}, wait=30)
        done = ds.wait(job, progress=False)
    assert job.status.value == "succeeded" and done.id == job.id
    assert len(sent) == 1, [str(r.url) for r in sent]  # wait() had nothing to ask
    assert sent[0].headers["Prefer"] == "wait=30"
