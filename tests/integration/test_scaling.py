"""Many machines: the API and two workers that share only Redis and an S3 object store.

Each process stands for a machine of its own: its own ``DEEPSCOPE_DATA_DIR``, working
directory and ``TMPDIR``, and nothing in common with the others but ``DEEPSCOPE_REDIS_URL``
and ``DEEPSCOPE_STORAGE_URL=s3://…`` with the standard AWS environment pointing at moto's S3
server (a real HTTP server in its own process, on loopback). A model and a dataset are uploaded
through the API, analyses and a prediction run on both workers, every artifact comes back
through the API, every object is in the bucket, and no process's disk holds a model or an
artifact.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import stop_processes
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from stack_helpers import fcnn_weights, manifest_for, upload_model, wait_job, wait_model

from deepscope.models.datasets import load_dataset
from deepscope.service.stack import free_port, redis_server_binary
from deepscope.store.storage import Storage, UploadSink

pytestmark = [pytest.mark.integration]

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

KEY = "key-scaling-0123456789"
BUCKET = "deepscope-test"
PREFIX = "shared/store"
_PYTHON = [sys.executable, "-m", "deepscope"]
_START_TIMEOUT_S = 120.0
_PNG = b"\x89PNG\r\n\x1a\n"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass
class Machine:
    """One process and the local disk it would have on a machine of its own."""

    name: str
    root: Path
    env: dict[str, str]
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None
    dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.root.parent / "logs" / f"{self.name}.log"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, cwd=self.dirs["cwd"], stdout=out, stderr=subprocess.STDOUT
            )

    def files(self) -> list[Path]:
        """Every file on this machine's disk (data dir, working directory, temporary dir)."""
        return sorted(p for d in self.dirs.values() for p in d.rglob("*") if p.is_file())


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


def _base_env() -> dict[str, str]:
    """The test's environment without any deepscope or AWS configuration of its own."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEEPSCOPE_", "AWS_")) and k != "TMPDIR"
    }


@dataclass
class Cluster:
    url: str
    endpoint: str  # moto's S3 server
    redis: Redis
    s3: Any  # a boto3 S3 client on the moto server
    api: Machine
    workers: list[Machine]

    @property
    def machines(self) -> list[Machine]:
        return [self.api, *self.workers]

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60.0
        )

    def logs(self, lines: int = 40) -> str:
        out = []
        for machine in self.machines:
            if machine.log.is_file():
                tail = machine.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"== {machine.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def objects(self) -> dict[str, int]:
        """Every object under the deployment's prefix: key relative to it → size."""
        found = {}
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=PREFIX + "/"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                found[obj["Key"].removeprefix(PREFIX + "/")] = int(obj["Size"])
        return found

    def object_bytes(self, key: str) -> bytes:
        body: bytes = self.s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read()
        return body

    def wait_ready(self, cpu_workers: int) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            while True:
                dead = [
                    m.name for m in self.machines if m.proc is None or m.proc.poll() is not None
                ]
                if dead:
                    raise AssertionError(f"{dead} exited at start-up:\n{self.logs()}")
                try:
                    ready = http.get("/readyz")
                    if ready.status_code == 200 and ready.json()["workers"]["cpu"] == cpu_workers:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"the cluster did not become ready:\n{self.logs()}")
                time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        redis_binary = redis_server_binary()
    except ValueError as exc:
        pytest.skip(str(exc))
    top = tmp_path_factory.mktemp("many-machines")
    logs = top / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    # The object store: moto's S3 server, in a process of its own.
    s3_port = free_port()
    moto_log = logs / "moto.log"
    with moto_log.open("ab") as out:
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            env={**_base_env(), **_CREDENTIALS},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    procs.append(moto)
    # Redis, the only other thing the machines share.
    redis_port = free_port()
    redis_dir = top / "redis"
    redis_dir.mkdir()
    redis_log = logs / "redis.log"
    redis_cmd = [redis_binary, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", ""]
    with redis_log.open("ab") as out:
        redis_proc = subprocess.Popen(
            [*redis_cmd, "--dir", str(redis_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    procs.append(redis_proc)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    endpoint = f"http://127.0.0.1:{s3_port}"
    redis = Redis.from_url(redis_url)
    try:
        _wait_port(s3_port, moto, "moto's S3 server", moto_log)
        _wait_port(redis_port, redis_proc, "redis-server", redis_log)
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", **_lower(_CREDENTIALS)
        )
        s3.create_bucket(Bucket=BUCKET)

        api_port = free_port()
        # The two ways the AWS environment names the endpoint and the region, one per machine.
        aws_a = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        aws_b = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "us-east-1"}
        specs = [
            ("api", aws_a, ["api", "--port", str(api_port), "--log-level", "info"]),
            ("worker-1", aws_a, ["worker", "--queues", "cpu", "--name", "machine-1"]),
            ("worker-2", aws_b, ["worker", "--queues", "cpu", "--name", "machine-2"]),
        ]
        machines = []
        for name, aws, args in specs:
            root = top / name
            dirs = {d: root / d for d in ("data", "cwd", "tmp")}
            for d in dirs.values():
                d.mkdir(parents=True)
            env = {
                **_base_env(),
                **_CREDENTIALS,
                **aws,
                # No host configuration, no instance-metadata probes.
                "AWS_CONFIG_FILE": str(root / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true",
                "TMPDIR": str(dirs["tmp"]),
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                "DEEPSCOPE_DATA_DIR": str(dirs["data"]),
                "DEEPSCOPE_REDIS_URL": redis_url,
                "DEEPSCOPE_STORAGE_URL": f"s3://{BUCKET}/{PREFIX}",
                "DEEPSCOPE_API_KEYS": f"alice={KEY}",
                "DEEPSCOPE_JOB_TIMEOUT": "300",
                "DEEPSCOPE_PREDICT_WAIT_S": "60",
            }
            machines.append(Machine(name, root, env, [*_PYTHON, *args], dirs=dirs))
        for machine in machines:
            machine.start()
            assert machine.proc is not None
            procs.append(machine.proc)
        cluster = Cluster(
            f"http://127.0.0.1:{api_port}", endpoint, redis, s3, machines[0], machines[1:]
        )
        cluster.wait_ready(cpu_workers=2)
        yield cluster
    finally:
        # API and workers first, then Redis and the store they talk to.
        stop_processes(procs[2:], timeout=20.0)
        stop_processes(procs[:2], timeout=20.0)
        redis.close()


def _lower(credentials: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in credentials.items()}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def _check_file(name: str, data: bytes) -> None:
    if name.endswith(".png"):
        assert data.startswith(_PNG), name
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    elif name.endswith(".npz"):
        assert zipfile.is_zipfile(io.BytesIO(data)), name
        with np.load(io.BytesIO(data)) as arrays:
            assert arrays.files, name
    elif name.endswith(".json"):
        json.loads(data)
    else:
        raise AssertionError(f"unexpected artifact {name}")


def test_api_and_two_workers_share_only_redis_and_s3(cluster: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    with cluster.client() as api:
        # Uploads stream through the API into the bucket; a worker validates from there.
        weights = fcnn_weights(tmp_path, "fcnn5", seed=3)
        resp = upload_model(api, weights.read_bytes(), manifest_for("fcnn5"), "fcnn5.safetensors")
        assert resp.status_code == 202, resp.text
        model = wait_model(api, resp.json()["id"])
        assert model["status"] == "ready", model
        digits = load_dataset("digits", "train")
        keep = np.arange(0, len(digits), 9)
        npz = io.BytesIO()
        np.savez_compressed(
            npz,
            images=np.round(digits.images[keep].numpy()[:, 0] * 255).astype(np.uint8),
            labels=digits.labels[keep].numpy(),
        )
        resp = api.post("/v1/datasets", files={"file": ("few-digits.npz", npz.getvalue())})
        assert resp.status_code == 201, resp.text
        dataset = resp.json()

        bodies: list[dict[str, Any]] = [
            {"analysis": "signal_space", "params": {"vectors": 4}},
            {"analysis": "signal_space", "params": {"vectors": 8}},
            {"analysis": "signal_space", "params": {"layers": ["fc1", "fc2"]}},
            {"analysis": "signal_space", "params": {"images": False}},
            {"analysis": "residuals", "params": {}, "dataset": "digits"},
            # The uploaded dataset: a blob the worker fetches from the bucket.
            {"analysis": "residuals", "params": {}, "dataset": dataset["id"]},
        ]
        submitted = []
        for body in bodies:
            resp = api.post("/v1/jobs", json={"model_id": model["id"], **body})
            assert resp.status_code == 202, resp.text
            assert resp.json()["cached"] is False
            submitted.append(resp.json()["id"])
        # A prediction: its images go to the bucket, a worker reads them from there.
        test = load_dataset("digits", "test")
        files = [
            ("files", (f"{i}.png", _png(test.images[i].numpy()[0]), "image/png")) for i in range(3)
        ]
        resp = api.post(f"/v1/models/{model['id']}/predict", files=files, params={"top_k": 2})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["predictions"]) == 3

        jobs = [wait_job(api, job_id, timeout=240) for job_id in submitted]
        for job in jobs:
            assert job["status"] == "succeeded", (job["error"], job["params"], cluster.logs())
        ran_on = {
            job["id"]: Job.fetch(
                job["id"], connection=cluster.redis, serializer=JSONSerializer
            ).worker_name
            for job in jobs
        }
        assert set(ran_on.values()) == {"machine-1", "machine-2"}, ran_on

        # Every artifact through the API, and the same bytes in the bucket.
        objects = cluster.objects()
        served = 0
        for job in jobs:
            artifacts = job["result"]["artifacts"]
            base = f"/v1/artifacts/{job['id']}/"
            names = {a["url"].split("?", 1)[0].removeprefix(base) for a in artifacts}
            assert "result.json" in names
            if job["analysis"] == "signal_space":
                assert "singular_values.npz" in names
            if job["params"].get("images", True):
                assert any(n.endswith(".png") for n in names), names
            for artifact in artifacts:
                name = artifact["url"].split("?", 1)[0].removeprefix(base)
                resp = api.get(artifact["url"])
                assert resp.status_code == 200, (artifact, resp.text)
                assert resp.headers["content-type"].startswith(artifact["media_type"])
                _check_file(name, resp.content)
                key = f"artifacts/alice/{job['id']}/{name}"
                assert objects.get(key) == len(resp.content), key
                assert cluster.object_bytes(key) == resp.content, key
                served += 1
        assert served >= 6 * 2
        # The API reads pictures from the bucket for a self-contained report too.
        report = api.get(f"/v1/jobs/{jobs[0]['id']}/report", params={"standalone": "true"})
        assert report.status_code == 200, report.text
        assert "data:image/png;base64," in report.text

        # The uploads are content-addressed blobs in the bucket, the prediction's inputs too.
        blobs = {k for k in objects if k.startswith("blobs/")}
        assert {f"blobs/{s[:2]}/{s}" for s in (model["sha256"], dataset["sha256"])} <= blobs
        assert objects[f"blobs/{model['sha256'][:2]}/{model['sha256']}"] == weights.stat().st_size
        assert any(k.startswith("inputs/alice/") for k in objects), sorted(objects)

        # Deleting a model deletes its blob from the bucket.
        other = fcnn_weights(tmp_path, "fcnn1", seed=4)
        resp = upload_model(api, other.read_bytes(), manifest_for("fcnn1"), "fcnn1.safetensors")
        assert resp.status_code == 202, resp.text
        spare = wait_model(api, resp.json()["id"])
        assert spare["status"] == "ready", spare
        spare_key = f"blobs/{spare['sha256'][:2]}/{spare['sha256']}"
        assert spare_key in cluster.objects()
        assert api.delete(f"/v1/models/{spare['id']}").status_code == 204
        assert spare_key not in cluster.objects()

    # No machine's disk holds a model, a dataset or an artifact: they live in the bucket only.
    for machine in cluster.machines:
        files = machine.files()
        kept = [
            p
            for p in files
            if _SHA256.fullmatch(p.name)
            or p.suffix in (".png", ".npz", ".safetensors", ".pt", ".pt2")
            or p.name == "result.json"
        ]
        assert kept == [], (machine.name, kept)
        assert [p for p in files if machine.dirs["data"] in p.parents] == [], machine.name
    print(f"many machines: {len(jobs)} jobs on {sorted(set(ran_on.values()))}, {served} artifacts")
    print(f"many machines: {time.monotonic() - started:.1f} s after the cluster was ready")


def test_storage_on_s3_every_operation_and_in_a_forked_process(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage calls the API and the workers make, straight on the S3 server: another
    process's writes are seen at once (no cached listing), and a forked process (a gpu worker's
    isolated job) makes its own client rather than use its parent's."""
    for name, value in {**_CREDENTIALS, "AWS_ENDPOINT_URL": cluster.endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    storage = Storage(f"s3://{BUCKET}/unit")
    assert not storage.local and storage.root == f"{BUCKET}/unit"

    data = os.urandom(3 * 1024 * 1024 + 5)
    sink = UploadSink(tmp_path / "tmp", limit=len(data))
    for start in range(0, len(data), 65536):
        sink.write(data[start : start + 65536])
    sha = storage.put_blob(sink)
    key = Storage.blob_key(sha)
    assert not sink.path.exists()
    assert storage.exists(key) and storage.size(key) == len(data)
    assert storage.local_path(key) is None
    assert b"".join(storage.iter_chunks(key, chunk=1 << 20)) == data
    assert storage.get_file(key, tmp_path / "copy").read_bytes() == data
    listed = list(storage.blobs())
    assert [(k, s) for k, s, _ in listed] == [(key, sha)]
    assert listed[0][2] is not None and abs(listed[0][2] - time.time()) < 600

    # Written by someone else after a listing: seen at once.
    other = "ab" * 32
    cluster.s3.put_object(Bucket=BUCKET, Key=f"unit/{Storage.blob_key(other)}", Body=b"x")
    assert {s for _, s, _ in storage.blobs()} == {sha, other}
    assert storage.exists(Storage.blob_key(other))

    job = "0" * 32
    storage.put_bytes(Storage.artifact_key("alice", job, "a/b.json"), b"{}")
    (tmp_path / "p.png").write_bytes(_PNG)
    storage.put_file(tmp_path / "p.png", Storage.artifact_key("alice", job, "p.png"))
    with storage.open(Storage.artifact_key("alice", job, "p.png")) as f:
        assert f.read() == _PNG

    # A forked child uses the same Storage object: it makes a client of its own.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            got = storage.get_file(key, tmp_path / "child").read_bytes()
            storage.put_bytes(Storage.artifact_key("alice", job, "child.txt"), b"child")
            code = 0 if got == data else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = f"unit/{Storage.artifact_key('alice', job, 'child.txt')}"
    assert cluster.s3.get_object(Bucket=BUCKET, Key=child)["Body"].read() == b"child"

    storage.delete(Storage.job_prefix("artifacts", "alice", job))
    storage.delete(key)
    storage.delete(Storage.blob_key(other))
    assert not storage.exists(Storage.artifact_key("alice", job, "p.png"))
    assert list(storage.blobs()) == []


def test_a_missing_filesystem_says_what_to_install() -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(ImportError, match=r"DEEPSCOPE_STORAGE_URL.*deepscope\[server,s3\]"):
        Storage("gcs://bucket/prefix")
    with pytest.raises(ImportError, match="DEEPSCOPE_STORAGE_URL"):
        Storage.preload("gcs://bucket/prefix")
