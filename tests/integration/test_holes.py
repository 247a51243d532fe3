"""Holes an operator found by probing the API, each closed and held here against the real stack
(conftest's ``service``, or a stack of this module's own where a test needs other limits, one
forking worker, or to restart the API):

* a manifest nested thousands of levels deep is 422, not a RecursionError (500);
* a lone surrogate (``"\\ud800"``) in a manifest, a job's params or an uploaded dataset's
  class names is 422 naming the field, not a failure to encode it later (500);
* no stored file outlives a failed registration (concurrent uploads over the quota leave no
  blob), and the API sweeps what a process that died mid-upload left behind;
* a job's memory limit is the machine's memory shared among the workers of the machine;
* errors (job errors, HTTP details) show no object reprs and no server paths;
* a running job's message says what it is doing (``optimizing: step k/N``) within seconds.

The dataset quota, the decompression ratio of ``.npz`` uploads and the bounds of every numeric
param are limits: they are held in test_hardening.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import time
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
from conftest import launch_stack
from redis import Redis
from stack_helpers import (
    FINAL,
    fcnn_weights,
    job_processes,
    manifest_for,
    upload_model,
    wait_job,
    wait_model,
)

from deepscope.contract.errors import user_message
from deepscope.settings import Settings, machine_memory_bytes

pytestmark = [pytest.mark.integration]

Service = Any
#: The models quota of this module's own stack (small: a race over it is cheap).
_MODEL_LIMIT = 5
#: The workers this module's stack claims share its machine.
_WORKERS_PER_MACHINE = 4
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fcnn_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def ready_model(alice: httpx.Client, weights: Path) -> dict[str, Any]:
    resp = upload_model(alice, weights.read_bytes(), manifest_for(name="holes-fcnn1"))
    assert resp.status_code == 202, resp.text
    model = wait_model(alice, resp.json()["id"])
    assert model["status"] == "ready", model
    return model


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One forking worker (jobs in a limited process of their own), a small model quota."""
    env = {
        "DEEPSCOPE_MAX_MODELS_PER_TENANT": str(_MODEL_LIMIT),
        "DEEPSCOPE_WORKERS_PER_MACHINE": str(_WORKERS_PER_MACHINE),
        "DEEPSCOPE_JOB_MEMORY_MB": "",
    }
    with launch_stack(tmp_path_factory.mktemp("holes"), env=env, workers=("fork",)) as svc:
        yield svc


def _post_json(client: httpx.Client, path: str, text: str) -> httpx.Response:
    """A body sent as it is written (json.dumps would neither keep NaN nor a lone surrogate
    escape as the test means them)."""
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _blob_files(svc: Service) -> dict[str, float]:
    """{sha256: mtime} of the blobs in the stack's storage."""
    root = svc.data_dir / "storage" / "blobs"
    return {p.name: p.stat().st_mtime for p in root.glob("*/*") if not p.name.startswith(".")}


def _referenced(redis: Redis, sha: str) -> bool:
    return bool(redis.scard(f"ds:blobrefs:{sha}"))


def _api_log_size(svc: Service) -> int:
    return int((svc.logs / "api.log").stat().st_size)


def _api_log_since(svc: Service, offset: int) -> str:
    with (svc.logs / "api.log").open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# --- 1. deep JSON -------------------------------------------------------------------------


def test_a_deeply_nested_manifest_is_422(
    service: Service, alice: httpx.Client, weights: Path
) -> None:
    data = weights.read_bytes()
    log_at = _api_log_size(service)
    for depth in (100_000, 1_000, 40):
        text = '{"arch": "fcnn1", "arch_kwargs": {"a": ' + "[" * depth + "]" * depth + "}}"
        resp = alice.post(
            "/v1/models", files={"file": ("m.safetensors", data)}, data={"manifest": text}
        )
        assert resp.status_code == 422, (depth, resp.status_code, resp.text[:300])
        assert "manifest nests arrays or objects deeper than 32 levels" in resp.json()["detail"]
    # Brackets inside strings are text, not nesting; a plain manifest still goes through.
    text = json.dumps({**manifest_for(), "name": "[" * 5000})
    resp = alice.post(
        "/v1/models", files={"file": ("m.safetensors", data)}, data={"manifest": text}
    )
    assert resp.status_code == 202, resp.text
    assert alice.delete(f"/v1/models/{resp.json()['id']}").status_code == 204
    assert alice.get("/healthz").status_code == 200
    assert "RecursionError" not in _api_log_since(service, log_at)


# --- 2. lone surrogates -------------------------------------------------------------------


def test_a_lone_surrogate_is_422_naming_the_field(
    service: Service, alice: httpx.Client, weights: Path, ready_model: dict[str, Any]
) -> None:
    blobs_before = _blob_files(service)
    log_at = _api_log_size(service)
    bad = "\\ud800"  # as the JSON escape: Python decodes it into a str UTF-8 cannot encode
    manifest = '{"arch": "fcnn1", "input_shape": [1, 28, 28], "name": "x' + bad + '"}'
    resp = alice.post(
        "/v1/models",
        files={"file": ("m.safetensors", weights.read_bytes())},
        data={"manifest": manifest},
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"].startswith("manifest.name is not valid Unicode text")
    kwargs = '{"arch": "fcnn1", "arch_kwargs": {"k' + bad + '": 1}}'
    resp = alice.post(
        "/v1/models",
        files={"file": ("m.safetensors", weights.read_bytes())},
        data={"manifest": kwargs},
    )
    assert resp.status_code == 422 and "manifest.arch_kwargs" in resp.json()["detail"]

    model_id = ready_model["id"]
    for params, field in (
        ('{"layers": ["fc1", "' + bad + '"]}', "layers[1]"),
        ('{"view": "' + bad + '"}', "view"),
    ):
        body = f'{{"model_id": "{model_id}", "analysis": "signal_space", "params": {params}}}'
        resp = _post_json(alice, "/v1/jobs", body)
        assert resp.status_code == 422, (params, resp.text)
        assert f"{field} is not valid Unicode text" in resp.json()["detail"], resp.text
    # Elsewhere in a job's body: never a 500 (the detail escapes what it repeats).
    for body in (
        f'{{"model_id": "{bad}", "analysis": "signal_space"}}',
        f'{{"model_id": "{model_id}", "analysis": "{bad}"}}',
        f'{{"model_id": "{model_id}", "analysis": "residuals", "dataset": "{bad}"}}',
    ):
        resp = _post_json(alice, "/v1/jobs", body)
        assert resp.status_code in (404, 422), (body, resp.status_code, resp.text)
        resp.json()

    names = np.array(["zero", "one\ud800"])
    data = _npz(images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1]), class_names=names)
    resp = alice.post("/v1/datasets", files={"file": ("names.npz", data)})
    assert resp.status_code == 422, resp.text
    assert "class_names[1] is not valid Unicode text" in resp.json()["detail"]

    assert _blob_files(service).keys() == blobs_before.keys()  # nothing stored
    logged = _api_log_since(service, log_at)
    assert " 500 " not in logged and "Traceback" not in logged, logged[-3000:]


# --- 3. no file outlives a failed registration --------------------------------------------


def test_uploads_over_the_quota_leave_no_file(
    own_stack: Service, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Twice the quota of different models at once: the refused ones' files are gone."""
    directory = tmp_path_factory.mktemp("distinct")
    files = [fcnn_weights(directory, seed=i).read_bytes() for i in range(3 * _MODEL_LIMIT)]

    def one(data: bytes) -> httpx.Response:
        with own_stack.client(own_stack.key_c) as http:
            return upload_model(http, data, manifest_for())

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, files))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(202) == _MODEL_LIMIT and codes.count(409) == len(files) - _MODEL_LIMIT
    kept = {r.json()["sha256"] for r in answers if r.status_code == 202}
    blobs = _blob_files(own_stack)
    assert set(blobs) == kept, f"orphans: {set(blobs) - kept}"
    assert all(_referenced(own_stack.redis, sha) for sha in blobs)
    assert not list((own_stack.data_dir / "tmp").glob("upload-*"))
    # Deleting a model whose file another model shares keeps the file.
    same = fcnn_weights(directory, seed=1000).read_bytes()
    with own_stack.client(own_stack.key_c) as carol:
        for model in carol.get("/v1/models").json()["models"][:2]:
            assert carol.delete(f"/v1/models/{model['id']}").status_code == 204
        # Two manifests (an identical one would answer the first model: deduplicated).
        twin = [upload_model(carol, same, manifest_for(name=f"twin-{i}")) for i in range(2)]
        assert [r.status_code for r in twin] == [202, 202]
        assert carol.delete(f"/v1/models/{twin[0].json()['id']}").status_code == 204
        assert twin[1].json()["sha256"] in _blob_files(own_stack)
        assert carol.delete(f"/v1/models/{twin[1].json()['id']}").status_code == 204
        assert twin[1].json()["sha256"] not in _blob_files(own_stack)


def test_the_api_sweeps_what_uploads_left_behind(own_stack: Service, weights: Path) -> None:
    """A process that died mid-upload leaves a temporary file, or a blob it never registered;
    the API deletes them when it starts, once they are an hour old, and nothing else."""
    with own_stack.client(own_stack.key_a) as alice:
        resp = upload_model(alice, weights.read_bytes(), manifest_for())
        assert resp.status_code == 202, resp.text
    used = resp.json()["sha256"]
    storage = own_stack.data_dir / "storage" / "blobs"
    tmp = own_stack.data_dir / "tmp"
    old = time.time() - 2 * 3600
    planted = {
        "orphan": storage / "ab" / ("ab" + "1" * 62),
        "fresh orphan": storage / "cd" / ("cd" + "2" * 62),
        "stale write": storage / "ef" / ".tmp-abc123",
        "upload": tmp / "upload-dead1234",
        "fresh upload": tmp / "upload-live5678",
        # The files of a job run killed before it published them (local storage).
        "dead run": own_stack.data_dir / "storage" / "artifacts" / "alice" / f".{'9' * 32}.run-1",
        "live run": own_stack.data_dir / "storage" / "artifacts" / "alice" / f".{'8' * 32}.run-2",
    }
    for name, path in planted.items():
        if name.endswith(" run"):
            (path / "pictures").mkdir(parents=True)
            (path / "pictures" / "spectra.png").write_bytes(b"half a picture")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"left behind")
    for name in ("orphan", "stale write", "upload", "dead run"):
        os.utime(planted[name], (old, old))
    # A pending reference of an upload that never finished does not keep a blob forever.
    stale_pin = f"pending:{int(old)}:{'0' * 32}"
    own_stack.redis.sadd(f"ds:blobrefs:{'ab' + '1' * 62}", stale_pin)
    used_path = storage / used[:2] / used
    os.utime(used_path, (old, old))  # old, and referenced by the model

    own_stack.stop_api()
    own_stack.start_api()
    own_stack.wait_ready(cpu_workers=1)
    deadline = time.monotonic() + 30
    gone = {"orphan", "stale write", "upload", "dead run"}
    while any(planted[name].exists() for name in gone):
        assert time.monotonic() < deadline, {n: planted[n].exists() for n in planted}
        time.sleep(0.2)
    assert planted["fresh orphan"].exists() and planted["fresh upload"].exists()
    assert planted["live run"].exists()
    assert used_path.exists()
    assert "swept 2 temporary file(s) and 2 orphaned blob(s)" in own_stack.log_text()
    with own_stack.client(own_stack.key_a) as alice:
        assert wait_model(alice, resp.json()["id"])["status"] == "ready"
    for name in ("fresh orphan", "fresh upload"):
        planted[name].unlink()
    shutil.rmtree(planted["live run"])


# --- 7. a job's memory: the machine's share of one worker ---------------------------------


def test_the_default_job_memory_fits_the_machine_with_every_worker_busy() -> None:
    total = machine_memory_bytes()
    assert total is not None
    for workers in (1, 2, 4, 16):
        settings = Settings(workers_per_machine=workers, job_memory_mb=None)
        allowance = settings.job_memory_bytes()
        assert allowance >= 1024 * 1024 * 1024  # the floor
        if total * 0.8 / workers >= 1024**3:
            assert workers * allowance <= 0.8 * total
    assert Settings(job_memory_mb=0).job_memory_bytes() == 0
    assert Settings(job_memory_mb=300).job_memory_bytes() == 300 * 1024 * 1024
    description = Settings.model_fields["job_memory_mb"].description or ""
    assert "DEEPSCOPE_WORKERS_PER_MACHINE" in description


# --- 8. no reprs, no server paths ---------------------------------------------------------


def _png_with_color_type(kind: int) -> bytes:
    """A 28×28 PNG whose IHDR names colour type ``kind`` (7 does not exist)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 28, 28, 8, kind, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (29 * 28))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _truncated_images_npz() -> bytes:
    """A dataset whose ``images`` header promises 20 images and whose data holds 100 bytes:
    the API checks headers and labels, the worker finds the data short."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (20, 28, 28)}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(100))
        with archive.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(20) % 10)
    return buf.getvalue()


def _assert_public(text: str, service: Service) -> None:
    assert not _REPR.search(text), text
    for private in ("/tmp/", str(service.data_dir), "deepscope-", os.getcwd()):
        assert private not in text, (private, text)


def test_errors_show_no_reprs_and_no_server_paths(
    service: Service, alice: httpx.Client, ready_model: dict[str, Any]
) -> None:
    # A state_dict whose key is a function: the loader lists it by its repr.
    buf = io.BytesIO()
    torch.save({torch._utils._rebuild_tensor_v2: "x", "fc1.bias": torch.zeros(10)}, buf)
    resp = upload_model(alice, buf.getvalue(), manifest_for(fmt="state_dict"), "m.pt")
    assert resp.status_code == 202, resp.text
    model = wait_model(alice, resp.json()["id"])
    assert model["status"] == "invalid", model
    assert "entries _rebuild_tensor_v2 are not tensors" in model["error"], model["error"]
    _assert_public(model["error"], service)
    assert alice.delete(f"/v1/models/{model['id']}").status_code == 204

    # A PNG Pillow cannot identify: its error names the BytesIO it read from.
    url = f"/v1/models/{ready_model['id']}/predict"
    resp = alice.post(url, files=[("files", ("odd.png", _png_with_color_type(7)))])
    assert resp.status_code == 422, resp.text
    assert "odd.png: not a readable PNG (cannot identify image file)" in resp.json()["detail"]
    _assert_public(resp.json()["detail"], service)

    # A dataset the worker cannot read: its error names the file it read, in storage.
    resp = alice.post("/v1/datasets", files={"file": ("short.npz", _truncated_images_npz())})
    assert resp.status_code == 201, resp.text
    dataset = resp.json()["id"]
    resp = alice.post(
        "/v1/jobs",
        json={"model_id": ready_model["id"], "analysis": "residuals", "dataset": dataset},
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(alice, resp.json()["id"])
    assert job["status"] == "failed", job
    message = job["error"]["message"]
    assert ": cannot read 'images'" in message and "/" not in message, message
    _assert_public(message, service)
    assert alice.delete(f"/v1/datasets/{dataset}").status_code == 204

    # The one formatter of user errors: paths under the data and temporary directories become
    # their base names (the command line keeps them: they are its user's own files).
    missing = FileNotFoundError(2, "No such file", str(service.data_dir / "storage" / "x.npz"))
    assert user_message(missing) == "no such file: x.npz"
    assert user_message(missing, local=True).endswith(str(service.data_dir / "storage/x.npz"))
    assert user_message(ValueError(f"{io.BytesIO()} is bad")) == "is bad"


# --- 9. progress says what a job does -----------------------------------------------------


@pytest.fixture(scope="module")
def slow_model(own_stack: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The top-down net on 224×224 inputs: a fraction of a second per optimization step of
    four targets on one core, so that the first steps are seen while they run (and 50 of
    them, the first report before, take many seconds)."""
    weights = fcnn_weights(tmp_path_factory.mktemp("topdown"), arch="topdown")
    manifest = {"arch": "topdown", "format": "safetensors", "input_shape": [1, 224, 224]}
    with own_stack.client(own_stack.key_b) as bob:
        resp = upload_model(bob, weights.read_bytes(), manifest)
        assert resp.status_code == 202, resp.text
        model = wait_model(bob, resp.json()["id"])
    assert model["status"] == "ready", model
    return model


def _cancel(client: httpx.Client, job_id: str) -> None:
    client.delete(f"/v1/jobs/{job_id}")
    assert wait_job(client, job_id)["status"] in FINAL


def test_a_running_optimization_says_what_it_does_within_seconds(
    own_stack: Service, slow_model: dict[str, Any]
) -> None:
    with own_stack.client(own_stack.key_b) as bob:
        resp = bob.post(
            "/v1/jobs",
            json={
                "model_id": slow_model["id"],
                "analysis": "activation_maximization",
                "params": {"steps": 5000, "targets": [0, 1, 2, 3]},
            },
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        try:
            seen: list[tuple[float, str, str | None]] = []
            started: float | None = None
            deadline = time.monotonic() + 120
            while True:
                body = bob.get(f"/v1/jobs/{job_id}").json()
                now = time.monotonic()
                seen.append((now, body["status"], body["message"]))
                assert body["status"] in ("queued", "running"), seen[-5:]
                if body["status"] == "running" and started is None:
                    started = now
                if started is not None and (body["message"] or "").startswith("optimizing"):
                    break
                assert now < deadline, seen[-5:]
                assert started is None or now - started < 3.0, (
                    f"still {body['message']!r} {now - started:.1f} s after the job started"
                )
                time.sleep(0.05)
            assert re.fullmatch(r"optimizing: step \d+/5000(, objective .+)?", body["message"])
            # And it goes on saying how far it is, although each step is slow.
            time.sleep(2.5)
            later = bob.get(f"/v1/jobs/{job_id}").json()
            step = re.match(r"optimizing: step (\d+)/5000", later["message"] or "")
            assert later["status"] == "running" and step is not None and int(step.group(1)) > 0
            assert later["progress"] > 0
        finally:
            _cancel(bob, job_id)


def test_a_jobs_memory_limit_is_its_workers_share_of_the_machine(
    own_stack: Service, slow_model: dict[str, Any]
) -> None:
    """The forking worker's job process is limited to the machine's memory shared among the
    machine's workers (DEEPSCOPE_WORKERS_PER_MACHINE=4 here), not 80% of it."""
    total = machine_memory_bytes()
    assert total is not None
    allowance = max(int(total * 0.8) // _WORKERS_PER_MACHINE, 1024**3)
    assert Settings(workers_per_machine=_WORKERS_PER_MACHINE).job_memory_bytes() == allowance
    worker = own_stack.workers[0].pid
    with own_stack.client(own_stack.key_b) as bob:
        resp = bob.post(
            "/v1/jobs",
            json={
                "model_id": slow_model["id"],
                "analysis": "activation_maximization",
                "params": {"steps": 5000, "targets": [0], "seed": 1},
            },
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        try:
            deadline = time.monotonic() + 60
            while True:
                running = bob.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
                horses = job_processes(worker) if running else []
                if horses:
                    break
                assert time.monotonic() < deadline, "the job's process never showed"
                time.sleep(0.1)
            limits = Path(f"/proc/{horses[0]}/limits").read_text()
            status = Path(f"/proc/{horses[0]}/status").read_text()
        finally:
            _cancel(bob, job_id)
    soft = next(line for line in limits.splitlines() if line.startswith("Max address space"))
    limit = int(soft.split()[3])
    mapped = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
    # The limit is what the process mapped when it forked plus the allowance; it has mapped at
    # least that much since.
    assert limit - mapped <= allowance + 256 * 1024 * 1024, (limit, mapped, allowance)
    assert limit - mapped > allowance // 2, (limit, mapped, allowance)
