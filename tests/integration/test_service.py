"""The HTTP service end to end: real Redis, real worker processes, real uvicorn (conftest).

A model trained here is uploaded, analyzed through HTTP, and the metrics are compared with the
in-process :func:`run_analysis` on the same inputs; then the cache, tenants, cancellation and
every kind of bad input.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from stack_helpers import children, job_processes

from deepscope.analyses import parse_params
from deepscope.analyses.run import run_analysis
from deepscope.manifest import Manifest
from deepscope.models.datasets import load_dataset
from deepscope.models.loading import load_model
from deepscope.models.training import Recipe, train_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The ``service`` fixture (conftest.py): url, client(key), key_a (tenant alice), key_b (bob),
# max_upload, workers (the worker processes), data_dir.
Service = Any

_PNG = b"\x89PNG\r\n\x1a\n"


# --- helpers ------------------------------------------------------------------------------


def wait_for(
    client: httpx.Client, path: str, done: set[str], timeout: float = 90.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(path).json()
        if body["status"] in done:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} still {body['status']} after {timeout} s: {body}")
        time.sleep(0.1)


def wait_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return wait_for(client, f"/v1/jobs/{job_id}", {"succeeded", "failed", "canceled"})


def wait_model(client: httpx.Client, model_id: str) -> dict[str, Any]:
    return wait_for(client, f"/v1/models/{model_id}", {"ready", "invalid"})


def upload(
    client: httpx.Client, data: bytes, manifest: dict[str, Any] | str | None, name: str = "m"
) -> httpx.Response:
    fields = {}
    if manifest is not None:
        fields["manifest"] = manifest if isinstance(manifest, str) else json.dumps(manifest)
    return client.post(
        "/v1/models",
        files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
        data=fields,
    )


def assert_close(got: Any, want: Any, where: str = "metrics") -> None:
    """Recursive equality; floats to 1e-6 relative (thread counts may reorder sums)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, int | float), where
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def png_bytes(image: np.ndarray) -> bytes:
    """(1, H, W) in [0, 1] → 8-bit grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """fcnn1 trained on digits here (seconds), with its manifest."""
    out = tmp_path_factory.mktemp("model") / "fcnn1.safetensors"
    _, manifest = train_model("fcnn1", "digits", out, epochs=3, recipe=Recipe.FAST, seed=0)
    return out, manifest


@pytest.fixture(scope="module")
def model(alice: httpx.Client, trained: tuple[Path, Manifest]) -> dict[str, Any]:
    path, manifest = trained
    resp = upload(alice, path.read_bytes(), manifest.model_dump(mode="json"), "fcnn1")
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "validating"
    ready = wait_model(alice, body["id"])
    assert ready["status"] == "ready", ready
    return ready


@pytest.fixture(scope="module")
def analyzed(alice: httpx.Client, model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """signal_space and residuals through HTTP: kind → finished job."""
    jobs = {}
    for kind in ("signal_space", "residuals"):
        resp = alice.post("/v1/jobs", json={"model_id": model["id"], "analysis": kind})
        assert resp.status_code == 202, resp.text
        assert resp.headers["location"] == f"/v1/jobs/{resp.json()['id']}"
        assert resp.json()["status"] in ("queued", "running", "succeeded")
        jobs[kind] = resp.json()["id"]
    return {kind: wait_job(alice, job_id) for kind, job_id in jobs.items()}


# --- the happy path -----------------------------------------------------------------------


def test_validation_lists_layers_and_parameters(model: dict[str, Any]) -> None:
    assert model["layers"] == [{"name": "fc1", "kind": "linear", "weight_shape": [10, 784]}]
    assert model["num_parameters"] == 784 * 10 + 10
    assert model["input_shape"] == [1, 28, 28]
    assert model["num_classes"] == 10
    assert model["error"] is None


@pytest.mark.parametrize("kind", ["signal_space", "residuals"])
def test_http_metrics_equal_in_process_run(
    kind: str,
    analyzed: dict[str, dict[str, Any]],
    trained: tuple[Path, Manifest],
    alice: httpx.Client,
    tmp_path: Path,
) -> None:
    job = analyzed[kind]
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["cached"] is False and job["error"] is None
    assert job["dataset"] == "digits"  # from the manifest's training info
    assert job["started_at"] is not None and job["finished_at"] >= job["started_at"]
    path, manifest = trained
    want = run_analysis(
        load_model(path, manifest=manifest),
        kind,
        parse_params(kind),
        tmp_path,
        dataset="digits",
    ).model_dump(mode="json", by_alias=True)
    assert_close(job["result"]["metrics"], want["metrics"])
    # Every artifact the run wrote is served, with its media type, to its tenant.
    urls = {a["url"]: a for a in job["result"]["artifacts"]}
    assert len(urls) == len(want["artifacts"]) + 1  # + result.json
    for artifact in want["artifacts"]:
        url = f"/v1/artifacts/{job['id']}/{artifact['url']}"
        assert url in urls
        got = alice.get(url)
        assert got.status_code == 200
        assert got.headers["content-type"] == artifact["media_type"]
        if artifact["media_type"] == "image/png":
            assert got.content.startswith(_PNG)
    stored = alice.get(f"/v1/artifacts/{job['id']}/result.json").json()
    assert_close(stored["metrics"], want["metrics"])


def test_same_request_again_is_answered_from_the_cache(
    alice: httpx.Client, model: dict[str, Any], analyzed: dict[str, dict[str, Any]]
) -> None:
    first = analyzed["signal_space"]
    start = time.perf_counter()
    resp = alice.post(
        "/v1/jobs",
        # Defaults spelled out: the same canonical params, so the same key.
        json={"model_id": model["id"], "analysis": "signal_space", "params": {"view": "kernels"}},
    )
    elapsed = time.perf_counter() - start
    assert resp.status_code == 202
    job = resp.json()
    assert job["status"] == "succeeded" and job["cached"] is True, job
    assert job["id"] != first["id"]
    assert elapsed < 2.0
    assert_close(job["result"]["metrics"], first["result"]["metrics"])
    # Its artifacts are served under its own id.
    url = job["result"]["artifacts"][0]["url"]
    assert url.startswith(f"/v1/artifacts/{job['id']}/")
    assert alice.get(url).status_code == 200
    # Different params: a new computation.
    other = alice.post(
        "/v1/jobs",
        json={"model_id": model["id"], "analysis": "signal_space", "params": {"vectors": 3}},
    ).json()
    assert other["cached"] is False
    assert wait_job(alice, other["id"])["status"] == "succeeded"


def test_jobs_are_listed_for_their_tenant(
    alice: httpx.Client, bob: httpx.Client, analyzed: dict[str, dict[str, Any]]
) -> None:
    ids = {j["id"] for j in alice.get("/v1/jobs").json()["jobs"]}
    assert {j["id"] for j in analyzed.values()} <= ids
    assert not ids & {j["id"] for j in bob.get("/v1/jobs").json()["jobs"]}


# --- tenants and keys ---------------------------------------------------------------------


def test_missing_or_wrong_key_is_401(service: Service) -> None:
    for key in (None, "not-a-key"):
        with service.client(key) as client:
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/jobs")):
                resp = client.request(method, path, json={})
                assert resp.status_code == 401, (key, path)
                assert isinstance(resp.json()["detail"], str)
                assert resp.headers["www-authenticate"] == "Bearer"


def test_another_tenants_objects_are_404(
    bob: httpx.Client, model: dict[str, Any], analyzed: dict[str, dict[str, Any]]
) -> None:
    job = analyzed["signal_space"]
    artifact = job["result"]["artifacts"][0]["url"]
    assert bob.get(f"/v1/models/{model['id']}").status_code == 404
    assert bob.delete(f"/v1/models/{model['id']}").status_code == 404
    assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert bob.get(artifact).status_code == 404
    resp = bob.post("/v1/jobs", json={"model_id": model["id"], "analysis": "signal_space"})
    assert resp.status_code == 404
    assert model["id"] not in {m["id"] for m in bob.get("/v1/models").json()["models"]}


def test_artifact_paths_outside_the_result_are_404(
    alice: httpx.Client, analyzed: dict[str, dict[str, Any]]
) -> None:
    job_id = analyzed["signal_space"]["id"]
    for path in ("..%2F..%2F..%2Fdev-api-key", "%2Fetc%2Fpasswd", "nope.png", "result.json%00"):
        assert alice.get(f"/v1/artifacts/{job_id}/{path}").status_code == 404, path
    assert alice.get("/v1/artifacts/not-an-id/spectrum_fc1.png").status_code == 404


# --- bad input ----------------------------------------------------------------------------


def _bad_uploads(weights: bytes, manifest: dict[str, Any]) -> list[tuple[str, Any, int, str]]:
    """(what, request kwargs, status, words the detail must contain)."""

    def form(data: bytes, man: Any) -> dict[str, Any]:
        fields = (
            {} if man is None else {"manifest": man if isinstance(man, str) else json.dumps(man)}
        )
        return {"files": {"file": ("m.bin", data, "application/octet-stream")}, "data": fields}

    return [
        ("manifest not JSON", form(weights, "{arch: fcnn1"), 422, "not valid JSON"),
        ("manifest not an object", form(weights, "[1, 2]"), 422, "JSON object"),
        ("manifest unknown field", form(weights, {**manifest, "colour": 1}), 422, "colour"),
        (
            "manifest bad shape",
            form(weights, {**manifest, "input_shape": [1, 0, 28]}),
            422,
            "input_shape",
        ),
        ("no manifest", form(weights, None), 422, "manifest"),
        ("unknown arch", form(weights, {**manifest, "arch": "fcnn7"}), 422, "unknown arch"),
        ("no arch", form(weights, {**manifest, "arch": None}), 422, "arch is required"),
        ("unknown format", form(weights, {**manifest, "format": "onnx"}), 422, "format"),
        ("code format disabled", form(weights, {**manifest, "format": "pt2"}), 422, "carries code"),
        ("not safetensors", form(os.urandom(4096), manifest), 422, "not safetensors"),
        ("empty file", form(b"", manifest), 422, "empty"),
        (
            "no file",
            {"data": {"manifest": json.dumps(manifest)}, "files": {"x": ("a", b"1")}},
            422,
            "file",
        ),
        ("not multipart", {"json": {"manifest": manifest}}, 400, "multipart"),
    ]


def test_bad_uploads_are_clear_4xx(
    service: Service, alice: httpx.Client, trained: tuple[Path, Manifest]
) -> None:
    path, manifest = trained
    before = len(alice.get("/v1/models").json()["models"])
    for what, kwargs, status, words in _bad_uploads(
        path.read_bytes(), manifest.model_dump(mode="json")
    ):
        resp = alice.post("/v1/models", **kwargs)
        assert resp.status_code == status, (what, resp.text)
        detail = resp.json()["detail"]
        assert isinstance(detail, str) and words in detail, (what, detail)
    assert len(alice.get("/v1/models").json()["models"]) == before
    assert alice.get("/healthz").json() == {"status": "ok"}
    # Nothing of the refused uploads is left behind.
    assert not list((service.data_dir / "tmp").glob("upload-*"))


def test_upload_over_the_limit_is_413(service: Service, alice: httpx.Client) -> None:
    resp = upload(alice, os.urandom(service.max_upload + 100_000), {"arch": "fcnn1"})
    assert resp.status_code == 413
    assert str(service.max_upload) in resp.json()["detail"]
    assert not list((service.data_dir / "tmp").glob("upload-*"))
    assert alice.get("/healthz").status_code == 200


def test_model_that_fails_validation_is_invalid_and_refuses_jobs(
    alice: httpx.Client, trained: tuple[Path, Manifest]
) -> None:
    path, manifest = trained
    # fcnn1's weights under fcnn5's architecture: the worker cannot load them.
    wrong = manifest.model_dump(mode="json") | {"arch": "fcnn5", "arch_kwargs": {}}
    resp = upload(alice, path.read_bytes(), wrong, "wrong-arch")
    assert resp.status_code == 202, resp.text
    rec = wait_model(alice, resp.json()["id"])
    assert rec["status"] == "invalid"
    assert "fcnn5" in rec["error"] or "fc2" in rec["error"], rec["error"]
    assert "/tmp" not in rec["error"]  # the worker's temporary path means nothing to users
    job = alice.post("/v1/jobs", json={"model_id": rec["id"], "analysis": "signal_space"})
    assert job.status_code == 409
    assert "invalid" in job.json()["detail"]
    assert alice.delete(f"/v1/models/{rec['id']}").status_code == 204
    assert alice.get(f"/v1/models/{rec['id']}").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model_id": "0" * 32, "analysis": "signal_space"}, 404, "not found"),
        ({"model_id": "../../etc", "analysis": "signal_space"}, 404, "not found"),
        ({"analysis": "signal_space"}, 422, "model_id"),
        ({"model_id": "MODEL", "analysis": "telepathy"}, 422, "signal_space"),
        (
            {"model_id": "MODEL", "analysis": "signal_space", "params": {"vectors": 10_000}},
            422,
            "vectors",
        ),
        (
            {"model_id": "MODEL", "analysis": "signal_space", "params": {"view": "sideways"}},
            422,
            "view",
        ),
        ({"model_id": "MODEL", "analysis": "residuals", "params": {"colour": 1}}, 422, "colour"),
        (
            {"model_id": "MODEL", "analysis": "residuals", "dataset": "imagenet"},
            422,
            "unknown dataset",
        ),
        ({"model_id": "MODEL", "analysis": "residuals", "dataset": "f" * 32}, 404, "not found"),
    ],
)
def test_bad_job_requests_are_clear_4xx(
    alice: httpx.Client, model: dict[str, Any], body: dict[str, Any], status: int, words: str
) -> None:
    if body.get("model_id") == "MODEL":
        body = {**body, "model_id": model["id"]}
    resp = alice.post("/v1/jobs", json=body)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["detail"]
    assert alice.get("/healthz").status_code == 200


def test_unknown_ids_are_404(alice: httpx.Client) -> None:
    for path in ("/v1/models/" + "a" * 32, "/v1/jobs/" + "a" * 32, "/v1/datasets/nope"):
        resp = alice.get(path)
        assert resp.status_code == 404
        assert isinstance(resp.json()["detail"], str)


def test_a_job_failing_in_the_worker_has_a_readable_error(
    alice: httpx.Client, model: dict[str, Any]
) -> None:
    resp = alice.post(
        "/v1/jobs",
        json={"model_id": model["id"], "analysis": "signal_space", "params": {"layers": ["fc9"]}},
    )
    assert resp.status_code == 202  # layer names are checked by the worker, which has the model
    job = wait_job(alice, resp.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["type"] == "invalid_input"
    assert "fc9" in job["error"]["message"]
    assert job["result"] is None


# --- cancellation -------------------------------------------------------------------------


def test_cancel_a_queued_job(service: Service, alice: httpx.Client, model: dict[str, Any]) -> None:
    # Stopped workers take nothing: the job stays queued.
    for proc in service.workers:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        resp = alice.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "analysis": "residuals",
                "params": {"inputs": "samples", "samples_per_class": 3},
            },
        )
        assert resp.status_code == 202
        job_id = resp.json()["id"]
        assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        canceled = alice.delete(f"/v1/jobs/{job_id}")
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled"
        assert canceled.json()["finished_at"] is not None
        again = alice.delete(f"/v1/jobs/{job_id}")
        assert again.status_code == 409
    finally:
        for proc in service.workers:
            os.kill(proc.pid, signal.SIGCONT)
    # After the workers resume (and finish a later job), the canceled one never ran.
    later = alice.post(
        "/v1/jobs",
        json={"model_id": model["id"], "analysis": "signal_space", "params": {"vectors": 2}},
    ).json()
    assert wait_job(alice, later["id"])["status"] == "succeeded"
    time.sleep(0.5)
    job = alice.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["result"] is None
    assert job["started_at"] is None


def test_cancel_running_jobs(service: Service, alice: httpx.Client, model: dict[str, Any]) -> None:
    """One job on each worker; frozen mid-run, canceled: the forking worker kills its job's
    process at once, the in-process worker stops at the job's next progress report."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    def rq_job(job_id: str) -> Job:
        return Job.fetch(job_id, connection=service.redis, serializer=JSONSerializer)

    ids = []
    for n in (4, 6):
        resp = alice.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "analysis": "residuals",
                "params": {"inputs": "samples", "samples_per_class": n},
            },
        )
        ids.append(resp.json()["id"])
    deadline = time.monotonic() + 60
    while any(alice.get(f"/v1/jobs/{i}").json()["status"] == "queued" for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    fork, simple = service.workers
    frozen = [*children(fork.pid), simple.pid]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        statuses = [alice.get(f"/v1/jobs/{i}").json()["status"] for i in ids]
        if statuses != ["running", "running"]:
            pytest.skip(f"a job finished before it could be frozen: {statuses}")
        workers = {rq_job(i).worker_name: i for i in ids}
        assert set(workers) == {"test-fork", "test-simple"}
        for job_id in ids:
            canceled = alice.delete(f"/v1/jobs/{job_id}")
            assert canceled.status_code == 200
            assert canceled.json()["status"] == "canceled"
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while rq_job(workers["test-fork"]).get_status() != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # Both workers still serve; the canceled jobs stay canceled, without results.
    for vectors in (5, 6):
        later = alice.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "analysis": "signal_space",
                "params": {"vectors": vectors},
            },
        ).json()
        assert wait_job(alice, later["id"])["status"] == "succeeded"
    for job_id in ids:
        job = alice.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "canceled" and job["result"] is None


# --- datasets -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load_dataset("digits", "train")
    path = tmp_path_factory.mktemp("npz") / "few-digits.npz"
    keep = np.arange(0, len(ds), 5)
    images = np.round(ds.images[keep].numpy()[:, 0] * 255).astype(np.uint8)  # (N, H, W)
    np.savez_compressed(path, images=images, labels=ds.labels[keep].numpy())
    return path


def test_dataset_upload_and_a_job_on_it(
    alice: httpx.Client,
    bob: httpx.Client,
    model: dict[str, Any],
    digits_npz: Path,
    trained: tuple[Path, Manifest],
    tmp_path: Path,
) -> None:
    resp = alice.post("/v1/datasets", files={"file": ("few-digits.npz", digits_npz.read_bytes())})
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    with np.load(digits_npz) as data:
        n = len(data["labels"])
    assert ds["num_samples"] == n and ds["input_shape"] == [1, 28, 28]
    assert ds["num_classes"] == 10 and ds["builtin"] is False
    names = {d["id"] for d in alice.get("/v1/datasets").json()["datasets"]}
    assert {"digits", "fashion-mnist", ds["id"]} <= names
    job = alice.post(
        "/v1/jobs",
        json={"model_id": model["id"], "analysis": "residuals", "dataset": ds["id"]},
    ).json()
    done = wait_job(alice, job["id"])
    assert done["status"] == "succeeded", done
    path, manifest = trained
    want = run_analysis(
        load_model(path, manifest=manifest),
        "residuals",
        parse_params("residuals"),
        tmp_path,
        dataset=load_dataset(str(digits_npz), "train"),
    ).model_dump(mode="json", by_alias=True)
    assert_close(done["result"]["metrics"], want["metrics"])
    # Another tenant cannot name it.
    resp = bob.post(
        "/v1/jobs", json={"model_id": model["id"], "analysis": "residuals", "dataset": ds["id"]}
    )
    assert resp.status_code == 404
    assert bob.get(f"/v1/datasets/{ds['id']}").status_code == 404


def test_bad_datasets_are_422(alice: httpx.Client, tmp_path: Path) -> None:
    cases: dict[str, dict[str, np.ndarray]] = {
        "no labels": {"images": np.zeros((4, 8, 8), np.uint8)},
        "labels mismatch": {"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, int)},
        "float out of range": {"images": np.full((2, 8, 8), 2.0), "labels": np.zeros(2, int)},
        "negative label": {"images": np.zeros((2, 8, 8), np.uint8), "labels": -np.ones(2, int)},
        "5-d images": {"images": np.zeros((2, 1, 1, 8, 8), np.uint8), "labels": np.zeros(2, int)},
    }
    for what, arrays in cases.items():
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        resp = alice.post("/v1/datasets", files={"file": ("bad.npz", path.read_bytes())})
        assert resp.status_code == 422, (what, resp.text)
    resp = alice.post("/v1/datasets", files={"file": ("x.npz", b"not a zip")})
    assert resp.status_code == 422 and "zip" in resp.json()["detail"]
    objects = tmp_path / "obj.npz"
    np.savez(objects, images=np.array([object()] * 2), labels=np.zeros(2, int))
    resp = alice.post("/v1/datasets", files={"file": ("obj.npz", objects.read_bytes())})
    assert resp.status_code == 422 and "object" in resp.json()["detail"]


# --- prediction ---------------------------------------------------------------------------


def _in_process_logits(trained: tuple[Path, Manifest], images: np.ndarray) -> np.ndarray:
    import torch

    path, manifest = trained
    loaded = load_model(path, manifest=manifest)
    with torch.no_grad():
        logits: np.ndarray = loaded.module(torch.from_numpy(images).float()).double().numpy()
    return logits


def test_predict_pngs_within_the_request(
    alice: httpx.Client, model: dict[str, Any], trained: tuple[Path, Manifest]
) -> None:
    ds = load_dataset("digits", "test")
    images = np.stack([np.round(ds.images[i].numpy() * 255) / 255 for i in range(3)])
    files = [("files", (f"{i}.png", png_bytes(images[i]), "image/png")) for i in range(3)]
    resp = alice.post(f"/v1/models/{model['id']}/predict", files=files, params={"top_k": 3})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    want = _in_process_logits(trained, images.astype(np.float32))
    assert len(preds) == 3
    for pred, logits in zip(preds, want, strict=True):
        assert np.allclose(pred["logits"], logits, rtol=1e-5, atol=1e-5)
        assert len(pred["top_k"]) == 3
        assert pred["top_k"][0]["index"] == int(np.argmax(logits))
        assert pred["top_k"][0]["class"] == str(int(np.argmax(logits)))
        probs = [t["probability"] for t in pred["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9


def test_predict_a_large_npz_becomes_a_job(
    alice: httpx.Client, model: dict[str, Any], trained: tuple[Path, Manifest], tmp_path: Path
) -> None:
    ds = load_dataset("digits", "test")
    images = ds.images[:20].numpy()  # > DEEPSCOPE_PREDICT_SYNC_MAX (8)
    path = tmp_path / "batch.npz"
    np.savez(path, images=images)
    resp = alice.post(
        f"/v1/models/{model['id']}/predict", files={"file": ("batch.npz", path.read_bytes())}
    )
    assert resp.status_code == 202, resp.text
    assert resp.headers["location"] == f"/v1/jobs/{resp.json()['id']}"
    job = wait_job(alice, resp.json()["id"])
    assert job["status"] == "succeeded", job
    preds = job["result"]["metrics"]["predictions"]
    want = _in_process_logits(trained, images)
    assert len(preds) == 20
    assert [p["top_k"][0]["index"] for p in preds] == list(np.argmax(want, axis=1))


def test_predict_bad_images_are_422(alice: httpx.Client, model: dict[str, Any]) -> None:
    url = f"/v1/models/{model['id']}/predict"
    not_png = alice.post(url, files=[("files", ("a.png", b"GIF89a....", "image/png"))])
    assert not_png.status_code == 422 and "PNG" in not_png.json()["detail"]
    wrong_size = png_bytes(np.zeros((1, 16, 16)))
    resp = alice.post(url, files=[("files", ("small.png", wrong_size, "image/png"))])
    assert resp.status_code == 422 and "16×16" in resp.json()["detail"]
    assert alice.post(url, data={"x": "1"}, files={}).status_code in (400, 422)


# --- the contract -------------------------------------------------------------------------


def test_openapi_declares_every_status_code(alice: httpx.Client) -> None:
    spec = alice.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            # The problem types are public (no key): what a 401 body's type points to.
            if path.startswith("/v1/") and not path.startswith("/v1/problems"):
                assert {"401", "503"} <= codes, (method, path)
            for code in codes - {"200", "201", "202", "204"}:
                schema = json.dumps(op["responses"][code])
                assert "ProblemOut" in schema or "ReadyOut" in schema, (method, path, code)
                if "ProblemOut" in schema:
                    assert "application/problem+json" in op["responses"][code]["content"]
    post_jobs = set(spec["paths"]["/v1/jobs"]["post"]["responses"])
    assert {"202", "401", "404", "409", "422"} <= post_jobs
    post_models = set(spec["paths"]["/v1/models"]["post"]["responses"])
    assert {"202", "400", "401", "413", "422"} <= post_models


def test_readyz_and_metrics(alice: httpx.Client) -> None:
    ready = alice.get("/readyz").json()
    assert ready["status"] == "ready" and ready["redis"] is True
    assert ready["workers"]["cpu"] == 2
    text = alice.get("/metrics").text
    assert "deepscope_http_requests_total" in text
    assert 'deepscope_workers{queue="cpu"} 2.0' in text


def test_the_forking_workers_helper_computes_its_jobs(
    service: Service, alice: httpx.Client, model: dict[str, Any]
) -> None:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    fork = service.workers[0]
    helpers = [p for p in children(fork.pid) if p not in job_processes(fork.pid)]
    assert len(helpers) == 1, children(fork.pid)
    helper = helpers[0]

    def written() -> int:
        io = Path(f"/proc/{helper}/io").read_text()
        return int(next(line for line in io.splitlines() if line.startswith("wchar:")).split()[1])

    def on_the_forking_worker(params: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """(A job run by the forking worker, what its helper wrote meanwhile.) The two
        workers take turns: a few tries find it."""
        for n in range(8):
            before = written()
            body = {"model_id": model["id"], "analysis": "signal_space", "params": params}
            body["params"] = params | {"vectors": params["vectors"] + n}
            resp = alice.post("/v1/jobs", json=body)
            assert resp.status_code == 202, resp.text
            done = wait_job(alice, resp.json()["id"])
            assert done["status"] == "succeeded", done
            rq_job = Job.fetch(done["id"], connection=service.redis, serializer=JSONSerializer)
            if rq_job.worker_name == "test-fork":
                return done, written() - before
        raise AssertionError("no job ran on the forking worker")

    for params, pictures in (({"vectors": 120, "images": False}, 0), ({"vectors": 140}, 3)):
        done, wrote = on_the_forking_worker(params)
        artifacts = done["result"]["artifacts"]
        assert sum(a["url"].endswith(".png") for a in artifacts) == pictures, artifacts
        sizes = [len(alice.get(a["url"]).content) for a in artifacts]
        assert wrote >= sum(sizes)  # the helper wrote them all (and its answers to the job)
        assert helper in children(fork.pid)  # and serves on
