"""A small real HTTP reverse proxy in front of the test stack that fails on purpose: it answers
503 without forwarding, or forwards and then loses the answer (502, as a load balancer whose
upstream connection broke), or is not listening at all (connection refused). The SDK's retries
are tested through it against the real service."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

__all__ = ["FlakyProxy", "Seen"]

# Hop-by-hop headers and those httpx recomputes: not copied across.
_SKIP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class Seen:
    """One request the proxy received, and what it did with it."""

    method: str
    path: str
    headers: dict[str, str]
    action: str
    upstream_status: int | None = None
    upstream_body: bytes = b""


@dataclass
class FlakyProxy:
    """``plan``: actions for the next requests, in order (then ``pass``): ``503`` answers 503
    without forwarding; ``lose`` forwards, then answers 502; ``pass`` forwards. ``only``: the
    plan applies to requests whose ``METHOD path`` starts with it (others pass)."""

    upstream: str
    port: int
    plan: list[str] = field(default_factory=list)
    only: str = ""
    seen: list[Seen] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlakyProxy:
        proxy = self
        upstream = httpx.Client(base_url=self.upstream, timeout=120)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _SKIP}
                with proxy._lock:
                    applies = f"{self.command} {self.path}".startswith(proxy.only)
                    action = proxy.plan.pop(0) if applies and proxy.plan else "pass"
                    seen = Seen(self.command, self.path, dict(self.headers.items()), action)
                    proxy.seen.append(seen)
                if action == "503":
                    self._answer(503, {"content-type": "text/plain"}, b"try again later")
                    return
                resp = upstream.request(self.command, self.path, headers=headers, content=body)
                seen.upstream_status, seen.upstream_body = resp.status_code, resp.content
                if action == "lose":
                    self._answer(502, {"content-type": "text/plain"}, b"bad gateway")
                    return
                kept = {k: v for k, v in resp.headers.items() if k.lower() not in _SKIP}
                kept.pop("content-encoding", None)  # httpx decoded the body
                self._answer(resp.status_code, kept, resp.content)

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = do_PUT = _handle  # noqa: N815 (http.server names)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening socket: connections are refused until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def requests_to(self, prefix: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if f"{s.method} {s.path}".startswith(prefix)]
