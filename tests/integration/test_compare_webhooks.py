"""Baselines, webhooks and bundles against a real stack (Redis, a worker, uvicorn) and a real
local webhook receiver (an http.server on 127.0.0.1):

- ``GET /v1/jobs/{id}/compare``: two real jobs, compared per layer; different analyses (422),
  another tenant's job (404), an unfinished one (409);
- ``callback_url``: a job's end arrives signed and verifiable; a receiver that fails twice gets
  the same delivery on the third attempt; a cancelled job posts ``job.canceled``; a URL that is
  not http(s) or whose host is not allowed is a 422 ``callback_not_allowed``;
- ``GET /v1/jobs/{id}/bundle``: the zip's contents;
- the report compared with a baseline, live, through its signed link and as a standalone file,
  drawn by a headless Chromium (``DEEPSCOPE_REPORT_SHOTS=DIR`` keeps the screenshot).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import KEY_A, launch_stack
from PIL import Image
from stack_helpers import (
    chromium,
    fcnn_weights,
    manifest_for,
    run_chromium,
    upload_model,
    wait_job,
    wait_model,
)

from deepscope.contract import JobOut, compare_results
from deepscope.contract.signing import verify_signature
from deepscope.store.webhooks import _CLAIM, DUE_KEY, enqueue_delivery

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Service = Any  # conftest.Service


# --- a real webhook receiver ---------------------------------------------------------------


class Receiver:
    """Records every POST (path, headers, body); ``fail[path] = n`` answers the next n POSTs to
    that path with 500."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.fail: dict[str, int] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.received.append((self.path, dict(self.headers.items()), body))
                    failing = receiver.fail.get(self.path, 0)
                    if failing:
                        receiver.fail[self.path] = failing - 1
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for p, h, b in self.received if p == path]

    def wait(
        self, path: str, count: int, timeout: float = 90.0
    ) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(got := self.at(path)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {len(got)} of {count} deliveries after {timeout} s")
            time.sleep(0.05)
        return got

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {
        "DEEPSCOPE_CALLBACK_HOSTS": "127.0.0.1, example.org:8443",
        "DEEPSCOPE_CALLBACK_BACKOFF_S": "0.3",
        "DEEPSCOPE_CALLBACK_ATTEMPTS": "4",
    }
    with launch_stack(tmp_path_factory.mktemp("webhooks"), env=env, workers=("fork",)) as svc:
        yield svc


@pytest.fixture(scope="module")
def alice(stack: Service) -> Iterator[httpx.Client]:
    with stack.client(stack.key_a) as c:
        yield c


@pytest.fixture(scope="module")
def bob(stack: Service) -> Iterator[httpx.Client]:
    with stack.client(stack.key_b) as c:
        yield c


@pytest.fixture(scope="module")
def models(alice: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two versions of one architecture (different seeds): a model and its baseline."""
    out = []
    directory = tmp_path_factory.mktemp("weights")
    for seed in (0, 1):
        data = fcnn_weights(directory, "fcnn1", seed).read_bytes()
        resp = upload_model(alice, data, manifest_for("fcnn1"), "fcnn1.safetensors")
        assert resp.status_code in (201, 202), resp.text
        out.append(resp.json()["id"])
    for model_id in out:
        assert wait_model(alice, model_id)["status"] == "ready"
    return out


def _submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    out: dict[str, Any] = resp.json()
    return out


@pytest.fixture(scope="module")
def pair(alice: httpx.Client, models: list[str], receiver: Receiver) -> tuple[str, str]:
    """A signal_space job of each model; the first with a callback."""
    first = _submit(
        alice,
        {
            "model_id": models[0],
            "analysis": "signal_space",
            "params": {"vectors": 2},
            "callback_url": receiver.url("/ok"),
        },
    )
    second = _submit(
        alice, {"model_id": models[1], "analysis": "signal_space", "params": {"vectors": 2}}
    )
    for job in (first, second):
        assert wait_job(alice, job["id"])["status"] == "succeeded"
    return first["id"], second["id"]


def _problem(resp: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body: dict[str, Any] = resp.json()
    assert body["type"] == f"/v1/problems/{slug}", body
    return body


# --- webhooks -----------------------------------------------------------------------------


def test_a_finished_job_posts_itself_signed(
    alice: httpx.Client, pair: tuple[str, str], receiver: Receiver
) -> None:
    job_id = pair[0]
    ((headers, body),) = receiver.wait("/ok", 1)
    assert headers["Deepscope-Event"] == "job.succeeded"
    assert headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["Deepscope-Delivery"])
    signature = headers["Deepscope-Signature"]
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", signature), signature
    assert verify_signature(body, signature, KEY_A)
    # Another key, a changed body or a stale signature do not verify.
    assert not verify_signature(body, signature, "key-bob-0123456789")
    assert not verify_signature(body + b" ", signature, KEY_A)
    assert not verify_signature(body, signature, KEY_A, now=time.time() + 3600)
    job = JobOut.model_validate_json(body)
    assert job.id == job_id and job.status.value == "succeeded" and job.result is not None
    assert job.callback_url == receiver.url("/ok")
    # The same object as GET answers (the delivery is the final job).
    got = alice.get(f"/v1/jobs/{job_id}").json()
    assert got["callback_url"] == receiver.url("/ok")
    assert got["result"]["metrics"] == json.loads(body)["result"]["metrics"]
    time.sleep(1.0)
    assert len(receiver.at("/ok")) == 1  # delivered once: a 200 ends it


def test_a_failing_receiver_gets_the_delivery_again_with_backoff(
    alice: httpx.Client, models: list[str], receiver: Receiver
) -> None:
    receiver.fail["/flaky"] = 2
    job = _submit(
        alice,
        {
            "model_id": models[0],
            "analysis": "signal_space",
            "params": {"vectors": 1, "images": False},
            "callback_url": receiver.url("/flaky"),
        },
    )
    got = receiver.wait("/flaky", 3)
    assert len({h["Deepscope-Delivery"] for h, _ in got}) == 1  # one delivery, three attempts
    assert len({b for _, b in got}) == 1  # the same bytes each time
    assert all(verify_signature(b, h["Deepscope-Signature"], KEY_A) for h, b in got)
    assert json.loads(got[-1][1])["id"] == job["id"]
    time.sleep(1.5)
    assert len(receiver.at("/flaky")) == 3  # the third, answered 200, was the last


def test_a_cancelled_job_posts_job_canceled(
    alice: httpx.Client, models: list[str], receiver: Receiver
) -> None:
    job = _submit(
        alice,
        {
            "model_id": models[0],
            "analysis": "activation_maximization",
            "params": {"steps": 5000, "targets": [0, 1, 2]},
            "callback_url": receiver.url("/cancel"),
        },
    )
    resp = alice.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 200, resp.text
    ((headers, body),) = receiver.wait("/cancel", 1)
    assert headers["Deepscope-Event"] == "job.canceled"
    assert verify_signature(body, headers["Deepscope-Signature"], KEY_A)
    assert json.loads(body)["status"] == "canceled"


def test_a_delivery_claimed_by_a_dead_dispatcher_is_made_after_its_lease(
    stack: Service, pair: tuple[str, str], receiver: Receiver
) -> None:
    # A delivery queued as a job's end queues it, then claimed the way a dispatcher claims,
    # by one that dies at once (nobody attempts it): due again when its lease ends, 2 s on.
    with stack.redis.pipeline() as pipe:
        pipe.multi()
        delivery = enqueue_delivery(pipe, pair[0], "alice", receiver.url("/lease"), "succeeded")
        pipe.execute()
    now = time.time()
    assert stack.redis.eval(_CLAIM, 1, DUE_KEY, str(now), str(now + 2.0), "100")
    time.sleep(1.0)
    assert receiver.at("/lease") == []  # leased: the live dispatcher leaves it alone
    ((headers, body),) = receiver.wait("/lease", 1, timeout=30)
    assert time.time() - now >= 2.0
    assert headers["Deepscope-Delivery"] == delivery
    assert verify_signature(body, headers["Deepscope-Signature"], KEY_A)
    assert json.loads(body)["id"] == pair[0]
    assert stack.redis.zscore(DUE_KEY, delivery) is None  # done: off the queue


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://127.0.0.1/hook", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("http://evil.example.com/hook", "not allowed"),
        ("https://example.org/hook", "not allowed"),  # example.org only on port 8443
        ("http://user:secret@127.0.0.1/hook", "credentials"),
        ("not a url", "http or https"),
    ],
)
def test_a_callback_url_not_allowed_is_422(
    alice: httpx.Client, models: list[str], url: str, why: str
) -> None:
    resp = alice.post(
        "/v1/jobs",
        json={"model_id": models[0], "analysis": "signal_space", "callback_url": url},
    )
    body = _problem(resp, 422, "callback_not_allowed")
    assert why in body["detail"], body


# --- compare ------------------------------------------------------------------------------


def test_compare_two_real_jobs(alice: httpx.Client, pair: tuple[str, str]) -> None:
    job_id, base_id = pair
    resp = alice.get(f"/v1/jobs/{job_id}/compare", params={"baseline": base_id})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert (out["job_id"], out["baseline_id"], out["analysis"]) == (job_id, base_id, "signal_space")
    job = JobOut.model_validate(alice.get(f"/v1/jobs/{job_id}").json())
    base = JobOut.model_validate(alice.get(f"/v1/jobs/{base_id}").json())
    assert job.result is not None and base.result is not None
    names = list(job.result.metrics.layer_values())
    assert [d["layer"] for d in out["layers"]] == names and len(names) >= 1
    assert out["only_in_job"] == [] and out["only_in_baseline"] == []
    # Every number is the two results' own, and the difference theirs.
    mine, theirs = job.result.metrics.layer_values(), base.result.metrics.layer_values()
    for layer in out["layers"]:
        for metric, diff in layer["metrics"].items():
            value, ref = mine[layer["layer"]][metric], theirs[layer["layer"]][metric]
            assert diff["value"] == value and diff["baseline"] == ref
            if value is not None and ref is not None:
                assert diff["difference"] == pytest.approx(value - ref)
                if ref != 0:
                    assert diff["relative_change"] == pytest.approx((value - ref) / abs(ref))
    # The service and compare_results (the SDK's and the CLI's) agree.
    assert compare_results(job, base).model_dump(mode="json") == out
    # A job against itself: no change anywhere.
    same = alice.get(f"/v1/jobs/{job_id}/compare", params={"baseline": job_id}).json()
    assert all(
        d["difference"] in (0.0, None)
        for layer in same["layers"]
        for d in layer["metrics"].values()
    )


def test_compare_refuses_what_cannot_be_compared(
    alice: httpx.Client, bob: httpx.Client, models: list[str], pair: tuple[str, str]
) -> None:
    job_id, base_id = pair
    residuals = _submit(
        alice,
        {"model_id": models[1], "analysis": "residuals", "dataset": "digits"},
    )
    assert wait_job(alice, residuals["id"])["status"] == "succeeded"
    body = _problem(
        alice.get(f"/v1/jobs/{job_id}/compare", params={"baseline": residuals["id"]}),
        422,
        "analysis_mismatch",
    )
    assert "signal_space" in body["detail"] and "residuals" in body["detail"]
    # Another tenant's job, either way round, does not exist for bob.
    _problem(bob.get(f"/v1/jobs/{job_id}/compare", params={"baseline": base_id}), 404, "not_found")
    bobs = _problem(
        alice.get(f"/v1/jobs/{job_id}/compare", params={"baseline": "0" * 32}), 404, "not_found"
    )
    assert "0" * 32 in bobs["detail"]
    # The baseline parameter is required.
    _problem(alice.get(f"/v1/jobs/{job_id}/compare"), 422, "invalid_params")
    # An unfinished (here cancelled) job has nothing to compare.
    slow = _submit(
        alice,
        {"model_id": models[0], "analysis": "activation_maximization", "params": {"steps": 5000}},
    )
    alice.delete(f"/v1/jobs/{slow['id']}")
    _problem(
        alice.get(f"/v1/jobs/{job_id}/compare", params={"baseline": slow["id"]}),
        422,
        "analysis_mismatch",
    )
    slow_ss = _submit(
        alice,
        {"model_id": models[0], "analysis": "signal_space", "params": {"vectors": 7}},
    )
    alice.delete(f"/v1/jobs/{slow_ss['id']}")
    status = alice.get(f"/v1/jobs/{slow_ss['id']}").json()["status"]
    if status == "canceled":  # it may have finished before the cancel reached it
        _problem(
            alice.get(f"/v1/jobs/{job_id}/compare", params={"baseline": slow_ss["id"]}),
            409,
            "job_not_succeeded",
        )
        _problem(alice.get(f"/v1/jobs/{slow_ss['id']}/bundle"), 409, "job_not_succeeded")


# --- bundle -------------------------------------------------------------------------------


def test_bundle_holds_the_result_the_artifacts_and_the_report(
    alice: httpx.Client, bob: httpx.Client, pair: tuple[str, str]
) -> None:
    job_id = pair[0]
    resp = alice.get(f"/v1/jobs/{job_id}/bundle")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/zip"
    assert resp.headers["content-disposition"] == f'attachment; filename="{job_id}.zip"'
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        assert zf.testzip() is None
        names = set(zf.namelist())
        job = JobOut.model_validate_json(zf.read("result.json"))
        assert job.id == job_id and job.result is not None
        prefix = f"/v1/artifacts/{job_id}/"
        expected = {f"artifacts/{a.url.removeprefix(prefix)}" for a in job.result.artifacts}
        assert expected and names == {"result.json", "report.html", *expected}
        # Each artifact is the bytes the artifact route serves.
        for artifact in job.result.artifacts:
            served = alice.get(artifact.url)
            assert served.status_code == 200
            assert zf.read(f"artifacts/{artifact.url.removeprefix(prefix)}") == served.content
        report = zf.read("report.html").decode()
    # The standalone report: nothing fetched from anywhere (pictures inlined, scripts inline).
    assert "<html" in report and job_id in report
    assert not re.search(r'<(?:img|script)[^>]+src="(?!data:)', report)
    assert 'src="data:image/png;base64,' in report
    _problem(bob.get(f"/v1/jobs/{job_id}/bundle"), 404, "not_found")


# --- the report compared with a baseline ----------------------------------------------------


def test_report_with_a_baseline(
    stack: Service, alice: httpx.Client, pair: tuple[str, str], tmp_path: Path
) -> None:
    job_id, base_id = pair
    page = alice.get(f"/v1/jobs/{job_id}/report", params={"baseline": base_id})
    assert page.status_code == 200, page.text
    html = page.text
    assert f"Compared with baseline {base_id}" in html
    assert 'id="compare-data"' in html and "/v1/ui/static/compare.js" in html
    data = json.loads(re.search(r'id="compare-data">(.*?)</script>', html, re.S).group(1))  # type: ignore[union-attr]
    assert data["baseline_id"] == base_id and data["layers"]
    for layer in data["layers"]:
        assert len(layer["difference"]["x"]) == len(layer["job"]["profile"]["values"])
        # Same architecture: the spectra pair up index by index, so the ratio is exact.
        for v, b, r in zip(
            layer["job"]["profile"]["values"],
            layer["baseline"]["profile"]["values"],
            layer["difference"]["ratio"],
            strict=True,
        ):
            if v and b:
                assert r == pytest.approx(v / b, rel=1e-4)
    # A signed link for the comparison; the job's own link does not show the baseline.
    link = alice.get("/v1/ui/link", params={"job_id": job_id, "baseline": base_id}).json()
    assert f"baseline={base_id}" in link["url"]
    with httpx.Client(base_url=stack.url) as browser:
        assert browser.get(link["url"]).status_code == 200
        own = alice.get("/v1/ui/link", params={"job_id": job_id}).json()["url"]
        assert browser.get(f"{own}&baseline={base_id}").status_code == 401
    # The standalone file carries the comparison and its script.
    saved = alice.get(
        f"/v1/jobs/{job_id}/report", params={"baseline": base_id, "standalone": "true"}
    ).text
    assert f"Compared with baseline {base_id}" in saved and "compare-charts" in saved
    assert "/v1/ui/static/" not in saved
    # Wrong baselines: as the compare route.
    _problem(
        alice.get(f"/v1/jobs/{job_id}/report", params={"baseline": "f" * 32}), 404, "not_found"
    )

    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the page is untested")
    url = stack.url + link["url"]
    dom = run_chromium(binary, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'id="compare-charts"[^>]*data-charts-ready="2"', dom.stdout), dom.stdout[
        -3000:
    ]
    assert re.search(r'id="spectra-charts"[^>]*data-charts-ready="\d"', dom.stdout)
    # The standalone file, from disk, draws the same.
    file = tmp_path / "report.html"
    file.write_text(saved)
    dom = run_chromium(binary, "--dump-dom", file.as_uri())
    assert re.search(r'id="compare-charts"[^>]*data-charts-ready="2"', dom.stdout)
    shot = tmp_path / "compare.png"
    run = run_chromium(binary, "--window-size=1280,4200", f"--screenshot={shot}", url)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    keep = os.environ.get("DEEPSCOPE_REPORT_SHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report-compare.png")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The first layer's colour (#1f77b4) drawn in the comparison charts and the page's own.
    blue = np.all(np.abs(pixels - [31, 119, 180]) < 30, axis=-1)
    assert blue.sum() > 3000, blue.sum()
