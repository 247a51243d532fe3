"""Security and limits against the real stack (conftest's ``service``: real Redis, worker and
uvicorn processes). Each test names the promise it holds the service to; each would fail
without it.

* tenants: another tenant gets 404 for every object (models, datasets, jobs, artifacts, report
  pages, signed links of its own); every protected operation of the OpenAPI schema is 401
  without a valid key;
* uploads are data: a pickle that would run code is refused by the worker and never runs, a
  TorchScript archive passed off as a state_dict is refused where code is disabled;
* ids only: traversal in any id or artifact path is 404 and writes nothing;
* limits: steps (422), every numeric param finite and bounded (422 naming the field), image
  pixels, images per request, upload size, decompression bombs (413/422, from the headers and
  the compression ratio: the API's memory untouched), models and datasets per tenant (409,
  exact under concurrency, the refused uploads' files gone);
* RQ payloads are ids and JSON; Redis is not reachable from outside; keys are never logged
  nor stored.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import pickle
import struct
import types
import typing
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from redis import Redis
from stack_helpers import (
    fcnn_weights,
    manifest_for,
    peak_rss_mib,
    torchscript_bytes,
    upload_model,
    wait_job,
    wait_model,
)

pytestmark = [pytest.mark.integration]

Service = Any
_ID = "0123456789abcdef0123456789abcdef"


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fcnn_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def alice_model(alice: httpx.Client, weights: Path) -> dict[str, Any]:
    resp = upload_model(alice, weights.read_bytes(), manifest_for(name="alice-fcnn1"))
    assert resp.status_code == 202, resp.text
    model = wait_model(alice, resp.json()["id"])
    assert model["status"] == "ready", model
    return model


@pytest.fixture(scope="module")
def bob_model(bob: httpx.Client, weights: Path) -> dict[str, Any]:
    resp = upload_model(bob, weights.read_bytes(), manifest_for(name="bob-fcnn1"))
    assert resp.status_code == 202, resp.text
    model = wait_model(bob, resp.json()["id"])
    assert model["status"] == "ready", model
    return model


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.fixture(scope="module")
def alice_dataset(alice: httpx.Client) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    data = _npz(
        images=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        labels=np.arange(20) % 10,
    )
    resp = alice.post("/v1/datasets", files={"file": ("mine.npz", data)})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


@pytest.fixture(scope="module")
def alice_job(alice: httpx.Client, alice_model: dict[str, Any]) -> dict[str, Any]:
    resp = alice.post(
        "/v1/jobs",
        json={"model_id": alice_model["id"], "analysis": "signal_space", "params": {"vectors": 2}},
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(alice, resp.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def _png(width: int, height: int, rows: Iterator[bytes] | None = None) -> bytes:
    """A grayscale PNG; ``rows`` (filter byte + pixels each) default to black."""
    compressor = zlib.compressobj(9)
    chunks = []
    if rows is None:
        row = b"\x00" * (width + 1)
        block = row * max(1, min(height, (16 << 20) // len(row)))
        left = height
        while left > 0:
            n = min(left, len(block) // len(row))
            chunks.append(compressor.compress(block[: n * len(row)]))
            left -= n
    else:
        chunks.extend(compressor.compress(r) for r in rows)
    chunks.append(compressor.flush())
    idat = b"".join(chunks)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _zeros_npz(shape: tuple[int, ...]) -> bytes:
    """An .npz whose ``images`` (uint8 zeros of ``shape``) compress ~1000:1, written in chunks
    (the test never holds the array)."""
    buf = io.BytesIO()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    total = int(np.prod(shape))
    block = bytes(16 << 20)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("images.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            left = total
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        with archive.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(shape[0], np.int64))
    return buf.getvalue()


# --- authentication -----------------------------------------------------------------------

#: Operations open without a key by design: the form that asks for the key, and the login that
#: trades a key (form field) for a read-only link.
_PUBLIC = {
    ("get", "/v1/ui"),
    ("post", "/v1/ui/login"),
    # What each kind of error means: the type of every problem body points there.
    ("get", "/v1/problems"),
    ("get", "/v1/problems/{slug}"),
}


def _fill(path: str) -> str:
    out = path
    for name in ("model_id", "dataset_id", "job_id", "id"):
        out = out.replace("{" + name + "}", _ID)
    return out.replace("{path}", "spectrum.png")


def test_every_protected_operation_is_401_without_a_valid_key(
    service: Service, alice: httpx.Client
) -> None:
    spec = alice.get("/openapi.json").json()
    wrong = [
        None,
        "not-a-key",
        service.key_a + "x",
        service.key_a[:-1],
        service.key_a.upper(),
        "x",
    ]
    checked = 0
    for path, ops in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method in ops:
            if (method, path) in _PUBLIC:
                continue
            url = _fill(path)
            assert "{" not in url, url
            for key in wrong:
                headers = {} if key is None else {"Authorization": f"Bearer {key}"}
                with httpx.Client(base_url=service.url, headers=headers, timeout=30) as http:
                    resp = http.request(method.upper(), url, json={})
                assert resp.status_code == 401, (method, path, key, resp.text)
                detail = resp.json()["detail"]
                assert isinstance(detail, str) and resp.headers["www-authenticate"] == "Bearer"
                if key:
                    assert key not in detail  # a presented key is never echoed
            checked += 1
    assert checked >= 15  # every operation of models, datasets, jobs, artifacts, archs, ui
    # Other schemes are not keys either.
    for auth in (f"Basic {service.key_a}", f"Token {service.key_a}", service.key_a):
        with httpx.Client(base_url=service.url, headers={"Authorization": auth}) as http:
            assert http.get("/v1/models").status_code == 401, auth


def test_the_public_ui_pages_show_nothing_without_a_key(
    service: Service, alice_model: dict[str, Any]
) -> None:
    with service.client(None) as anon:
        form = anon.get("/v1/ui")
        assert form.status_code == 200
        assert alice_model["id"] not in form.text and "alice" not in form.text
        bad = anon.post("/v1/ui/login", data={"key": "not-a-key"}, follow_redirects=False)
        assert bad.status_code in (401, 422), bad.text
        assert alice_model["id"] not in bad.text


# --- tenants ------------------------------------------------------------------------------


def test_another_tenant_gets_404_for_everything(
    service: Service,
    alice: httpx.Client,
    bob: httpx.Client,
    alice_model: dict[str, Any],
    bob_model: dict[str, Any],
    alice_dataset: dict[str, Any],
    alice_job: dict[str, Any],
) -> None:
    model_id, dataset_id, job_id = alice_model["id"], alice_dataset["id"], alice_job["id"]
    png = _png(28, 28)
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/v1/models/{model_id}", {}),
        ("DELETE", f"/v1/models/{model_id}", {}),
        ("POST", f"/v1/models/{model_id}/predict", {"files": [("files", ("a.png", png))]}),
        ("GET", f"/v1/datasets/{dataset_id}", {}),
        ("DELETE", f"/v1/datasets/{dataset_id}", {}),
        ("GET", f"/v1/jobs/{job_id}", {}),
        ("DELETE", f"/v1/jobs/{job_id}", {}),
        ("POST", "/v1/jobs", {"json": {"model_id": model_id, "analysis": "signal_space"}}),
        (
            "POST",
            "/v1/jobs",
            {
                "json": {
                    "model_id": bob_model["id"],
                    "analysis": "residuals",
                    "dataset": dataset_id,
                }
            },
        ),
    ]
    artifacts = [a["url"] for a in alice_job["result"]["artifacts"]]
    assert any(u.endswith("result.json") for u in artifacts) and len(artifacts) >= 2
    requests += [("GET", url, {}) for url in artifacts]
    spec = alice.get("/openapi.json").json()
    has_report = "/v1/jobs/{job_id}/report" in spec["paths"]
    if has_report:
        requests.append(("GET", f"/v1/jobs/{job_id}/report", {}))
        assert alice.get(f"/v1/jobs/{job_id}/report").status_code == 200
    for method, url, kwargs in requests:
        resp = bob.request(method, url, **kwargs)
        assert resp.status_code == 404, (method, url, resp.status_code, resp.text)
        assert isinstance(resp.json()["detail"], str)
    # Bob's own signed links do not open Alice's pages or pictures either.
    if "/v1/ui/link" in spec["paths"]:
        link = bob.get("/v1/ui/link").json()["url"]
        query = link.split("?", 1)[1]
        with service.client(None) as anon:
            targets = [*artifacts, f"/v1/jobs/{job_id}/report"] if has_report else artifacts
            for url in targets:
                resp = anon.get(f"{url}?{query}")
                assert resp.status_code == 404, (url, resp.status_code)
                # Bob's signature with Alice's name on it is a forgery.
                forged = query.replace("t=bob", "t=alice")
                assert anon.get(f"{url}?{forged}").status_code == 401
        assert bob.get("/v1/ui/link", params={"job_id": job_id}).status_code == 404
    # Listings do not leak, and Bob's deletes did not touch Alice's objects.
    assert model_id not in {m["id"] for m in bob.get("/v1/models").json()["models"]}
    assert dataset_id not in {d["id"] for d in bob.get("/v1/datasets").json()["datasets"]}
    assert job_id not in {j["id"] for j in bob.get("/v1/jobs").json()["jobs"]}
    assert alice.get(f"/v1/models/{model_id}").json()["status"] == "ready"
    assert alice.get(f"/v1/datasets/{dataset_id}").status_code == 200
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    for url in artifacts:
        assert alice.get(url).status_code == 200


# --- ids only -----------------------------------------------------------------------------

_HOSTILE = [
    "..",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fdev-api-key",
    "%252e%252e%252f",
    "..%5C..%5Cwindows",
    "%2Fetc%2Fpasswd",
    "a%00b",
    "~root",
    "0" * 31 + "G",
    "A" * 32,
    "0" * 4096,
    "%C0%AE%C0%AE%2F",
    "redis:%2F%2F127.0.0.1:6379",
]


def test_traversal_in_ids_and_paths_is_404_and_touches_nothing(
    service: Service,
    alice: httpx.Client,
    alice_job: dict[str, Any],
    alice_model: dict[str, Any],
) -> None:
    before = sorted(str(p) for p in service.data_dir.rglob("*") if "logs" not in p.parts)
    job_id = alice_job["id"]
    for bad in _HOSTILE:
        for url in (
            f"/v1/models/{bad}",
            f"/v1/datasets/{bad}",
            f"/v1/jobs/{bad}",
            f"/v1/artifacts/{bad}/spectrum.png",
            f"/v1/artifacts/{job_id}/{bad}",
            f"/v1/artifacts/{job_id}/{bad}/result.json",
        ):
            for method in ("GET", "DELETE"):
                if method == "DELETE" and "/artifacts/" in url:
                    continue
                # httpx resolves a literal "..": a redirect may come first, then the 404.
                resp = alice.request(method, url, follow_redirects=True)
                assert resp.status_code in (404, 405), (method, url, resp.status_code)
        resp = alice.post("/v1/jobs", json={"model_id": bad, "analysis": "signal_space"})
        assert resp.status_code == 404, (bad, resp.text)
        resp = alice.post(
            "/v1/jobs",
            json={"model_id": alice_model["id"], "analysis": "residuals", "dataset": bad},
        )
        assert resp.status_code in (404, 422), (bad, resp.text)
    # Literal dot segments, sent as they are (http.client does not resolve them).
    host, port = service.url.rsplit("//", 1)[1].split(":")
    for raw in (
        f"/v1/artifacts/{job_id}/../../../../etc/passwd",
        f"/v1/artifacts/{job_id}/./result.json",
        f"/v1/artifacts/{job_id}//result.json",
        f"/v1/artifacts/{job_id}/spectrum_fc1.png/../../{job_id}/result.json",
    ):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", raw, headers={"Authorization": f"Bearer {service.key_a}"})
        answer = conn.getresponse()
        assert answer.status == 404, (raw, answer.status)
        conn.close()
    # File names and names in uploads are labels, never paths.
    resp = alice.post(
        "/v1/datasets",
        files={
            "file": (
                "../../../../tmp/evil-upload.npz",
                _npz(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, int)),
            )
        },
        data={"name": "../../evil-name"},
    )
    assert resp.status_code == 201, resp.text
    after = sorted(str(p) for p in service.data_dir.rglob("*") if "logs" not in p.parts)
    created = set(after) - set(before)
    assert not [p for p in created if "evil" in p], created
    assert not Path("/tmp/evil-upload.npz").exists()
    storage = service.data_dir / "storage"
    assert {p.name for p in storage.iterdir()} <= {"blobs", "inputs", "artifacts"}
    assert alice.delete(f"/v1/datasets/{resp.json()['id']}").status_code == 204


# --- uploads are data ---------------------------------------------------------------------


class _OpenFile:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


class _System:
    """Unpickling this runs ``touch marker`` in a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(
    service: Service, alice: httpx.Client, tmp_path: Path
) -> None:
    payloads = {}
    for i, evil in enumerate((_OpenFile, _System)):
        marker = tmp_path / f"pwned-{i}"
        payloads[f"raw pickle {evil.__name__}"] = (pickle.dumps(evil(marker), protocol=2), marker)
        marker_zip = tmp_path / f"pwned-zip-{i}"
        buf = io.BytesIO()
        torch.save({"fc1.weight": evil(marker_zip), "fc1.bias": torch.zeros(10)}, buf)
        payloads[f"torch.save zip {evil.__name__}"] = (buf.getvalue(), marker_zip)
    for what, (data, marker) in payloads.items():
        resp = upload_model(alice, data, manifest_for(fmt="state_dict"), filename="model.pt")
        assert resp.status_code == 202, (what, resp.text)
        model = wait_model(alice, resp.json()["id"])
        assert model["status"] == "invalid", (what, model)
        assert "needs code" in model["error"], (what, model["error"])
        assert "/tmp" not in model["error"]
        assert not marker.exists(), f"{what}: the payload ran"
        job = alice.post("/v1/jobs", json={"model_id": model["id"], "analysis": "signal_space"})
        assert job.status_code == 409
        assert alice.delete(f"/v1/models/{model['id']}").status_code == 204


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x.flatten(1))


def test_code_formats_are_refused_where_disabled_even_in_disguise(alice: httpx.Client) -> None:
    script = torchscript_bytes(_Tiny())
    declared = upload_model(alice, script, manifest_for(fmt="torchscript"), filename="m.pt")
    assert declared.status_code == 422 and "carries code" in declared.json()["detail"]
    disguised = upload_model(alice, script, manifest_for(fmt="state_dict"), filename="m.pt")
    assert disguised.status_code == 202, disguised.text
    model = wait_model(alice, disguised.json()["id"])
    assert model["status"] == "invalid", model
    assert "TorchScript" in model["error"], model["error"]
    assert alice.delete(f"/v1/models/{model['id']}").status_code == 204


# --- limits -------------------------------------------------------------------------------


def test_steps_over_the_limit_are_422(alice: httpx.Client, alice_model: dict[str, Any]) -> None:
    resp = alice.post(
        "/v1/jobs",
        json={
            "model_id": alice_model["id"],
            "analysis": "inverse_images",
            "params": {"steps": 10**6},
            "dataset": "digits",
        },
    )
    assert resp.status_code == 422
    assert "steps must be at most" in resp.json()["detail"]


def _numeric(annotation: Any) -> tuple[type | None, bool]:
    """(int or float, whether in a list) of a params field's type; (None, False) otherwise."""
    if annotation in (int, float):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _numeric(args[0])
    if origin is list:
        return _numeric(args[0])[0], True
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            kind, listed = _numeric(arg)
            if kind is not None:
                return kind, listed
    return None, False


def test_every_numeric_param_is_finite_and_bounded(alice: httpx.Client) -> None:
    """For every registered analysis, every numeric field (and every number in a list field):
    NaN, infinities and huge values are 422 naming the field, never a job that fails."""
    from deepscope.analyses import list_analyses

    values = {
        float: ["NaN", "Infinity", "-Infinity", "1e308"],
        int: ["NaN", "Infinity", "1e30", "1" + "0" * 30],
    }
    checked = 0
    for spec in list_analyses():
        for name, field in spec.params.model_fields.items():
            kind, listed = _numeric(field.annotation)
            if kind is None:
                continue
            for value in values[kind]:
                sent = f"[{value}]" if listed else value
                body = (
                    f'{{"model_id": "{_ID}", "analysis": "{spec.name}", '
                    f'"params": {{"{name}": {sent}}}, "dataset": "digits"}}'
                )
                resp = alice.post(
                    "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
                )
                assert resp.status_code == 422, (spec.name, name, value, resp.text)
                detail = resp.json()["detail"]
                assert f"params.{name}" in detail, (spec.name, name, value, detail)
            checked += 1
    assert checked >= 25


def test_a_png_bomb_is_refused_before_decoding(
    service: Service, alice: httpx.Client, alice_model: dict[str, Any]
) -> None:
    bomb = _png(20_000, 20_000)  # 400 megapixels in a few hundred kilobytes
    assert len(bomb) < service.max_upload
    before = peak_rss_mib(service.api.pid)
    resp = alice.post(
        f"/v1/models/{alice_model['id']}/predict", files=[("files", ("bomb.png", bomb))]
    )
    assert resp.status_code == 413, resp.text
    assert "20000×20000" in resp.json()["detail"]
    assert "DEEPSCOPE_MAX_IMAGE_PIXELS" in resp.json()["detail"]
    assert peak_rss_mib(service.api.pid) - before < 64
    # A PNG without its header chunk is not a PNG.
    headless = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    resp = alice.post(
        f"/v1/models/{alice_model['id']}/predict", files=[("files", ("x.png", headless))]
    )
    assert resp.status_code == 422 and "not a PNG" in resp.json()["detail"]


def test_too_many_images_in_one_predict_is_413(
    alice: httpx.Client, alice_model: dict[str, Any]
) -> None:
    url = f"/v1/models/{alice_model['id']}/predict"
    png = _png(28, 28)
    resp = alice.post(url, files=[("files", (f"{i}.png", png)) for i in range(65)])
    assert resp.status_code == 413, resp.text
    assert "at most 64" in resp.json()["detail"]
    many = _npz(images=np.zeros((65, 28, 28), np.uint8))
    resp = alice.post(url, files={"file": ("many.npz", many)})
    assert resp.status_code == 413, resp.text
    assert "65 images" in resp.json()["detail"]
    assert "DEEPSCOPE_MAX_PREDICT_IMAGES" in resp.json()["detail"]


def test_npz_bombs_are_refused_from_their_headers(
    service: Service, alice: httpx.Client, alice_model: dict[str, Any]
) -> None:
    bomb = _zeros_npz((200, 1000, 1000))  # 200 MB of pixels in ~200 KB
    assert len(bomb) < service.max_upload
    before = peak_rss_mib(service.api.pid)
    resp = alice.post("/v1/datasets", files={"file": ("bomb.npz", bomb)})
    assert resp.status_code == 422, resp.text
    assert "200000000 bytes" in resp.json()["detail"]
    resp = alice.post(f"/v1/models/{alice_model['id']}/predict", files={"file": ("bomb.npz", bomb)})
    assert resp.status_code == 422, resp.text
    assert "200000000 bytes" in resp.json()["detail"]
    assert peak_rss_mib(service.api.pid) - before < 64


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_an_npz_that_decompresses_1000_to_1_is_refused_unread(
    service: Service, alice: httpx.Client, alice_model: dict[str, Any]
) -> None:
    """Under the size limit, but zeros compressed ~1000:1: refused from the headers and the
    archive's sizes, without decompressing it (the API's memory does not grow)."""
    bomb = _zeros_npz((20, 1000, 1000))  # 20 MB of pixels in ~20 KB
    assert len(bomb) < 100_000
    pid = service.api.pid
    peak, resident = _vm_kib(pid, "VmHWM"), _vm_kib(pid, "VmRSS")
    resp = alice.post("/v1/datasets", files={"file": ("bomb.npz", bomb)})
    assert resp.status_code in (413, 422), resp.text
    assert "would decompress from" in resp.json()["detail"], resp.text
    assert "to 20000000 bytes, more than 200:1" in resp.json()["detail"]
    resp = alice.post(f"/v1/models/{alice_model['id']}/predict", files={"file": ("b.npz", bomb)})
    assert resp.status_code in (413, 422), resp.text
    assert "would decompress from" in resp.json()["detail"], resp.text
    assert _vm_kib(pid, "VmHWM") - peak < 8 * 1024
    assert _vm_kib(pid, "VmRSS") - resident < 8 * 1024


def test_many_member_npz_is_422(alice: httpx.Client) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for i in range(5000):
            archive.writestr(f"a{i}.npy", b"")
    resp = alice.post("/v1/datasets", files={"file": ("members.npz", buf.getvalue())})
    assert resp.status_code == 422, resp.text
    assert "at most 64" in resp.json()["detail"]


def test_a_streamed_upload_over_the_limit_is_413_and_never_lands(
    service: Service, alice: httpx.Client
) -> None:
    boundary = "deepscope-test-boundary"
    sent = {"bytes": 0}

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n'
            f"{json.dumps(manifest_for())}\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="big.safetensors"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        chunk = os.urandom(256 * 1024)
        for _ in range(4 * service.max_upload // len(chunk)):  # no Content-Length: chunked
            sent["bytes"] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    before = peak_rss_mib(service.api.pid)
    models_before = len(alice.get("/v1/models").json()["models"])
    try:
        resp = alice.post(
            "/v1/models",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    except httpx.TransportError:
        resp = None  # the server may close the connection once it has answered
    if resp is not None:
        assert resp.status_code == 413, resp.text
        assert str(service.max_upload) in resp.json()["detail"]
    assert peak_rss_mib(service.api.pid) - before < 64
    assert not list((service.data_dir / "tmp").glob("upload-*"))
    assert len(alice.get("/v1/models").json()["models"]) == models_before


def test_models_per_tenant_is_exact_under_concurrent_uploads(
    service: Service, weights: Path
) -> None:
    """Carol fills her quota with 24 uploads at once: exactly the limit (20) get in."""
    limit = int(service.env["DEEPSCOPE_MAX_MODELS_PER_TENANT"])
    data = weights.read_bytes()
    with service.client(service.key_c) as carol:
        have = len(carol.get("/v1/models").json()["models"])

        def one(i: int) -> httpx.Response:
            with service.client(service.key_c) as http:
                return upload_model(http, data, manifest_for(name=f"carol-{i}"))

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, range(limit + 4 - have)))
        codes = sorted(r.status_code for r in answers)
        assert codes.count(202) == limit - have, codes
        assert codes.count(409) == 4, codes
        refused = next(r for r in answers if r.status_code == 409)
        assert f"model limit reached ({limit} per tenant" in refused.json()["detail"]
        models = carol.get("/v1/models").json()["models"]
        assert len(models) == limit
        # One deleted, one more fits.
        assert carol.delete(f"/v1/models/{models[0]['id']}").status_code == 204
        assert upload_model(carol, data, manifest_for(name="carol-again")).status_code == 202
        assert upload_model(carol, data, manifest_for(name="carol-over")).status_code == 409


def test_datasets_per_tenant_is_exact_under_concurrent_uploads(service: Service) -> None:
    """Carol uploads 4 datasets more than her quota, all at once and all different: exactly
    the quota gets in, and the refused ones leave no file in storage."""
    limit = int(service.env.get("DEEPSCOPE_MAX_DATASETS_PER_TENANT", "100"))
    blobs = service.data_dir / "storage" / "blobs"
    with service.client(service.key_c) as carol:
        listing = {"limit": 1000}  # one page
        datasets = carol.get("/v1/datasets", params=listing).json()["datasets"]
        have = sum(1 for d in datasets if not d["builtin"])
        uploads = []
        for i in range(limit + 4 - have):
            images = np.random.default_rng(i).integers(0, 256, (2, 4, 4), dtype=np.uint8)
            uploads.append(_npz(images=images, labels=np.array([0, 1])))

        def one(data: bytes) -> httpx.Response:
            with service.client(service.key_c) as http:
                return http.post("/v1/datasets", files={"file": ("d.npz", data)})

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, uploads))
        codes = sorted(r.status_code for r in answers)
        assert codes.count(201) == limit - have and codes.count(409) == 4, codes
        refused = next(r for r in answers if r.status_code == 409)
        assert f"dataset limit reached ({limit} per tenant" in refused.json()["detail"]
        datasets = carol.get("/v1/datasets", params=listing).json()["datasets"]
        own = [d for d in datasets if not d["builtin"]]
        assert len(own) == limit
        for data, answer in zip(uploads, answers, strict=True):
            sha = hashlib.sha256(data).hexdigest()
            stored = (blobs / sha[:2] / sha).exists()
            assert stored == (answer.status_code == 201), (answer.status_code, sha)
        # One deleted, one more fits.
        assert carol.delete(f"/v1/datasets/{own[0]['id']}").status_code == 204
        assert one(uploads[0]).status_code == 201
        assert one(uploads[0]).status_code == 409


# --- Redis --------------------------------------------------------------------------------


def test_rq_payloads_are_ids_and_json(
    service: Service, alice_job: dict[str, Any], alice_model: dict[str, Any]
) -> None:
    redis: Redis = service.redis
    seen = 0
    for key in redis.scan_iter("rq:job:*"):
        if redis.type(key) != b"hash":
            continue
        fields = redis.hgetall(key)
        if b"data" not in fields:
            continue
        raw = zlib.decompress(fields[b"data"])
        assert not raw.startswith(b"\x80"), key  # not a pickle
        func, instance, args, kwargs = json.loads(raw)
        assert func.startswith("deepscope.workers."), func
        assert instance is None and kwargs == {}
        for arg in args:
            assert isinstance(arg, str | int | float | bool) or arg is None, (key, args)
        if func.rsplit(".", 1)[-1] in ("run_job", "predict", "validate_model"):
            assert len(args) == 1 and len(args[0]) == 32 and int(args[0], 16) >= 0, args
        if fields.get(b"meta"):
            assert isinstance(json.loads(fields[b"meta"]), dict), key
        seen += 1
    assert seen >= 2
    for key in redis.scan_iter("rq:results:*"):
        for _, entry in redis.xrange(key):
            if entry.get(b"return_value"):
                json.loads(base64.b64decode(entry[b"return_value"]))


def test_the_embedded_redis_needs_a_password_and_listens_on_loopback(tmp_path: Path) -> None:
    """``deepscope up``'s own Redis: nothing on the network can talk to it."""
    from redis.exceptions import AuthenticationError, ResponseError

    from deepscope.service.stack import Stack, StackOptions
    from deepscope.settings import Settings

    stack = Stack(Settings(data_dir=tmp_path), StackOptions(), echo=lambda _: None)
    try:
        url = stack._start_redis()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        anonymous = Redis(host="127.0.0.1", port=port, socket_connect_timeout=2)
        with pytest.raises((AuthenticationError, ResponseError)):
            anonymous.get("anything")
        anonymous.close()
        owner = Redis.from_url(url)
        bind = owner.config_get("bind")["bind"]
        assert bind.split() == ["127.0.0.1"], bind
        assert owner.config_get("appendonly")["appendonly"] == "yes"
        owner.close()
    finally:
        stack.shutdown()


# --- last: nothing logged or stored ---------------------------------------------------------


def test_keys_are_never_logged_nor_stored(service: Service, alice_job: dict[str, Any]) -> None:
    """After everything above (and the rest of the session so far), with the API's access log
    on: no key in any process's output, in any Redis value, or in the data directory."""
    near_miss = service.key_a + "-wrong"
    with service.client(near_miss) as http:
        assert http.get("/v1/models").status_code == 401
    with service.client(None) as anon:
        login = anon.post("/v1/ui/login", data={"key": service.key_b}, follow_redirects=False)
        assert login.status_code in (200, 303)
    keys = [service.key_a, service.key_b, service.key_c, near_miss]
    logs = service.log_text()
    assert "GET /v1/" in logs  # the access log is on: requests are logged, keys are not
    for key in keys:
        assert key not in logs
    redis: Redis = service.redis
    for key in redis.scan_iter("*"):
        kind = redis.type(key).decode()
        if kind == "string":
            values = [redis.get(key) or b""]
        elif kind == "hash":
            values = [*redis.hgetall(key).keys(), *redis.hgetall(key).values()]
        elif kind == "list":
            values = list(redis.lrange(key, 0, -1))
        elif kind == "set":
            values = list(redis.smembers(key))
        elif kind == "zset":
            values = list(redis.zrange(key, 0, -1))
        elif kind == "stream":
            values = [v for _, e in redis.xrange(key) for v in (*e.keys(), *e.values())]
        else:
            values = []
        blob = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in values)
        for secret in keys:
            assert secret.encode() not in blob, (key, secret)
            assert secret.encode() not in key
    for path in service.data_dir.rglob("*"):
        if path.is_file() and "logs" not in path.parts and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            for secret in keys:
                assert secret.encode() not in data, path
