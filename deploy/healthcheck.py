#!/opt/deepscope/bin/python3
"""The image's HEALTHCHECK (`deepscope-healthcheck`): one check for every deepscope service.

It finds the container's deepscope process (the lowest pid whose command line is
``deepscope api|worker|up ...``: PID 1, or the init's child with ``init: true`` / ``docker
run --init``) and checks what that process is for:

* ``api`` / ``up``: ``GET /healthz`` on the port of its command line answers 200;
* ``worker``: the worker is registered in Redis from this container (RQ's hostname and pid)
  and its heartbeat (``ds:workers``, on the Redis server's clock) is younger than
  ``DEEPSCOPE_WORKER_DEAD_AFTER_S``: the worker's own thread writes it, so a hung or
  disconnected worker turns unhealthy;
* anything else (``deepscope train ...``, ``--help``): not a service, healthy.

Exit 0 healthy, 1 unhealthy, with one line saying why (``docker inspect`` shows it).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SERVICES = ("api", "worker", "up")


@dataclass(frozen=True)
class Service:
    role: str  # api | worker | up
    pid: int
    args: tuple[str, ...]  # after the role

    def option(self, name: str) -> str | None:
        """The value of ``--name VALUE`` / ``--name=VALUE`` in the command line."""
        args = list(self.args)
        for i, arg in enumerate(args):
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None


def parse(pid: int, argv: list[str]) -> Service | None:
    """``[python, .../deepscope, ROLE, ...]`` or ``[.../deepscope, ROLE, ...]`` → the service.
    Only the process that runs deepscope: not an init that starts it (``docker-init --
    deepscope worker``)."""
    names = [os.path.basename(a) for a in argv]
    start = 1 if names and names[0].startswith("python") else 0
    if len(argv) > start + 1 and names[start] == "deepscope" and argv[start + 1] in SERVICES:
        return Service(argv[start + 1], pid, tuple(argv[start + 2 :]))
    return None


def find_service(proc: Path = Path("/proc")) -> Service | None:
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    for pid in pids:
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        service = parse(pid, [a.decode(errors="replace") for a in raw.split(b"\0") if a])
        if service is not None:
            return service
    return None


def check_http(service: Service) -> tuple[bool, str]:
    port = int(service.option("--port") or 8000)
    host = service.option("--host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200, f"{service.role}: {url} → {response.status}"
    except Exception as exc:
        return False, f"{service.role}: {url} → {type(exc).__name__}: {exc}"


def check_worker(service: Service) -> tuple[bool, str]:
    from redis import Redis
    from rq import Worker
    from rq.serializers import JSONSerializer

    from deepscope.settings import Settings
    from deepscope.store.recovery import last_beats, server_time

    settings = Settings()
    hostname = socket.gethostname()
    redis = Redis.from_url(settings.resolved_redis_url(), socket_timeout=4)
    name = service.option("--name")
    mine = [
        w.name
        for w in Worker.all(connection=redis, serializer=JSONSerializer)
        if (name is not None and (w.name == name or w.name.startswith(name + ".")))
        or (name is None and w.hostname == hostname and w.pid == service.pid)
    ]
    if not mine:
        return False, f"worker: not registered in Redis (host {hostname}, pid {service.pid})"
    now = server_time(redis)
    beats = last_beats(redis)
    ages = {w: now - beats[w] for w in mine if w in beats}
    if not ages:
        return False, f"worker {mine[0]}: registered, no heartbeat yet"
    worker, age = min(ages.items(), key=lambda kv: kv[1])
    ok = age <= settings.worker_dead_after_s
    verdict = "ok" if ok else f"stale (> {settings.worker_dead_after_s} s)"
    return ok, f"worker {worker}: last heartbeat {age:.1f} s ago, {verdict}"


def main() -> int:
    service = find_service()
    if service is None:
        print("not a deepscope service (api, worker, up): nothing to check")
        return 0
    try:
        ok, line = check_worker(service) if service.role == "worker" else check_http(service)
    except Exception as exc:
        ok, line = False, f"{service.role}: {type(exc).__name__}: {exc}"
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
