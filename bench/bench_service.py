"""The service's overhead over HTTP, against a real ``deepscope up`` started here.

Measured (medians of several repeats after a warm-up), each printed against the floor measured
in the same run, on the same Redis, with the same worker processes:

* latency submit → succeeded over HTTP, as the SDK submits and waits (``Client.submit(...,
  wait=30)``: ``POST /v1/jobs`` with ``Prefer: wait=30``, answered when the job ends; then
  ``GET /v1/jobs/{id}?wait=30`` if it had not), and also submitting then long polling with
  ``GET /v1/jobs/{id}?wait=30``, and polling every 2 ms:
  - a trivial job answered from the result cache;
  - ``signal_space`` on ``fcnn1`` with ``images: false`` (the metrics a CI gate reads; the
    computation is microseconds, so this is the service's own cost);
  - ``signal_space`` on ``fcnn1`` with its pictures (default parameters), also against the
    floor plus the job's own compute time (the ``duration_s`` the worker reports);
  floor: raw RQ, a no-op job (``builtins.len``) enqueued on the ``cpu`` queue and run by the
  stack's own (forking) worker, enqueue → finished (blocking read of RQ's result stream).
* throughput: submissions per second from 16 concurrent clients (threads, one httpx client
  each, keep-alive, loopback) to ``deepscope api --workers N``, each submission a new
  computation (distinct parameters: cache miss, record, enqueue), for a bounded count and time;
  floor: a minimal FastAPI app (bench/floor_app.py) that validates the same body and makes one
  RQ enqueue, served by uvicorn with the same N processes. The workers are paused (SIGSTOP)
  during both, so that they do not compete for the CPU with what is measured.

Targets: latency ≤ 2× the floor; throughput ≥ 0.7× the floor.

Run: ``.venv/bin/python bench/bench_service.py`` (about a minute; loopback only). ``--idle 0.5``
measures each from a stack idle for half a second instead of back to back; ``--setting
DEEPSCOPE_WORKER_HELPER=false`` (repeatable) runs the stack with another setting.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from deepscope.client import Client
from deepscope.service.stack import free_port

_POLL_S = 0.002
_CLIENTS = 16


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@contextmanager
def stack(
    workers: int, settings: dict[str, str] | None = None
) -> Iterator[tuple[str, str, Redis, dict[int, str], str, Path]]:
    """``deepscope up --no-demo`` in a temporary data directory → (url, key, redis, its
    children's command lines by pid, the Redis URL, the data directory); stopped with Ctrl-C
    (SIGINT) at the end."""
    with tempfile.TemporaryDirectory(prefix="deepscope-bench-") as data:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSCOPE_")}
        env |= {"DEEPSCOPE_DATA_DIR": data, "OMP_NUM_THREADS": "1", **(settings or {})}
        cmd = [sys.executable, "-m", "deepscope", "up", "--no-demo", "--port", str(port)]
        cmd += ["--workers", str(workers), "--gpu-workers", "0"]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        banner: list[str] = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("deepscope up exited:\n" + "".join(banner))
                banner.append(line)
                if line.startswith("Ctrl-C"):
                    break
            found = re.search(r"API key:\s+(\S+)", "".join(banner))
            assert found is not None, banner
            redis_url = (Path(data) / "run" / "redis.url").read_text().strip()
            redis = Redis.from_url(redis_url)
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url) as http:
                while http.get("/readyz").json()["workers"].get("cpu", 0) < workers:
                    time.sleep(0.1)
            children = {p: _cmdline(p) for p in _children(proc.pid)}
            yield url, found.group(1), redis, children, redis_url, Path(data)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _noop_latency(redis: Redis, repeats: int) -> list[float]:
    """Raw RQ: enqueue a no-op on the stack's cpu queue → its result (blocking stream read)."""
    queue = Queue("cpu", connection=redis, serializer=JSONSerializer)
    out = []
    for i in range(repeats):
        start = time.perf_counter()
        job = queue.enqueue_call(
            "builtins.len", args=("x",), timeout=60, result_ttl=60, failure_ttl=60,
            description=f"bench no-op {i}",
        )  # fmt: skip
        result = Job.fetch(job.id, connection=redis, serializer=JSONSerializer).latest_result(
            timeout=30
        )
        out.append(time.perf_counter() - start)
        assert result is not None and result.return_value == 1, result
    return out


def _http_latency(client: Client, submit: Callable[[], dict[str, Any]]) -> float:
    """Submit over HTTP, poll GET /v1/jobs/{id} every 2 ms until it succeeded → seconds."""
    http = client._http
    start = time.perf_counter()
    job_id = submit()["id"]
    while True:
        body = http.get(f"/v1/jobs/{job_id}").json()
        if body["status"] == "succeeded":
            return time.perf_counter() - start
        if body["status"] in ("failed", "canceled"):
            raise RuntimeError(body)
        time.sleep(_POLL_S)


def _http_wait_latency(
    client: Client, submit: Callable[..., dict[str, Any]], prefer: bool = False
) -> float:
    """Submit over HTTP (``prefer``: with ``Prefer: wait=30``, the answer held until the job
    ends), then long-poll ``GET /v1/jobs/{id}?wait=30`` until it succeeded (the API answers
    when the job's end is published) → seconds."""
    http = client._http
    start = time.perf_counter()
    body = submit(prefer)
    while body["status"] != "succeeded":
        if body["status"] in ("failed", "canceled"):
            raise RuntimeError(body)
        body = http.get(f"/v1/jobs/{body['id']}", params={"wait": 30}).json()
    return time.perf_counter() - start


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of a process and its children (uvicorn's workers); this
    process by default."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    total = 0.0
    for p in (pid, *_children(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Rate:
    """Operations per second of ``work(thread, i)`` from 16 threads (at most ``total``
    operations or ``seconds``), and the CPU each operation cost here and in ``server``."""

    def __init__(
        self, work: Callable[[int, int], Any], total: int, seconds: float, server: int
    ) -> None:
        counter = iter(range(total))
        lock = threading.Lock()
        done = [0] * _CLIENTS
        gate = threading.Barrier(_CLIENTS + 1)
        deadline = time.perf_counter() + seconds + 1.0

        def loop(t: int) -> None:
            gate.wait()
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                work(t, i)
                done[t] += 1

        threads = [threading.Thread(target=loop, args=(t,)) for t in range(_CLIENTS)]
        for th in threads:
            th.start()
        time.sleep(1.0)  # the deadline counts from here
        cpu0, server0, start = _cpu_s(), _cpu_s(server), time.perf_counter()
        gate.wait()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - start
        self.count = sum(done)
        self.per_s = self.count / elapsed
        self.client_ms = 1000 * (_cpu_s() - cpu0) / max(1, self.count)
        self.server_ms = 1000 * (_cpu_s(server) - server0) / max(1, self.count)


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        for p in (pid, *_children(pid)):
            with suppress(ProcessLookupError):
                os.kill(p, sig)


def train_fcnn1(out: Path) -> Path:
    from deepscope.models.training import Recipe, train_model

    path = out / "fcnn1.safetensors"
    train_model("fcnn1", "digits", path, epochs=2, recipe=Recipe.FAST, seed=0)
    return path


@contextmanager
def _server(cmd: list[str], env: dict[str, str], port: int) -> Iterator[int]:
    """A server process on ``port`` (until it answers), stopped at the end → its pid."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{cmd} did not start") from None
                time.sleep(0.1)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rtol(i: int) -> dict[str, Any]:
    """``residuals`` params with a distinct rtol per ``i``: a new cache key, so every
    submission is a new computation."""
    return {"rtol": 1e-5 * (1 + i * 1e-7)}


def throughput(
    *,
    redis_url: str,
    data_dir: Path,
    key: str,
    model_id: str,
    api_workers: int,
    limit: int,
    seconds: float,
) -> tuple[Rate, Rate, Rate]:
    """Submissions per second from 16 clients to ``deepscope api --workers N`` and to the floor
    app served by uvicorn with the same N, on the stack's Redis. → (floor, new, cached)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSCOPE_")}
    env |= {
        "DEEPSCOPE_DATA_DIR": str(data_dir),
        "DEEPSCOPE_REDIS_URL": redis_url,
        "OMP_NUM_THREADS": "1",
        # Every submission is admitted: this measures the path to the queue, not the waiting
        # list a tenant's backlog goes to.
        "DEEPSCOPE_TENANT_RUNNING_JOBS": str(10**9),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    api_port, floor_port = free_port(), free_port()
    api_cmd = [sys.executable, "-m", "deepscope", "api", "--port", str(api_port)]
    api_cmd += ["--workers", str(api_workers), "--log-level", "warning"]
    floor_cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench.floor_app:create"]
    floor_cmd += ["--port", str(floor_port), "--workers", str(api_workers)]
    floor_cmd += ["--log-level", "warning", "--no-access-log"]
    body = {"model_id": model_id, "analysis": "residuals"}
    with _server(api_cmd, env, api_port) as api_pid, _server(floor_cmd, env, floor_port) as fp:
        api_clients = [
            httpx.Client(
                base_url=f"http://127.0.0.1:{api_port}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            for _ in range(_CLIENTS)
        ]
        floor_clients = [
            httpx.Client(base_url=f"http://127.0.0.1:{floor_port}", timeout=60)
            for _ in range(_CLIENTS)
        ]

        def new(t: int, i: int) -> None:
            resp = api_clients[t].post("/v1/jobs", json=body | {"params": rtol(i)})
            assert resp.status_code == 202 and resp.json()["status"] == "queued", resp.text

        # Computed before the workers were paused (main): answered from the result cache.
        cached_body = body | {"params": rtol(-1)}
        resp = api_clients[0].post("/v1/jobs", json=cached_body)
        assert resp.status_code == 202 and resp.json()["cached"], resp.text

        def cached(t: int, i: int) -> None:
            resp = api_clients[t].post("/v1/jobs", json=cached_body)
            assert resp.status_code == 202 and resp.json()["cached"], resp.text

        def floor(t: int, i: int) -> None:
            resp = floor_clients[t].post("/v1/jobs", json=body | {"params": rtol(i)})
            assert resp.status_code == 202, resp.text

        Rate(new, 200, seconds, api_pid)  # warm-up: connections, threads, every process
        Rate(floor, 200, seconds, fp)
        rates = []
        for _ in range(2):  # interleaved: the machine's load drift hits both alike
            rates.append((Rate(floor, limit, seconds, fp), Rate(new, limit, seconds, api_pid)))
        hits = Rate(cached, limit, seconds, api_pid)
        for c in (*api_clients, *floor_clients):
            c.close()
    best_floor = max((f for f, _ in rates), key=lambda r: r.per_s)
    best_new = max((n for _, n in rates), key=lambda r: r.per_s)
    return best_floor, best_new, hits


def verdict(ratio: float, target: float, higher_is_better: bool) -> str:
    ok = ratio >= target if higher_is_better else ratio <= target
    return "meets" if ok else "MISSES"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--workers", type=int, default=1, help="cpu workers of the stack")
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput measurement")
    parser.add_argument("--max-submissions", type=int, default=40000)
    parser.add_argument(
        "--api-workers", type=int, default=2, help="processes of the API and of the floor app"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="DEEPSCOPE_NAME=VALUE",
        help="a setting of the stack (repeatable), e.g. DEEPSCOPE_WORKER_HELPER=false",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sleep before every measurement, floor included (measures from an idle stack; "
        "default: back to back)",
    )
    args = parser.parse_args()
    repeats = args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        weights = train_fcnn1(Path(tmp))
        settings = dict(item.split("=", 1) for item in args.setting)
        with stack(args.workers, settings) as (url, key, redis, children, redis_url, data_dir):
            print(f"deepscope up at {url}: {args.workers} cpu worker(s)")
            worker_pids = [p for p, cmd in children.items() if " worker " in cmd]
            with Client(url, key, timeout=60) as client:
                model = client.upload_model(weights, wait=True)
                assert model.status.value == "ready", model.error
                http = client._http

                def submit(
                    params: dict[str, Any], prefer: bool = False, analysis: str = "signal_space"
                ) -> dict[str, Any]:
                    """POST /v1/jobs → the job as answered."""
                    body = {"model_id": model.id, "analysis": analysis, "params": params}
                    headers = {"Prefer": "wait=30"} if prefer else {}
                    resp = http.post("/v1/jobs", json=body, headers=headers)
                    assert resp.status_code == 202, resp.text
                    answer: dict[str, Any] = resp.json()
                    return answer

                # Warm-up: the first forks, the first model load, the cache entry.
                _noop_latency(redis, 3)
                cached_params = {"vectors": 1, "images": False}
                client.wait(submit(cached_params)["id"], progress=False)
                for i in range(3):
                    client.wait(submit({"vectors": 200 + i, "images": False})["id"], progress=False)
                    client.wait(submit({"vectors": 220 + i})["id"], progress=False)

                # Interleaved, so that a change in the machine's load hits floor and
                # measurements alike.
                floor: list[float] = []
                cached: list[float] = []
                metrics_only: list[float] = []
                pictures: list[float] = []
                pictures_ids: list[str] = []
                long_polled: list[float] = []
                polled_metrics: list[float] = []
                polled_pictures: list[float] = []

                def idle() -> None:
                    """Before each measurement: ``--idle`` seconds of nothing."""
                    if args.idle > 0:
                        time.sleep(args.idle)

                def with_pictures(i: int, prefer: bool = False) -> dict[str, Any]:
                    answer = submit({"vectors": 100 + i}, prefer)
                    pictures_ids.append(answer["id"])
                    return answer

                for i in range(repeats):
                    idle()
                    floor += _noop_latency(redis, 1)
                    idle()
                    cached.append(
                        _http_wait_latency(client, partial(submit, cached_params), prefer=True)
                    )
                    fresh = {"vectors": 2 + i, "images": False}
                    idle()
                    metrics_only.append(
                        _http_wait_latency(client, partial(submit, fresh), prefer=True)
                    )
                    idle()
                    pictures.append(
                        _http_wait_latency(client, partial(with_pictures, i), prefer=True)
                    )
                    idle()
                    floor += _noop_latency(redis, 1)
                    idle()
                    long_polled.append(_http_wait_latency(client, partial(with_pictures, 80 + i)))
                    polled = {"vectors": 40 + i, "images": False}
                    idle()
                    polled_metrics.append(_http_latency(client, partial(submit, polled)))
                    idle()
                    polled_pictures.append(_http_latency(client, partial(with_pictures, 40 + i)))
                    idle()
                    floor += _noop_latency(redis, 1)
                compute = [
                    float(client.get_job(j).result.duration_s)  # type: ignore[union-attr,arg-type]
                    for j in pictures_ids
                ]

                # The throughput's cached submission, computed first (its cache entry is
                # written with its end, so a resubmission is answered from the cache).
                client.wait(submit(rtol(-1), analysis="residuals")["id"], progress=False)

                # Throughput: workers paused, so they do not compete for the CPU.
                _signal(worker_pids, signal.SIGSTOP)
                try:
                    rates = throughput(
                        redis_url=redis_url,
                        data_dir=data_dir,
                        key=key,
                        model_id=model.id,
                        api_workers=args.api_workers,
                        limit=args.max_submissions,
                        seconds=args.seconds,
                    )
                finally:
                    _signal(worker_pids, signal.SIGCONT)

    floor_ms = median_ms(floor)
    compute_ms = statistics.median(compute) * 1000
    print()
    print(f"floor: raw RQ no-op enqueue→finished, forking worker: {floor_ms:8.1f} ms (median)")
    rows = [
        ("cached job (result cache)", median_ms(cached), floor_ms),
        ("signal_space fcnn1, metrics only", median_ms(metrics_only), floor_ms),
        ("signal_space fcnn1, with pictures", median_ms(pictures), floor_ms),
        ("  … against floor + its compute", median_ms(pictures), floor_ms + compute_ms),
        ("submit, then long poll: pictures", median_ms(long_polled), floor_ms),
        ("polled every 2 ms: metrics only", median_ms(polled_metrics), floor_ms),
        ("polled every 2 ms: with pictures", median_ms(polled_pictures), floor_ms),
    ]
    print(f"\n{'latency submit→succeeded (HTTP)':36s} {'median':>9s} {'floor':>9s} {'ratio':>7s}"
          "  target ≤ 2×")  # fmt: skip
    for name, value, base in rows:
        ratio = value / base
        print(
            f"{name:36s} {value:7.1f}ms {base:7.1f}ms {ratio:6.2f}×  {verdict(ratio, 2.0, False)}"
        )
    print(f"  (signal_space with pictures: the worker reports {compute_ms:.0f} ms of compute)")
    floor_rate, new, hits = rates
    print(f"\n{'submissions/s, 16 clients':36s} {'rate':>9s} {'floor':>9s} {'ratio':>7s}"
          "  target ≥ 0.7×   CPU ms/op: bench client, server")  # fmt: skip
    print(f"  ({args.api_workers} processes each)")
    print(f"{'floor: FastAPI, same body, 1 enqueue':36s} {floor_rate.per_s:7.0f}/s {'':9s} "
          f"{'':7s} {'':15s} {floor_rate.client_ms:5.2f}, "
          f"app {floor_rate.server_ms:.2f}")  # fmt: skip
    for name, r in (("POST /v1/jobs, new computation", new), ("POST /v1/jobs, cached", hits)):
        ratio = r.per_s / floor_rate.per_s
        print(f"{name:36s} {r.per_s:7.0f}/s {floor_rate.per_s:7.0f}/s {ratio:6.2f}×  "
              f"{verdict(ratio, 0.7, True):6s} {'':8s} {r.client_ms:5.2f}, api {r.server_ms:.2f}"
              f"   ({r.count} submissions)")  # fmt: skip


if __name__ == "__main__":
    main()
