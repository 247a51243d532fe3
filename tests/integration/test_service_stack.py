"""``deepscope up`` as a user runs it: embedded Redis, a worker, the API, the demo models;
Ctrl-C stops every child and the data survives a restart. It supervises: a killed worker is
started again and serves, and a SIGKILL of ``up`` itself leaves no child behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from stack_helpers import (
    alive,
    children,
    fcnn_weights,
    manifest_for,
    stack_roles,
    start_up,
    upload_model,
    wait_job,
    wait_model,
)

from deepscope.service.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen[str]) -> float:
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    return time.monotonic() - start


def test_up_serves_demo_results_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc, banner = start_up(tmp_path, port, "--workers", "1", "--gpu-workers", "0")
    try:
        assert f"http://127.0.0.1:{port}" in banner
        key = re.search(r"API key:\s+(\S+)", banner)
        assert key is not None, banner
        assert key.group(1) == (tmp_path / "dev-api-key").read_text().strip()
        assert str(tmp_path) in banner
        kids = children(proc.pid)
        assert len(kids) == 3  # redis-server, one worker, the API
        # The worker knows it has the machine to itself: its jobs' memory is that share.
        environs = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in kids]
        assert sum(b"DEEPSCOPE_WORKERS_PER_MACHINE=1" in env for env in environs) == 2
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
    proc, banner = start_up(tmp_path, port, "--workers", "1")
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


def _wait_ready_workers(client: httpx.Client, count: int, timeout: float = 120.0) -> float:
    """Until /readyz counts ``count`` live cpu workers. → seconds waited."""
    start = time.monotonic()
    while True:
        try:
            ready = client.get("/readyz")
            if ready.status_code == 200 and ready.json()["workers"]["cpu"] == count:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        assert time.monotonic() - start < timeout, f"readyz never counted {count} workers"
        time.sleep(0.1)


def test_up_restarts_a_killed_worker_and_its_children_die_with_it(tmp_path: Path) -> None:
    port = free_port()
    proc, banner = start_up(tmp_path, port, "--workers", "2", "--gpu-workers", "0", "--no-demo")
    key = re.search(r"API key:\s+(\S+)", banner)
    assert key is not None, banner
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key.group(1)}"},
            timeout=30,
        ) as client:
            _wait_ready_workers(client, 2)
            before = stack_roles(proc.pid)
            assert len(before["worker"]) == 2 and before["redis"] and before["api"], before
            victim = before["worker"][0]
            os.kill(victim, signal.SIGKILL)  # what the OOM killer does
            # The dead worker stops counting at once (its heartbeat is dropped by `up`).
            gone = _wait_ready_workers(client, 1, timeout=20)
            back = _wait_ready_workers(client, 2)
            print(f"[stack] killed worker: readyz 1 after {gone:.1f} s, 2 again {back:.1f} s later")
            assert proc.poll() is None, "deepscope up exited when a worker died"
            after = stack_roles(proc.pid)
            assert victim not in after["worker"] and len(after["worker"]) == 2, after
            assert after["api"] == before["api"] and after["redis"] == before["redis"]
            # The restarted stack serves: a model is validated and a job succeeds.
            resp = upload_model(client, fcnn_weights(tmp_path).read_bytes(), manifest_for())
            assert resp.status_code == 202, resp.text
            assert wait_model(client, resp.json()["id"])["status"] == "ready"
            job = client.post(
                "/v1/jobs",
                json={"model_id": resp.json()["id"], "analysis": "signal_space"},
            )
            assert job.status_code == 202, job.text
            assert wait_job(client, job.json()["id"])["status"] == "succeeded"
        # SIGKILL of `up` itself: the kernel takes every child down with it.
        kids = [pid for pids in stack_roles(proc.pid).values() for pid in pids]
        assert len(kids) == 4, kids
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=10)
        while any(alive(pid) for pid in kids):
            assert time.monotonic() - killed < 5, [p for p in kids if alive(p)]
            time.sleep(0.02)
        print(f"[stack] up SIGKILLed: every child gone in {time.monotonic() - killed:.2f} s")
        assert not _port_open(port)
    finally:
        if proc.poll() is None:
            _stop(proc)
    assert proc.stdout is not None
    out = proc.stdout.read()
    line = (
        rf"worker-cpu-\d \(pid {victim}\) was killed by SIGKILL after [\d.]+ s; starting it "
        r"again in 1 s \(restart 1\)"
    )
    assert re.search(line, out), out
