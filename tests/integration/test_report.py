"""The HTML pages (report, index, sign-in) over real HTTP, their signed links, a headless
Chromium that must load every picture of a report, and the Prometheus job metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from deepscope.client import Client, JobOut, ModelOut
from deepscope.models.training import Recipe, train_model
from deepscope.service.links import SCOPE_UI, LinkSigner, job_scope

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Service = Any  # conftest.Service


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[Client]:
    with Client(service.url, service.key_a, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: Client, tmp_path_factory: pytest.TempPathFactory) -> ModelOut:
    out = tmp_path_factory.mktemp("report-model") / "fcnn5.safetensors"
    train_model("fcnn5", "digits", out, epochs=1, recipe=Recipe.FAST, seed=2)
    return client.upload_model(out, wait=True, timeout=120)


@pytest.fixture(scope="module")
def job(client: Client, model: ModelOut) -> JobOut:
    return client.wait(client.submit(model, "signal_space", {"vectors": 3}), progress=False)


def _link_path(client: Client, job: JobOut | None = None) -> str:
    return client.report_url(job, ttl=600)[len(client.url) :]


def _pngs(job: JobOut) -> list[str]:
    assert job.result is not None
    return [a.url for a in job.result.artifacts if a.media_type == "image/png"]


def test_report_with_the_key_has_tables_pictures_and_safe_headers(
    service: Service, job: JobOut
) -> None:
    with service.client(service.key_a) as http:
        page = http.get(f"/v1/jobs/{job.id}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "img-src 'self'" in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    html = page.text
    for name in ("fc1", "fc2", "fc3", "fc4", "fc5"):
        assert f"<td>{name}</td>" in html
    assert "condition number" in html and "stable rank" in html and "spectral norm" in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(s.split("?")[0] for s in srcs) == sorted(_pngs(job))
    # Every picture URL carries a link for this job only.
    assert all("t=alice&amp;exp=" in s for s in srcs)


def test_signed_links_open_the_report_and_its_pictures_only(
    service: Service, client: Client, job: JobOut, model: ModelOut
) -> None:
    path = _link_path(client, job)
    query = path.split("?", 1)[1]
    other = client.wait(client.submit(model, "signal_space", {"vectors": 1}), progress=False)
    with httpx.Client(base_url=service.url, timeout=30) as anonymous:
        assert anonymous.get(path).status_code == 200
        assert anonymous.get(f"/v1/jobs/{job.id}/report").status_code == 401
        picture = _pngs(job)[0]
        assert anonymous.get(f"{picture}?{query}").status_code == 200
        assert anonymous.get(picture).status_code == 401
        # Not for another job, not for the JSON API, not altered.
        assert anonymous.get(f"{_pngs(other)[0]}?{query}").status_code == 401
        assert anonymous.get(f"/v1/jobs/{other.id}/report?{query}").status_code == 401
        assert anonymous.get(f"/v1/jobs/{job.id}?{query}").status_code == 401
        assert anonymous.get(f"/v1/ui?{query}").status_code == 401
        tampered = re.sub(r"exp=(\d+)", lambda m: f"exp={int(m.group(1)) + 60}", query)
        assert anonymous.get(f"{picture}?{tampered}").status_code == 401
        # Expired (minted with the tenant's key, as the server would, but in the past).
        signer = LinkSigner({service.key_a: "alice"})
        old = signer.sign("alice", job_scope(job.id), int(time.time()) - 1)
        resp = anonymous.get(f"/v1/jobs/{job.id}/report?{old.query()}")
        assert resp.status_code == 401 and "expired" in resp.json()["detail"]
        # Bob's link does not reach Alice's job.
        bob = LinkSigner({service.key_b: "bob"}).sign("bob", SCOPE_UI, int(time.time()) + 60)
        assert anonymous.get(f"/v1/jobs/{job.id}/report?{bob.query()}").status_code == 404
        assert anonymous.get(f"{picture}?{bob.query()}").status_code == 404


def test_index_sign_in_and_its_links(service: Service, client: Client, job: JobOut) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as browser:
        login = browser.get("/", follow_redirects=True)
        assert login.status_code == 200 and 'name="key"' in login.text
        assert "?key=" not in login.text
        wrong = browser.post("/v1/ui/login", data={"key": "nope"})
        assert wrong.status_code == 401 and "invalid API key" in wrong.text
        signed = browser.post("/v1/ui/login", data={"key": service.key_a})
        assert signed.status_code == 303
        location = signed.headers["location"]
        assert location.startswith("/v1/ui?t=alice&exp=") and service.key_a not in location
        index = browser.get(location)
        assert index.status_code == 200
        assert job.id in index.text and job.model_id in index.text
        report_links = re.findall(r'href="(/v1/jobs/[0-9a-f]{32}/report\?[^"]+)"', index.text)
        mine = [u for u in report_links if job.id in u]
        assert mine
        assert browser.get(mine[0].replace("&amp;", "&")).status_code == 200
        # Bob signs in and sees none of Alice's things.
        bob = browser.post("/v1/ui/login", data={"key": service.key_b})
        bob_index = browser.get(bob.headers["location"])
        assert job.id not in bob_index.text and "tenant bob" in bob_index.text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def test_report_in_a_headless_browser_loads_every_picture(
    service: Service, client: Client, job: JobOut, tmp_path: Path
) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the page is untested")
    url = client.report_url(job, ttl=600)
    dom = _run_chromium(binary, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # ui.js marks each <img> loaded (complete with a natural width) or broken.
    marks = re.findall(r'<img [^>]*data-loaded="([01])"', dom.stdout)
    expected = len(_pngs(job))
    assert expected >= 6 and marks == ["1"] * expected, marks
    assert f'data-images-loaded="{expected}"' in dom.stdout
    shot = tmp_path / "report.png"
    run = _run_chromium(binary, "--window-size=1280,2000", f"--screenshot={shot}", url)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1280, 3)
    # The spectra are drawn in matplotlib's blue (#1f77b4): the plots are on the screen, not
    # alt texts of broken images.
    blue = np.all(np.abs(pixels.astype(int) - [31, 119, 180]) < 30, axis=-1)
    assert blue.sum() > 2000, blue.sum()
    # A control: a forged link loads nothing, and the browser shows the 401.
    forged = url.replace("sig=", "sig=x")
    control = _run_chromium(binary, "--dump-dom", forged)
    assert "<img" not in control.stdout and "invalid link" in control.stdout


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name) :]] = float(value)
    return out


def test_metrics_count_jobs_by_status_and_analysis_with_durations(
    service: Service, client: Client, model: ModelOut, job: JobOut
) -> None:
    before = _samples(client._http.get("/metrics").text, "deepscope_jobs_total")
    done = client.wait(client.submit(model, "signal_space", {"vectors": 2}), progress=False)
    cached = client.submit(model, "signal_space", {"vectors": 2})
    assert cached.cached
    text = client._http.get("/metrics").text
    after = _samples(text, "deepscope_jobs_total")
    key = '{analysis="signal_space",status="%s"}'
    assert after[key % "queued"] - before.get(key % "queued", 0) == 1
    assert after[key % "running"] - before.get(key % "running", 0) == 1
    assert after[key % "succeeded"] - before.get(key % "succeeded", 0) == 2  # + the cached one
    count = _samples(text, "deepscope_job_duration_seconds_count")
    total = _samples(text, "deepscope_job_duration_seconds_sum")
    label = '{analysis="signal_space",status="succeeded"}'
    # Every succeeded signal_space job that ran (the cached ones did not) is in the histogram.
    ran = [j for j in client.list_jobs(limit=1000) if j.analysis == "signal_space" and not j.cached]
    succeeded = [j for j in ran if j.status.value == "succeeded"]
    assert count[label] >= len(succeeded)
    assert done.started_at is not None and done.finished_at is not None
    assert total[label] >= (done.finished_at - done.started_at).total_seconds() - 1e-3
    buckets = _samples(text, "deepscope_job_duration_seconds_bucket")
    inf = '{analysis="signal_space",le="+Inf",status="succeeded"}'
    assert buckets[inf] == count[label]
    assert "deepscope_http_requests_total" in text and 'deepscope_queue_depth{queue="cpu"}' in text
    assert 'deepscope_jobs_running{queue="cpu"}' in text
