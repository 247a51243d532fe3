#!/usr/bin/env python3
"""The deploy test's HTTP client: plain HTTP calls to a running deepscope API, standard library
only (it checks the service from outside, with nothing of deepscope's own code).

    api.py ready [--cpu-workers N] [--timeout S]   wait for /readyz: N live cpu workers
    api.py upload MODEL MANIFEST                    POST /v1/models → the model id
    api.py wait-model ID [--timeout S]              until ready (exit 1 when invalid)
    api.py submit MODEL ANALYSIS [PARAMS_JSON]      POST /v1/jobs → the job id
    api.py wait JOB [--timeout S] [--until running] until terminal (exit 1 unless succeeded)
    api.py job JOB                                  GET /v1/jobs/JOB (JSON)
    api.py download JOB NAME|PATH OUT               GET /v1/artifacts/JOB/NAME → OUT

DEEPSCOPE_URL (http://127.0.0.1:8000) and DEEPSCOPE_API_KEY. Errors: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

URL = os.environ.get("DEEPSCOPE_URL", "http://127.0.0.1:8000").rstrip("/")
KEY = os.environ.get("DEEPSCOPE_API_KEY", "")
TERMINAL = ("succeeded", "failed", "canceled")


class ApiError(Exception):
    pass


def call(
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    request = urllib.request.Request(URL + path, data=body, method=method)
    request.add_header("Authorization", f"Bearer {KEY}")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def call_json(method: str, path: str, **kw: Any) -> Any:
    status, raw = call(method, path, **kw)
    if status >= 400:
        raise ApiError(f"{method} {path} → {status}: {raw[:500].decode(errors='replace')}")
    return json.loads(raw)


def poll(what: str, timeout: float, probe: Any, interval: float = 0.5) -> Any:
    """Call probe() until it returns something other than None; transient connection errors
    (the API restarting) are retried until the deadline."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            out = probe()
            if out is not None:
                return out
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(interval)
    raise ApiError(f"timed out after {timeout:.0f} s waiting for {what} ({last})")


def cmd_ready(args: argparse.Namespace) -> int:
    seen: dict[str, Any] = {}

    def probe() -> Any:
        _, raw = call("GET", "/readyz", timeout=5)
        seen["last"] = raw.decode(errors="replace")
        body = json.loads(raw)
        return body if body.get("workers", {}).get("cpu", 0) >= args.cpu_workers else None

    try:
        body = poll(f"{args.cpu_workers} cpu workers in /readyz", args.timeout, probe)
    except ApiError as exc:
        raise ApiError(f"{exc}; last /readyz: {seen.get('last')}") from None
    print(json.dumps(body))
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    boundary = uuid.uuid4().hex
    model = Path(args.model)
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{model.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + model.read_bytes()
        + b"\r\n",
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n'
            + Path(args.manifest).read_text()
            + "\r\n"
        ).encode(),
        f"--{boundary}--\r\n".encode(),
    ]
    out = call_json(
        "POST",
        "/v1/models",
        body=b"".join(parts),
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    print(out["id"])
    return 0


def cmd_wait_model(args: argparse.Namespace) -> int:
    def probe() -> Any:
        rec = call_json("GET", f"/v1/models/{args.id}")
        return rec if rec["status"] != "validating" else None

    rec = poll(f"model {args.id} to be validated", args.timeout, probe)
    if rec["status"] != "ready":
        print(f"model {args.id} is {rec['status']}: {rec.get('error')}", file=sys.stderr)
        return 1
    print(rec["status"])
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    payload = {"model_id": args.model, "analysis": args.analysis, "params": json.loads(args.params)}
    out = call_json(
        "POST", "/v1/jobs", body=json.dumps(payload).encode(), content_type="application/json"
    )
    print(out["id"])
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    wanted = ("running", *TERMINAL) if args.until == "running" else TERMINAL

    def probe() -> Any:
        job = call_json("GET", f"/v1/jobs/{args.job}")
        return job if job["status"] in wanted else None

    job = poll(f"job {args.job} ({args.until})", args.timeout, probe, interval=0.25)
    brief = {k: job.get(k) for k in ("id", "status", "attempts", "cached", "error", "message")}
    brief["artifacts"] = [a["url"] for a in (job.get("result") or {}).get("artifacts", [])]
    print(json.dumps(brief))
    if args.until == "running" and job["status"] == "running":
        return 0
    return 0 if job["status"] == "succeeded" else 1


def cmd_job(args: argparse.Namespace) -> int:
    print(json.dumps(call_json("GET", f"/v1/jobs/{args.job}")))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    # NAME: an artifact's name, or its URL path as a job's result lists it
    path = args.name if args.name.startswith("/") else f"/v1/artifacts/{args.job}/{args.name}"
    status, raw = call("GET", path)
    if status != 200:
        raise ApiError(f"artifact {args.job}/{args.name} → {status}: {raw[:300]!r}")
    Path(args.out).write_bytes(raw)
    print(f"{len(raw)} bytes → {args.out}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ready")
    p.add_argument("--cpu-workers", type=int, default=1)
    p.add_argument("--timeout", type=float, default=180)
    p.set_defaults(func=cmd_ready)
    p = sub.add_parser("upload")
    p.add_argument("model")
    p.add_argument("manifest")
    p.set_defaults(func=cmd_upload)
    p = sub.add_parser("wait-model")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, default=180)
    p.set_defaults(func=cmd_wait_model)
    p = sub.add_parser("submit")
    p.add_argument("model")
    p.add_argument("analysis")
    p.add_argument("params", nargs="?", default="{}")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("wait")
    p.add_argument("job")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--until", choices=("running", "terminal"), default="terminal")
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("job")
    p.add_argument("job")
    p.set_defaults(func=cmd_job)
    p = sub.add_parser("download")
    p.add_argument("job")
    p.add_argument("name")
    p.add_argument("out")
    p.set_defaults(func=cmd_download)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (ApiError, urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        print(f"api.py {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
