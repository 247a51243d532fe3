"""The HTML pages (report, index, sign-in) over real HTTP, their signed links, a headless
Chromium that must load every picture of a report and draw its charts (live, and the
self-contained file from disk), and the Prometheus job metrics.

``DEEPSCOPE_REPORT_SHOTS=DIR`` keeps the browser's screenshots of the report in DIR, to look at.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from stack_helpers import chromium, run_chromium

from deepscope.client import Client, JobOut, ModelOut
from deepscope.models.training import Recipe, train_model
from deepscope.service.links import SCOPE_UI, LinkSigner, job_scope
from deepscope.service.report import PROFILE_POINTS, chart_data, script_json, spectrum_of

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


def test_report_in_a_headless_browser_loads_every_picture(
    service: Service, client: Client, job: JobOut, tmp_path: Path
) -> None:
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the page is untested")
    url = client.report_url(job, ttl=600)
    dom = run_chromium(binary, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # ui.js marks each <img> loaded (complete with a natural width) or broken.
    marks = re.findall(r'<img [^>]*data-loaded="([01])"', dom.stdout)
    expected = len(_pngs(job))
    assert expected >= 3 and marks == ["1"] * expected, marks
    assert f'data-images-loaded="{expected}"' in dom.stdout
    shot = tmp_path / "report.png"
    # Tall enough for the pictures below the interactive charts.
    run = run_chromium(binary, "--window-size=1280,3400", f"--screenshot={shot}", url)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (3400, 1280, 3)
    # The spectra are drawn in matplotlib's blue (#1f77b4): the plots are on the screen, not
    # alt texts of broken images.
    blue = np.all(np.abs(pixels.astype(int) - [31, 119, 180]) < 30, axis=-1)
    assert blue.sum() > 2000, blue.sum()
    # A control: a forged link loads nothing, and the browser shows the 401.
    forged = url.replace("sig=", "sig=x")
    control = run_chromium(binary, "--dump-dom", forged)
    assert "<img" not in control.stdout and "invalid link" in control.stdout


def _console(stderr: str) -> list[str]:
    """What the page wrote to its console: Chromium logs each message (console.error, an
    uncaught exception, a CSP violation, a failed load) as one ``:CONSOLE`` line. The report's
    scripts write nothing when all is well, so any line is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _report_data(html: str) -> dict[str, Any]:
    """The JSON that the charts are drawn from."""
    found = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', html, re.DOTALL
    )
    assert found, "no chart data in the page"
    data: dict[str, Any] = json.loads(found.group(1))
    return data


def _layers(job: JobOut) -> list[dict[str, Any]]:
    """``metrics.layers`` of the job's result as JSON (the metrics may be a typed model)."""
    assert job.result is not None
    metrics: Any = job.result.metrics
    as_json = metrics.model_dump(mode="json") if hasattr(metrics, "model_dump") else metrics
    layers: list[dict[str, Any]] = as_json["layers"]
    return layers


def _full_spectrum(layer: dict[str, Any]) -> tuple[int, list[float] | None]:
    """(count, every singular value when the result has them all, else None)."""
    if "spectrum" in layer:
        return int(layer["spectrum"]["count"]), None
    values = [float(v) for v in layer["singular_values"]]
    return len(values), values


def test_chart_data_reads_bounded_spectra_and_old_full_lists() -> None:
    # Old results: the full list, thinned to PROFILE_POINTS evenly spaced indices.
    full = [float(1000 - i) for i in range(1000)]
    old = spectrum_of({"singular_values": full})
    assert old is not None
    indices, values = old["profile"]["indices"], old["profile"]["values"]
    assert len(indices) == PROFILE_POINTS and indices[0] == 0 and indices[-1] == 999
    assert indices == sorted(set(indices)) and values == [full[i] for i in indices]
    assert (old["count"], old["max"], old["min"]) == (1000, 1000.0, 1.0)
    small = spectrum_of({"singular_values": [3.0, 2.0, 0.0]})
    assert small is not None and small["profile"] == {"indices": [0, 1, 2], "values": [3, 2, 0]}
    assert small["complete"] is True
    # Bounded results: taken as they are.
    bounded = {
        "count": 5000,
        "max": 9.0,
        "min": 1e-9,
        "profile": {"indices": [0, 2500, 4999], "values": [9.0, 0.5, 1e-9]},
        "top": [9.0],
        "bottom": [1e-9],
    }
    drawn = spectrum_of({"spectrum": bounded})
    assert drawn == {k: bounded[k] for k in ("count", "max", "min", "profile")} | {"complete": True}
    # A partial spectrum (Lanczos: the largest and smallest only) says so: the page leaves the
    # unknown middle out rather than drawing a line across it.
    partial = spectrum_of({"spectrum": {**bounded, "complete": False}})
    assert partial is not None and partial["complete"] is False
    # What does not hold together is not drawn; NaN and ∞ become null (JSON has neither).
    assert spectrum_of({"spectrum": {**bounded, "profile": {"indices": [0], "values": []}}}) is None
    assert spectrum_of({"spectrum": {**bounded, "count": 2}}) is None
    assert spectrum_of({"rank": 3}) is None
    data = chart_data(
        {
            "layers": [
                {"name": "a", "rank": 3, "condition_number": None, "singular_values": [1.0, 0.0]},
                {"name": "b", "rank": 2, "condition_number": 4.0, "spectrum": bounded},
                {"name": "c", "classes": []},
            ]
        }
    )
    assert data is not None
    assert [(x["name"], x["rank"], x["condition_number"]) for x in data["layers"]] == [
        ("a", 3, None),
        ("b", 2, 4.0),
    ]
    nan = spectrum_of({"singular_values": [math.inf, math.nan, 1.0]})
    assert nan is not None and nan["profile"]["values"] == [None, None, 1.0]
    assert chart_data({"layers": [{"name": "c", "classes": []}]}) is None
    assert chart_data({"predictions": []}) is None
    # A name cannot close the <script> element that carries the JSON.
    text = str(script_json({"name": "</script><!-- & -->"}))
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"name": "</script><!-- & -->"}


def test_report_carries_its_spectra_and_loads_the_chart_scripts(
    service: Service, job: JobOut
) -> None:
    assert job.result is not None
    with service.client(service.key_a) as http:
        html = http.get(f"/v1/jobs/{job.id}/report").text
        scripts = re.findall(r'<script src="([^"]+)"', html)
        assert scripts == [
            "/v1/ui/static/uplot.iife.min.js",
            "/v1/ui/static/charts.js",
            "/v1/ui/static/report.js",
            "/v1/ui/static/ui.js",
        ]
        for src in scripts:
            served = http.get(src)
            assert served.status_code == 200, src
            assert served.headers["content-type"].startswith("text/javascript")
        assert http.get("/v1/ui/static/uplot.min.css").status_code == 200
        # A fixed list of names: nothing else of the package is reachable.
        for other in ("nope.js", "..%2Freport.py", "..%2Ftemplates%2Fbase.html"):
            assert http.get(f"/v1/ui/static/{other}").status_code == 404, other
    # The charts' data: every layer of the result, in depth order, from its spectrum.
    data = _report_data(html)
    layers = _layers(job)
    assert [x["name"] for x in data["layers"]] == [x["name"] for x in layers]
    for drawn, layer in zip(data["layers"], layers, strict=True):
        assert drawn["rank"] == layer["rank"]
        if layer["condition_number"] is None:
            assert drawn["condition_number"] is None
        else:
            assert drawn["condition_number"] == pytest.approx(layer["condition_number"], rel=1e-5)
        count, full = _full_spectrum(layer)
        spectrum = drawn["spectrum"]
        indices, values = spectrum["profile"]["indices"], spectrum["profile"]["values"]
        assert spectrum["count"] == count
        assert indices[0] == 0 and indices[-1] == count - 1
        assert len(indices) == len(values) == min(count, PROFILE_POINTS)
        assert values == sorted(values, reverse=True)
        if full is not None:
            assert values == pytest.approx([full[i] for i in indices], rel=1e-5)
            assert spectrum["max"] == pytest.approx(full[0], rel=1e-5)
    # The PNG plots stay, and the page offers itself as one file.
    assert len(re.findall(r'<img [^>]*data-artifact="', html)) == len(_pngs(job))
    assert f"/v1/jobs/{job.id}/report?t=alice&amp;exp=" in html and "standalone=true" in html


def _assert_self_contained(html: str, job: JobOut) -> None:
    """Everything the page shows is in it: no reference to the service or anywhere else."""
    refs = re.findall(r'\b(?:src|href|action)\s*=\s*"([^"]*)"', html)
    outside = [r[:80] for r in refs if not r.startswith(("data:", "#"))]
    assert refs and not outside, outside
    for needle in ('src="http', 'href="http', '="/v1/', "<link", "<script src", "url("):
        assert needle not in html, needle
    pictures = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(pictures) == len(_pngs(job))
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    # Opened from disk, its own policy lets nothing be fetched and only its scripts run.
    meta = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert meta, "no CSP in the page"
    policy = meta.group(1).replace("&#39;", "'")
    assert "default-src 'none'" in policy and "img-src data:" in policy
    # uPlot, charts.js, report.js and ui.js: each inlined, each allowed by its hash.
    assert policy.count("'sha256-") == 4 and "unsafe-inline" not in policy.split("script-src")[1]
    assert "frame-ancestors" not in policy  # ignored in a <meta> (and logged as an error)
    assert len(re.findall(r"<script>", html)) == 4
    assert len(_report_data(html)["layers"]) == len(_layers(job))


def test_standalone_report_is_one_file_that_needs_no_server(
    service: Service, client: Client, job: JobOut
) -> None:
    html = client.report_html(job)
    _assert_self_contained(html, job)
    assert "saved report" in html and "picture links stop working" not in html
    with service.client(service.key_a) as http:
        resp = http.get(f"/v1/jobs/{job.id}/report", params={"standalone": "true"})
    assert resp.status_code == 200 and resp.text.count("data:image/png") == len(_pngs(job))
    assert resp.headers["content-disposition"] == (
        f'attachment; filename="deepscope-report-{job.id}.html"'
    )
    csp = resp.headers["content-security-policy"]
    assert "'sha256-" in csp and "frame-ancestors 'none'" in csp and "'self'" not in csp
    assert resp.headers["cache-control"] == "no-store"
    # The same key or link as the report.
    path = _link_path(client, job)
    with httpx.Client(base_url=service.url, timeout=60) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job.id}/report?standalone=true").status_code == 401
        linked = anonymous.get(f"{path}&standalone=true")
        assert linked.status_code == 200 and "data:image/png;base64," in linked.text
    # The live page, for comparison, links its pictures.
    assert 'src="data:' not in client.report_html(job, standalone=False)


def test_cli_saves_the_standalone_report(service: Service, job: JobOut, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPSCOPE_DEBUG": ""}
    common = ["--url", service.url, "--key", service.key_a]
    cli = [sys.executable, "-m", "deepscope", "report"]
    target = tmp_path / "ci" / "report.html"
    saved = subprocess.run(
        [*cli, job.id, "--save", str(target), *common],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.strip() == str(target)
    _assert_self_contained(target.read_text(encoding="utf-8"), job)
    # Without --save: the signed link, as before.
    link = subprocess.run(
        [*cli, job.id, *common], capture_output=True, text=True, timeout=120, env=env
    )
    assert link.returncode == 0, link.stderr
    assert link.stdout.strip().startswith(f"{service.url}/v1/jobs/{job.id}/report?t=alice&exp=")
    index = subprocess.run(
        [*cli, "--save", str(tmp_path / "index.html"), *common],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert index.returncode == 2 and "--save needs a job id" in index.stderr
    assert not (tmp_path / "index.html").exists()


def _keep_shot(shot: Path, name: str) -> None:
    keep = os.environ.get("DEEPSCOPE_REPORT_SHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / name)


def test_charts_draw_in_a_headless_browser_live_and_from_disk(
    client: Client, job: JobOut, tmp_path: Path
) -> None:
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the page is untested")
    assert job.result is not None
    names = [layer["name"] for layer in _layers(job)]
    saved = tmp_path / "saved-report.html"
    saved.write_text(client.report_html(job), encoding="utf-8")
    targets = {"live": client.report_url(job, ttl=600), "standalone": saved.as_uri()}
    for kind, target in targets.items():
        dom = run_chromium(binary, "--dump-dom", target)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert _console(dom.stderr) == [], (kind, _console(dom.stderr))
        page = dom.stdout
        # report.js ran to the end: both charts, drawn by uPlot (a canvas each), with a legend
        # entry per layer to show or hide it.
        section = re.search(r'<section id="spectra-charts"[^>]*>', page)
        assert section, kind
        assert 'data-charts-ready="2"' in section.group(0), (kind, section.group(0))
        assert "data-charts-error" not in section.group(0), (kind, section.group(0))
        for chart in ("chart-spectra", "chart-condition"):
            drawn = re.search(rf'<div class="chart" id="{chart}"><div class="uplot', page)
            assert drawn, (kind, chart)
        assert page.count("<canvas") == 2, kind
        for name in names:
            assert f'<div class="u-label">{name}</div>' in page, (kind, name)
        assert '<div class="chart-tools">' in page  # the show/hide buttons, unhidden by JS
        # ui.js: every picture loaded (links from the service, or data: URLs).
        expected = len(_pngs(job))
        assert f'data-images-loaded="{expected}"' in page, kind
        shot = tmp_path / f"report-{kind}.png"
        run = run_chromium(binary, "--window-size=1280,3400", f"--screenshot={shot}", target)
        assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
        assert _console(run.stderr) == [], (kind, _console(run.stderr))
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.shape == (3400, 1280, 3)
        _keep_shot(shot, shot.name)


# Run in a copy of the saved report: hovers each chart, clicks a legend entry and the show/hide
# buttons, and leaves what the legends said in <body data-probe="{json}">.
_PROBE = """
(function () {
  const out = {};
  const values = (id) =>
    Array.from(document.querySelectorAll(`#${id} .u-legend .u-value`)).map((td) => td.textContent);
  const hidden = () =>
    Array.from(document.querySelectorAll("#chart-spectra .u-legend .u-series")).map((tr) =>
      tr.classList.contains("u-off"),
    );
  function hover(id, fx, fy) {
    const over = document.querySelector(`#${id} .u-over`);
    const r = over.getBoundingClientRect();
    const at = { clientX: r.left + r.width * fx, clientY: r.top + r.height * fy, bubbles: true };
    over.dispatchEvent(new MouseEvent("mouseenter", at));
    over.dispatchEvent(new MouseEvent("mousemove", at));
  }
  setTimeout(() => {
    hover("chart-spectra", 0.5, 0.3);
    hover("chart-condition", 0.27, 0.5);
    setTimeout(() => {
      out.spectra = values("chart-spectra");
      out.condition = values("chart-condition");
      document.querySelectorAll("#chart-spectra .u-legend .u-series th")[2].click();
      out.clicked = hidden();
      document.querySelector('button[data-layers-show="none"]').click();
      out.none = hidden();
      document.querySelector('button[data-layers-show="all"]').click();
      out.all = hidden();
      document.body.dataset.probe = JSON.stringify(out);
    }, 200);
  }, 200);
})();
"""


def _bounded_layers(count: int) -> list[dict[str, Any]]:
    """Layers as bounded results carry them: a deep model, big matrices (5000 singular values,
    a 256-point profile), two of them singular (zeros at the end, no condition number)."""
    layers = []
    indices = [round(k * (5000 - 1) / 255) for k in range(256)]
    for depth in range(count):
        decay = 1.0 + depth / 3
        values = [3.0 * (1 - i / 5000) ** decay + 1e-4 for i in indices]
        singular = depth in (5, 17)
        if singular:
            values[-20:] = [0.0] * 20
        layers.append(
            {
                "name": f"stage{depth // 4}.block{depth % 4}.conv",
                "rank": 4000 if singular else 5000,
                "condition_number": None if singular else values[0] / values[-1],
                "spectrum": {
                    "count": 5000,
                    "max": values[0],
                    "min": values[-1],
                    "profile": {"indices": indices, "values": values},
                    "top": values[:8],
                    "bottom": values[-8:],
                },
            }
        )
    return layers


def test_charts_answer_the_pointer_and_draw_bounded_spectra(
    client: Client, job: JobOut, tmp_path: Path
) -> None:
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the page is untested")
    assert job.result is not None
    names = [layer["name"] for layer in _layers(job)]
    html = client.report_html(job)
    # Hover, legend clicks, buttons: the page's policy lets only its own scripts run, so the
    # probe runs in a copy without it.
    probed = tmp_path / "probed.html"
    unlocked = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
    probed.write_text(
        unlocked.replace("</body>", f"<script>{_PROBE}</script></body>"), encoding="utf-8"
    )
    dom = run_chromium(binary, "--dump-dom", probed.as_uri())
    assert _console(dom.stderr) == [], _console(dom.stderr)
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, dom.stdout[-3000:]
    probe = json.loads(unescape(found.group(1)))
    # Every layer answers at the pointer: its σᵢ/σ₁, the index and σᵢ.
    x, *layer_values = probe["spectra"]
    assert 0.3 < float(x) < 0.7 and len(layer_values) == len(names)
    assert all(re.fullmatch(r"[0-9.e+-]+ \(σ\d+ = [0-9.e+-]+\)", v) for v in layer_values), (
        layer_values
    )
    layer, condition = probe["condition"]
    assert layer == f"2: {names[1]}" and float(condition) > 1
    off = [False] * (len(names) + 1)
    assert probe["clicked"] == [*off[:2], True, *off[3:]]  # the second layer's entry
    assert probe["none"] == [False] + [True] * len(names)
    assert probe["all"] == off
    # Bounded results of a deep model, with singular layers: the same page draws them.
    data = chart_data({"layers": _bounded_layers(24)})
    assert data is not None
    bounded = tmp_path / "bounded.html"
    bounded.write_text(
        re.sub(
            r'(<script type="application/json" id="report-data">).*?(</script>)',
            lambda m: m.group(1) + str(script_json(data)) + m.group(2),
            html,
            count=1,
            flags=re.DOTALL,
        ),
        encoding="utf-8",
    )
    shot = tmp_path / "report-bounded.png"
    run = run_chromium(binary, "--window-size=1280,3400", f"--screenshot={shot}", bounded.as_uri())
    assert run.returncode == 0 and _console(run.stderr) == [], _console(run.stderr)
    _keep_shot(shot, shot.name)
    dom = run_chromium(binary, "--dump-dom", bounded.as_uri())
    assert _console(dom.stderr) == []
    assert 'data-charts-ready="2"' in dom.stdout
    assert dom.stdout.count('<div class="u-label">stage') == 24
    note = re.search(r'<p class="note" id="chart-unbounded">([^<]*)</p>', dom.stdout)
    assert note and "stage1.block1.conv, stage4.block1.conv" in note.group(1), dom.stdout[-3000:]


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
