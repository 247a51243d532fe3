"""The HTTP contract a pipeline relies on (issue 11, items 1-5), against the real stack:
problem+json errors with stable types, Idempotency-Key, upload deduplication, labels, and
cursor pagination with filters applied before the limit."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import launch_stack
from fastapi import FastAPI
from fastapi.testclient import TestClient
from stack_helpers import (
    fcnn_weights,
    manifest_for,
    upload_model,
    wait_job,
    wait_model,
)

from deepscope.contract.errors import ProblemType
from deepscope.service.app import create_app
from deepscope.settings import Settings

pytestmark = pytest.mark.integration
Service = Any

PROBLEM = "application/problem+json"


def assert_problem(resp: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem of this status and type; → its body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
    body: dict[str, Any] = resp.json()
    assert body["type"] == f"/v1/problems/{slug}", body
    assert body["status"] == status and body["title"] and body["detail"], body
    assert body["instance"] == resp.request.url.path, body
    assert "\n" not in body["detail"]
    return body


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline-weights")


@pytest.fixture(scope="module")
def model(alice: httpx.Client, weights_dir: Path) -> dict[str, Any]:
    data = fcnn_weights(weights_dir, seed=11).read_bytes()
    resp = upload_model(alice, data, manifest_for(name="pipeline"), "fcnn1.safetensors")
    assert resp.status_code in (200, 202), resp.text
    ready = wait_model(alice, resp.json()["id"])
    assert ready["status"] == "ready", ready
    return ready


def _submit(
    client: httpx.Client,
    model_id: str,
    vectors: int = 2,
    labels: dict[str, str] | None = None,
    key: str | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {
        "model_id": model_id,
        "analysis": "signal_space",
        "params": {"vectors": vectors},
    }
    if labels is not None:
        body["labels"] = labels
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/jobs", json=body, headers=headers)


def _walk(client: httpx.Client, path: str, field: str, **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following next_cursor."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = client.get(path, params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages.append(body[field])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 1000


# --- 1. problem details -------------------------------------------------------------------


def test_errors_are_problems_with_stable_types(
    service: Service, alice: httpx.Client, bob: httpx.Client, model: dict[str, Any]
) -> None:
    with httpx.Client(base_url=service.url) as anonymous:
        body = assert_problem(anonymous.get("/v1/jobs"), 401, "unauthorized")
        assert "Bearer" in body["detail"]
        # The type resolves without a key.
        info = anonymous.get(body["type"])
        assert info.status_code == 200 and info.json()["slug"] == "unauthorized", info.text
        listed = anonymous.get("/v1/problems").json()
        assert {p["slug"] for p in listed} == {k.value for k in ProblemType}
        assert_problem(anonymous.get("/v1/problems/nope"), 404, "not_found")
    assert_problem(alice.get(f"/v1/jobs/{uuid.uuid4().hex}"), 404, "not_found")
    # Another tenant's model reads as missing.
    assert_problem(_submit(bob, model["id"]), 404, "not_found")
    assert_problem(alice.get("/v1/no-such-route"), 404, "not_found")

    # 422 from the body: the structured list names each field.
    resp = alice.post("/v1/jobs", json={"analysis": "signal_space", "params": {"vectors": -1}})
    body = assert_problem(resp, 422, "invalid_params")
    locs = [tuple(e["loc"]) for e in body["errors"]]
    assert ("body", "model_id") in [loc[:1] + loc[-1:] for loc in locs], locs
    assert any(loc[-1] == "vectors" for loc in locs), locs
    assert all(set(e) == {"loc", "msg", "type"} for e in body["errors"]), body["errors"]
    assert "vectors" in body["detail"] and "model_id" in body["detail"]
    # ... and from the query.
    body = assert_problem(alice.get("/v1/jobs", params={"limit": 0}), 422, "invalid_params")
    assert body["errors"][0]["loc"] == ["query", "limit"], body

    # Uploads: not multipart (400), a bad manifest (422), too large (413).
    resp = alice.post("/v1/models", json={"x": 1})
    assert_problem(resp, 400, "invalid_upload")
    data = fcnn_weights(Path(service.data_dir), seed=12).read_bytes()
    resp = upload_model(alice, data, {"format": "safetensors", "arch": "fcnn1", "bogus": 1})
    assert_problem(resp, 422, "invalid_upload")
    resp = upload_model(alice, b"\0" * (service.max_upload + 10), manifest_for())
    assert_problem(resp, 413, "payload_too_large")
    # Labels that break the rules.
    resp = _submit(alice, model["id"], labels={"-bad": "x"})
    body = assert_problem(resp, 422, "invalid_params")
    # (The union of analyses puts the analysis in the location: body.signal_space.labels.)
    assert body["errors"][0]["loc"][0] == "body", body
    assert body["errors"][0]["loc"][-1] == "labels", body


def test_model_and_job_conflicts_have_their_own_types(
    alice: httpx.Client, model: dict[str, Any], weights_dir: Path
) -> None:
    # fcnn1's weights declared as fcnn5: the worker cannot load them.
    data = fcnn_weights(weights_dir, seed=13).read_bytes()
    resp = upload_model(alice, data, manifest_for(arch="fcnn5", name="wrong"))
    assert resp.status_code == 202, resp.text
    invalid = wait_model(alice, resp.json()["id"])
    assert invalid["status"] == "invalid", invalid
    assert_problem(_submit(alice, invalid["id"]), 409, "model_invalid")

    job = _submit(alice, model["id"], vectors=3)
    assert job.status_code == 202, job.text
    assert wait_job(alice, job.json()["id"])["status"] == "succeeded"
    assert_problem(alice.delete(f"/v1/jobs/{job.json()['id']}"), 409, "job_finished")
    assert_problem(alice.delete("/v1/datasets/digits"), 409, "builtin_dataset")


def test_openapi_documents_problems(alice: httpx.Client) -> None:
    spec = alice.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"type", "title", "status", "detail", "instance", "errors"} <= set(
        schemas["ProblemOut"]["properties"]
    )
    assert "HTTPValidationError" not in schemas
    post_jobs = spec["paths"]["/v1/jobs"]["post"]
    for code in ("401", "404", "409", "422", "429", "503"):
        content = post_jobs["responses"][code]["content"]
        assert list(content) == [PROBLEM], (code, content)
        assert content[PROBLEM]["schema"] == {"$ref": "#/components/schemas/ProblemOut"}
    params = {p["name"] for p in post_jobs.get("parameters", [])}
    assert "Idempotency-Key" in params
    listing = {p["name"] for p in spec["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert {"status", "analysis", "model_id", "label", "limit", "cursor"} <= listing


def test_an_unhandled_error_is_a_problem_without_internals(tmp_path: Path) -> None:
    """A bug answers 500 ``internal``, without its message (the log has the traceback)."""
    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0", api_keys="a=k")
    app: FastAPI = create_app(settings)

    def boom() -> None:
        raise RuntimeError("secret internals at /srv/deepscope")

    app.add_api_route("/boom", boom)
    # Not entered as a context: the lifespan's threads (reaper, sweep) are not wanted here.
    http = TestClient(app, raise_server_exceptions=False)
    resp = http.get("/boom")
    body = assert_problem(resp, 500, "internal")
    assert "secret" not in resp.text and body["detail"]
    # Redis unreachable: 503 service_unavailable.
    down = http.get("/v1/jobs", headers={"Authorization": "Bearer k"})
    assert_problem(down, 503, "service_unavailable")


# --- 2. idempotency -----------------------------------------------------------------------


def test_idempotent_job_submission(alice: httpx.Client, model: dict[str, Any]) -> None:
    key = f"ci-run-{uuid.uuid4()}"
    first = _submit(alice, model["id"], vectors=4, key=key)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers, first.text
    again = _submit(alice, model["id"], vectors=4, key=key)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    # Another body under the same key.
    other = _submit(alice, model["id"], vectors=5, key=key)
    body = assert_problem(other, 409, "idempotency_conflict")
    assert "Idempotency-Key" in body["detail"]
    # Keys: at most 255 printable ASCII characters.
    assert_problem(_submit(alice, model["id"], key="x" * 256), 422, "invalid_params")
    assert_problem(_submit(alice, model["id"], key="bad\tkey"), 422, "invalid_params")
    # A failed request releases its key: the same key works for a valid request afterwards.
    failing = str(uuid.uuid4())
    assert _submit(alice, uuid.uuid4().hex, key=failing).status_code == 404
    assert _submit(alice, model["id"], vectors=6, key=failing).status_code == 202


def test_concurrent_requests_with_one_key_make_one_job(
    service: Service, alice: httpx.Client, model: dict[str, Any]
) -> None:
    key, tag = str(uuid.uuid4()), uuid.uuid4().hex[:12]

    def one(_: int) -> httpx.Response:
        with service.client(service.key_a) as http:
            return _submit(http, model["id"], vectors=7, labels={"tag": tag}, key=key)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    made = {r.json()["id"] for r in answers if r.status_code == 202}
    assert len(made) == 1, [(r.status_code, r.text[:80]) for r in answers]
    for resp in answers:
        if resp.status_code != 202:
            assert_problem(resp, 409, "idempotency_in_progress")
            assert resp.headers["Retry-After"] == "1"
    listed = alice.get("/v1/jobs", params={"label": f"tag={tag}"}).json()["jobs"]
    assert [j["id"] for j in listed] == list(made)


def test_idempotent_model_upload(alice: httpx.Client, weights_dir: Path) -> None:
    data = fcnn_weights(weights_dir, seed=21).read_bytes()
    key = str(uuid.uuid4())

    def post(payload: bytes, name: str) -> httpx.Response:
        return alice.post(
            "/v1/models",
            files={"file": ("m.safetensors", payload, "application/octet-stream")},
            data={"manifest": json.dumps(manifest_for(name=name))},
            headers={"Idempotency-Key": key},
        )

    first = post(data, "idem")
    assert first.status_code == 202, first.text
    again = post(data, "idem")
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert_problem(post(data, "idem-other-name"), 409, "idempotency_conflict")


# --- 3. deduplication ---------------------------------------------------------------------


def _blobs(service: Service) -> set[str]:
    root = service.data_dir / "storage" / "blobs"
    return {p.name for p in root.glob("*/*") if not p.name.startswith(".")}


def test_uploading_a_model_again_returns_it(
    service: Service, alice: httpx.Client, weights_dir: Path
) -> None:
    data = fcnn_weights(weights_dir, seed=31).read_bytes()
    manifest = manifest_for(name="dedupe")
    first = upload_model(alice, data, manifest)
    assert first.status_code == 202, first.text
    count = len(_walk(alice, "/v1/models", "models", limit=1000)[0])
    blobs = _blobs(service)
    again = upload_model(alice, data, manifest)
    assert again.status_code == 200, again.text
    assert again.headers["Deepscope-Deduplicated"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(_walk(alice, "/v1/models", "models", limit=1000)[0]) == count
    assert _blobs(service) == blobs
    assert not list((service.data_dir / "tmp").glob("upload-*"))
    # Another manifest is another model (sharing the file); another tenant has its own.
    other = upload_model(alice, data, manifest_for(name="dedupe-2"))
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    # Deleted: uploading it again makes a new model.
    assert alice.delete(f"/v1/models/{first.json()['id']}").status_code == 204
    third = upload_model(alice, data, manifest)
    assert third.status_code == 202 and third.json()["id"] != first.json()["id"]
    for resp in (other, third):
        assert alice.delete(f"/v1/models/{resp.json()['id']}").status_code == 204


# --- 4, 5. labels and pagination ----------------------------------------------------------


def test_labels_filter_models_and_jobs(
    alice: httpx.Client, model: dict[str, Any], weights_dir: Path
) -> None:
    run = uuid.uuid4().hex[:10]
    labels = {"git_sha": "3f2a9c1", "run": run}
    data = fcnn_weights(weights_dir, seed=41).read_bytes()
    resp = alice.post(
        "/v1/models",
        files={"file": ("m.safetensors", data, "application/octet-stream")},
        data={"manifest": json.dumps(manifest_for(name="labelled")), "labels": json.dumps(labels)},
    )
    assert resp.status_code == 202 and resp.json()["labels"] == labels, resp.text
    found = alice.get("/v1/models", params=[("label", f"run={run}"), ("label", "git_sha=3f2a9c1")])
    assert [m["id"] for m in found.json()["models"]] == [resp.json()["id"]]
    none = alice.get("/v1/models", params=[("label", f"run={run}"), ("label", "git_sha=other")])
    assert none.json()["models"] == []
    bad = alice.post(
        "/v1/models",
        files={"file": ("m.safetensors", data, "application/octet-stream")},
        data={"manifest": json.dumps(manifest_for(name="x")), "labels": "[1]"},
    )
    assert_problem(bad, 422, "invalid_params")
    assert_problem(alice.get("/v1/jobs", params={"label": "no-equals"}), 422, "invalid_params")

    job = _submit(alice, model["id"], vectors=2, labels={"run": run})
    assert job.status_code == 202 and job.json()["labels"] == {"run": run}, job.text
    assert alice.get(f"/v1/jobs/{job.json()['id']}").json()["labels"] == {"run": run}
    listed = alice.get("/v1/jobs", params={"label": f"run={run}", "model_id": model["id"]})
    assert [j["id"] for j in listed.json()["jobs"]] == [job.json()["id"]]
    assert alice.delete(f"/v1/models/{resp.json()['id']}").status_code == 204


def test_pagination_walks_every_item_once_with_filters_before_the_limit(
    alice: httpx.Client, model: dict[str, Any]
) -> None:
    run, other = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]
    mine: list[str] = []
    # Interleaved with jobs the filter leaves out; repeated params are cache hits (instant).
    for i in range(11):
        resp = _submit(alice, model["id"], vectors=2 + i % 3, labels={"run": run})
        assert resp.status_code == 202, resp.text
        mine.append(resp.json()["id"])
        assert _submit(alice, model["id"], vectors=2, labels={"run": other}).status_code == 202
    pages = _walk(alice, "/v1/jobs", "jobs", label=f"run={run}", limit=4)
    assert [len(p) for p in pages] == [4, 4, 3]
    walked = [j["id"] for p in pages for j in p]
    assert walked == mine[::-1]  # newest first, each once
    # The status filter applies before the limit too (live status).
    for job_id in mine:
        ended = wait_job(alice, job_id)
        assert ended["status"] == "succeeded", ended
    done = _walk(alice, "/v1/jobs", "jobs", label=f"run={run}", status="succeeded", limit=5)
    assert sorted(j["id"] for p in done for j in p) == sorted(mine)
    assert all(j["status"] == "succeeded" for p in done for j in p)
    assert _walk(alice, "/v1/jobs", "jobs", label=f"run={run}", status="failed") == [[]]
    # The whole listing, one item a page, against one big page.
    everything = [j["id"] for j in alice.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]]
    small = [j["id"] for p in _walk(alice, "/v1/jobs", "jobs", limit=7) for j in p]
    assert small == everything and len(set(small)) == len(small)
    # Models and datasets (the built-ins first) page the same way.
    models = [m["id"] for p in _walk(alice, "/v1/models", "models", limit=1) for m in p]
    assert models == [m["id"] for m in alice.get("/v1/models").json()["models"]]
    datasets = [d["id"] for p in _walk(alice, "/v1/datasets", "datasets", limit=1) for d in p]
    assert datasets == [d["id"] for d in alice.get("/v1/datasets").json()["datasets"]]
    assert datasets[:2] == ["digits", "fashion-mnist"]
    # A cursor the service did not make.
    for bad in ("not-a-cursor", "MTIzfHh5eg", "!!"):
        body = assert_problem(alice.get("/v1/jobs", params={"cursor": bad}), 422, "invalid_params")
        assert body["errors"][0]["loc"] == ["query", "cursor"], body
    assert_problem(alice.get("/v1/models", params={"cursor": "zz"}), 422, "invalid_params")
    assert_problem(alice.get("/v1/datasets", params={"cursor": "zz"}), 422, "invalid_params")


# --- a stack with small limits: quotas, the queue, Redis down -----------------------------


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {
        "DEEPSCOPE_MAX_MODELS_PER_TENANT": "2",
        "DEEPSCOPE_TENANT_RUNNING_JOBS": "1",
        "DEEPSCOPE_TENANT_QUEUED_JOBS": "0",
    }
    with launch_stack(tmp_path_factory.mktemp("small"), env=env, workers=("fork",)) as svc:
        yield svc


def test_quota_refusals_and_dedupe_at_the_quota(small_stack: Service, weights_dir: Path) -> None:
    files = [fcnn_weights(weights_dir, seed=50 + i).read_bytes() for i in range(3)]
    with small_stack.client(small_stack.key_a) as alice:
        made = [upload_model(alice, files[i], manifest_for()) for i in range(2)]
        assert [r.status_code for r in made] == [202, 202], [r.text for r in made]
        blobs = _blobs(small_stack)
        # At the quota, a model she has already is still answered (no quota used) ...
        again = upload_model(alice, files[0], manifest_for())
        assert again.status_code == 200 and again.json()["id"] == made[0].json()["id"]
        # ... and a new one is refused, leaving no file.
        body = assert_problem(upload_model(alice, files[2], manifest_for()), 409, "quota_exceeded")
        assert "model limit reached (2 per tenant" in body["detail"]
        assert _blobs(small_stack) == blobs
        assert not list((small_stack.data_dir / "tmp").glob("upload-*"))


def test_queue_full_and_redis_down(small_stack: Service, weights_dir: Path) -> None:
    with small_stack.client(small_stack.key_b) as bob:
        resp = upload_model(bob, fcnn_weights(weights_dir, seed=60).read_bytes(), manifest_for())
        assert resp.status_code == 202, resp.text
        model = wait_model(bob, resp.json()["id"])
        answers = [_submit(bob, model["id"], vectors=v) for v in range(2, 8)]
        full = [r for r in answers if r.status_code == 429]
        assert full, [r.status_code for r in answers]
        assert_problem(full[0], 429, "queue_full")
        assert int(full[0].headers["Retry-After"]) > 0
        small_stack.stop_redis()
        try:
            down = bob.get("/v1/jobs")
            assert_problem(down, 503, "service_unavailable")
            assert "Redis" in down.json()["detail"]
        finally:
            small_stack.start_redis()
