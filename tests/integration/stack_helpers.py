"""Helpers of the hardening and reliability tests: models to upload, polling, process and
memory probes. Plain functions (the stacks themselves come from conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file

from deepscope.models.registry import get_model

__all__ = [
    "FINAL",
    "alive",
    "children",
    "fcnn_weights",
    "job_processes",
    "manifest_for",
    "peak_rss_mib",
    "stack_roles",
    "start_up",
    "torchscript_bytes",
    "upload_model",
    "wait_job",
    "wait_model",
    "wait_until",
]

FINAL = {"succeeded", "failed", "canceled"}


def fcnn_weights(directory: Path, arch: str = "fcnn1", seed: int = 0) -> Path:
    """Randomly initialized weights of a registry architecture, as safetensors (seeded)."""
    path = directory / f"{arch}-{seed}.safetensors"
    if not path.exists():
        torch.manual_seed(seed)
        model = get_model(arch, num_classes=10)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def manifest_for(arch: str = "fcnn1", fmt: str = "safetensors", **extra: Any) -> dict[str, Any]:
    return {"arch": arch, "format": fmt, "input_shape": [1, 28, 28], **extra}


def upload_model(
    client: httpx.Client,
    data: bytes,
    manifest: dict[str, Any],
    filename: str = "model.bin",
) -> httpx.Response:
    return client.post(
        "/v1/models",
        files={"file": (filename, data, "application/octet-stream")},
        data={"manifest": json.dumps(manifest)},
    )


def wait_until(
    client: httpx.Client, path: str, done: set[str], timeout: float = 120.0, poll: float = 0.1
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(path)
        assert resp.status_code < 500, resp.text
        body: dict[str, Any] = resp.json()
        if body["status"] in done:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} still {body['status']} after {timeout} s: {body}")
        time.sleep(poll)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    return wait_until(client, f"/v1/jobs/{job_id}", FINAL, timeout)


def wait_model(client: httpx.Client, model_id: str, timeout: float = 120.0) -> dict[str, Any]:
    return wait_until(client, f"/v1/models/{model_id}", {"ready", "invalid"}, timeout)


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    """``torch.jit.script(module)`` saved to bytes."""
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, and still what users upload
        torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def job_processes(worker: int) -> list[int]:
    """A worker's job processes: its children but its helper."""
    from deepscope.workers.helper import PROCESS_NAME

    def name(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""

    return [pid for pid in children(worker) if name(pid) != PROCESS_NAME]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Running (not exited, not a zombie)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def start_up(
    data_dir: Path, port: int, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """``deepscope up --port PORT ARGS`` on ``data_dir`` (embedded Redis, the dev key), until
    it prints its banner. → (the process, the banner); its later output stays in the pipe."""
    full = {**os.environ, "DEEPSCOPE_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    for name in ("DEEPSCOPE_REDIS_URL", "DEEPSCOPE_API_KEYS", "DEEPSCOPE_STORAGE_URL"):
        full.pop(name, None)
    full.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepscope", "up", "--port", str(port), *args],
        env=full,
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


def stack_roles(pid: int) -> dict[str, list[int]]:
    """The live children of ``deepscope up`` (pid) by role: ``redis``, ``worker``, ``api``."""
    roles: dict[str, list[int]] = {"redis": [], "worker": [], "api": []}
    for child in children(pid):
        try:
            args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not alive(child):
            continue
        if any(b"redis-server" in a for a in args):
            roles["redis"].append(child)
        elif b"worker" in args:
            roles["worker"].append(child)
        elif b"api" in args:
            roles["api"].append(child)
    return roles


def chromium() -> str | None:
    """A headless-capable Chromium on PATH, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
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
                # The page's console (errors, CSP violations) on stderr.
                "--enable-logging=stderr",
                "--v=0",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
