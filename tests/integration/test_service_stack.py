"""``deepscope up`` as a user runs it: embedded Redis, a worker, the API, the demo models;
Ctrl-C stops every child and the data survives a restart."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from stack_helpers import alive, children

from deepscope.service.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start(data_dir: Path, port: int, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "DEEPSCOPE_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    for name in ("DEEPSCOPE_REDIS_URL", "DEEPSCOPE_API_KEYS", "DEEPSCOPE_STORAGE_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepscope", "up", "--port", str(port), "--workers", "1", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return proc, "".join(lines)
    proc.kill()
    raise AssertionError("deepscope up did not start:\n" + "".join(lines))


def _stop(proc: subprocess.Popen[str]) -> float:
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    return time.monotonic() - start


def test_up_serves_demo_results_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc, banner = _start(tmp_path, port, "--gpu-workers", "0")
    try:
        assert f"http://127.0.0.1:{port}" in banner
        key = re.search(r"API key:\s+(\S+)", banner)
        assert key is not None, banner
        assert key.group(1) == (tmp_path / "dev-api-key").read_text().strip()
        assert str(tmp_path) in banner
        kids = children(proc.pid)
        assert len(kids) == 3  # redis-server, one worker, the API
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key.group(1)}"},
            timeout=30,
        ) as client:
            assert client.get("/v1/models").status_code == 200
            deadline = time.monotonic() + 120
            while True:
                jobs = client.get("/v1/jobs").json()["jobs"]
                if len(jobs) == 2 and all(j["status"] == "succeeded" for j in jobs):
                    break
                assert time.monotonic() < deadline, jobs
                time.sleep(0.5)
            models = client.get("/v1/models").json()["models"]
            assert sorted(m["arch"] for m in models) == ["fcnn1", "fcnn5"]
            assert all(m["status"] == "ready" and m["demo"] for m in models)
            assert {j["analysis"] for j in jobs} == {"signal_space", "residuals"}
    finally:
        elapsed = _stop(proc)
    assert proc.returncode == 0
    assert elapsed < 30
    assert not any(alive(pid) for pid in kids)
    assert not _port_open(port)
    assert (tmp_path / "redis" / "appendonly.aof").stat().st_size > 0
    assert not (tmp_path / "run" / "redis.url").exists()

    # A restart finds the models (Redis' AOF, the storage) and does not train them again.
    proc, banner = _start(tmp_path, port)
    try:
        assert "demo:" not in banner
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key.group(1)}"},
            timeout=30,
        ) as client:
            assert len(client.get("/v1/models").json()["models"]) == 2
            job = client.get("/v1/jobs").json()["jobs"][0]
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    finally:
        _stop(proc)
    assert proc.returncode == 0
