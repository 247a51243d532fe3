#!/usr/bin/env python3
"""Serve this machine's local pip mirrors on loopback, for `docker build --network host`.

    pip-mirror.py --pip PYTHON --state-dir DIR [--cert CERT --key KEY] [--bind 127.0.0.1]

Reads the pip configuration of PYTHON (`PYTHON -m pip config list` and the PIP_* environment):
its index, extra indexes, find-links and CA bundle. Every location that is a local directory
(a `file://` simple index such as file:///opt/pypi/simple, a find-links directory) is served
over HTTP(S) on BIND under a prefix of its own; remote URLs are kept as they are. Then it
writes, for the Dockerfile's build args:

    DIR/build-args   PIP_INDEX_URL=..., PIP_EXTRA_INDEX_URL=..., PIP_FIND_LINKS=... (one a line)
    DIR/pip-cert     the path of pip's CA bundle on this machine (empty: pip's default)
    DIR/port         the port, last (its presence says the server listens)

The image's pip then sees what this machine's pip sees, so it resolves the dependencies for
the image's own Python, and takes a file the local mirrors hold (torch, the CUDA wheels) from
loopback rather than over the network: for a version offered by several indexes, pip's
resolver takes the last index's file, and the local mirrors come after the index, as they do
in this machine's configuration. Standard library only; one log line per request on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import shlex
import ssl
import subprocess
import sys
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

KEYS = ("index-url", "extra-index-url", "find-links", "cert")
#: Precedence of pip's configuration sources, lowest first (the environment wins).
SOURCES = ("global", "user", "site", ":env:")


def pip_settings(python: str) -> dict[str, str]:
    """pip's effective ``index-url``, ``extra-index-url``, ``find-links`` and ``cert``."""
    out = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        source, _, name = key.rpartition(".")
        if name in KEYS:
            found.setdefault(name, {})[source] = shlex.split(raw)[0] if raw.strip() else ""
    settings = {}
    for name in KEYS:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env is not None:
            settings[name] = env
            continue
        by_source = found.get(name, {})
        for source in reversed(SOURCES):
            if source in by_source:
                settings[name] = by_source[source]
                break
    return settings


def local_dir(location: str) -> Path | None:
    if location.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    if "://" not in location and location:
        return Path(location)
    return None


class Mounts:
    """URL prefixes → local directories."""

    def __init__(self) -> None:
        self.dirs: dict[str, Path] = {}

    def add(self, directory: Path) -> str:
        for prefix, existing in self.dirs.items():
            if existing == directory:
                return prefix
        prefix = f"m{len(self.dirs)}"
        self.dirs[prefix] = directory
        return prefix


def plan(settings: dict[str, str], base_url: str, mounts: Mounts) -> dict[str, str]:
    """The build args: each local location replaced by its URL on the server. A simple index
    directory (``.../simple``) is served with its parent, so that links such as
    ``../../files/x.whl`` resolve."""

    def served(location: str, index: bool) -> str:
        path = local_dir(location)
        if path is None:
            return location
        path = path.resolve()
        if not path.is_dir():
            print(f"pip-mirror: {location} is not a directory; left out", file=sys.stderr)
            return ""
        if index:
            prefix = mounts.add(path.parent)
            return f"{base_url}/{prefix}/{path.name}/"
        return f"{base_url}/{mounts.add(path)}/"

    args = {}
    if settings.get("index-url"):
        args["PIP_INDEX_URL"] = served(settings["index-url"], index=True)
    extra = [served(u, index=True) for u in settings.get("extra-index-url", "").split()]
    if any(extra):
        args["PIP_EXTRA_INDEX_URL"] = " ".join(u for u in extra if u)
    links = [served(u, index=False) for u in settings.get("find-links", "").split()]
    if any(links):
        args["PIP_FIND_LINKS"] = " ".join(u for u in links if u)
    return args


class Handler(SimpleHTTPRequestHandler):
    mounts: ClassVar[dict[str, Path]] = {}

    def translate_path(self, path: str) -> str:
        clean = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
        parts = [p for p in clean.split("/") if p and p not in (".", "..")]
        if not parts or parts[0] not in self.mounts:
            return "/nonexistent"
        return str(self.mounts[parts[0]].joinpath(*parts[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pip", required=True, help="the Python whose pip configuration to serve")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", type=Path, help="server certificate (PEM): serve HTTPS")
    parser.add_argument("--key", type=Path, help="its private key (PEM)")
    args = parser.parse_args()

    settings = pip_settings(args.pip)
    mounts = Mounts()
    Handler.mounts = mounts.dirs
    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    scheme = "http"
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    port = server.server_address[1]
    build_args = plan(settings, f"{scheme}://{args.bind}:{port}", mounts)

    state = args.state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / "build-args").write_text("".join(f"{k}={v}\n" for k, v in build_args.items()))
    (state / "pip-cert").write_text(settings.get("cert", "") + "\n")
    for prefix, directory in mounts.dirs.items():
        print(f"pip-mirror: /{prefix}/ → {directory}", file=sys.stderr)
    for key, value in build_args.items():
        print(f"pip-mirror: {key}={value}", file=sys.stderr)
    (state / "port.tmp").write_text(f"{port}\n")
    (state / "port.tmp").replace(state / "port")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
