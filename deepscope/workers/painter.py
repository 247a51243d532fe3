"""A forking worker's painter: one long-lived process that draws its jobs' pictures.

A job's process is forked fresh for it, and a fresh process pays a page fault for every page
it writes: drawing (canvases, text, encoders) writes many, so a picture costs a forked job about
twice what it costs a process that has drawn before. The painter is forked once from the
warmed worker and draws every job's pictures; a job hands it each picture as data
(:func:`deepscope.render.draw`'s arguments) and goes on computing while it is drawn, on another
core.

* Each job gets a connection of its own (a socket pair, one end passed to the painter over its
  control socket), so a job that dies mid-picture leaves nothing behind for the next one.
* The wire format is JSON with raw numeric arrays: nothing a job sends is unpickled or run.
  Jobs on code-bearing models draw their own pictures anyway (the worker decides).
* Whatever goes wrong on the painter's side (it died, did not answer in time, refused a
  picture) the job draws that picture itself: the same call, with the same result or error.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepscope import render
from deepscope.analyses.context import LocalPainter

__all__ = ["PROCESS_NAME", "PainterProcess", "RemotePainter", "decode", "encode"]

log = logging.getLogger("deepscope.worker")

_LENGTH = struct.Struct("<Q")
#: Array dtypes that travel (numbers only: bool, int, uint, float).
_KINDS = frozenset("biuf")
#: Seconds a job waits for one picture before it draws it (and the rest) itself.
REPLY_TIMEOUT_S = 120.0
#: The painter's name in ``ps`` and ``/proc/PID/comm`` (beside its worker's job processes).
PROCESS_NAME = "ds-painter"
_PR_SET_NAME = 15


# --- the wire format: JSON, with arrays and drawing types as tagged entries -------------------


def encode(value: Any, arrays: list[np.ndarray]) -> Any:
    """``value`` as JSON-able data; its numeric arrays appended to ``arrays`` (tagged by index).

    Raises:
        TypeError: a value that has no place on the wire (the job then draws it itself).
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _KINDS:
            raise TypeError(f"arrays of dtype {value.dtype} are not sent to the painter")
        arrays.append(np.ascontiguousarray(value))
        return {"$array": len(arrays) - 1}
    if isinstance(value, render.SpectrumLine):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"$line": encode(fields, arrays)}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, arrays) for v in value]}
    if isinstance(value, list):
        return [encode(v, arrays) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": {k: encode(v, arrays) for k, v in value.items()}}
    raise TypeError(f"{type(value).__name__} is not sent to the painter")


def decode(value: Any, arrays: Sequence[np.ndarray]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, body), *rest = value.items()
    if rest:
        raise ValueError("a tagged entry has one key")
    if tag == "$array":
        return arrays[int(body)]
    if tag == "$tuple":
        return tuple(decode(v, arrays) for v in body)
    if tag == "$dict":
        return {str(k): decode(v, arrays) for k, v in body.items()}
    if tag == "$line":
        return render.SpectrumLine(**decode(body, arrays))
    raise ValueError(f"unknown tag {tag!r}")


def _send(sock: socket.socket, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
    """One message: its header's length, the JSON header (with each array's dtype and shape),
    then each array's bytes."""
    header = {**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    data = json.dumps(header).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)
    for a in arrays:
        sock.sendall(a.data.cast("B"))


def _recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    while view:
        n = sock.recv_into(view)
        if n == 0:
            return None
        view = view[n:]
    return buf


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[np.ndarray]] | None:
    """The next message → (header, arrays); None when the other end closed."""
    raw = _recv_exact(sock, _LENGTH.size)
    if raw is None:
        return None
    data = _recv_exact(sock, _LENGTH.unpack(raw)[0])
    if data is None:
        return None
    header = json.loads(data)
    arrays = []
    for dtype_str, shape in header.pop("arrays"):
        dtype = np.dtype(dtype_str)
        if dtype.kind not in _KINDS:
            raise ValueError(f"dtype {dtype} is not accepted")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = _recv_exact(sock, size)
        if buf is None:
            return None
        arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return header, arrays


# --- the painter's side -----------------------------------------------------------------------


def _serve(control: socket.socket) -> None:
    """The painter's loop: take a job's connection, draw what it sends, answer each picture."""
    while True:
        _msg, fds, _flags, _addr = socket.recv_fds(control, 1, 1)
        if not fds:
            return  # the worker is gone
        with socket.socket(fileno=fds[0]) as conn:
            _serve_job(conn)


def _serve_job(conn: socket.socket) -> None:
    while True:
        try:
            message = _recv(conn)
        except (OSError, ValueError):
            return  # a job that died mid-message: its connection ends with it
        if message is None:
            return
        header, arrays = message
        try:
            kwargs = decode(header["kwargs"], arrays)
            render.draw(str(header["drawing"]), Path(header["path"]), **kwargs)
            reply: dict[str, Any] = {"id": header["id"]}
        except Exception as exc:  # the job draws it itself and meets the error there
            reply = {"id": header["id"], "error": f"{type(exc).__name__}: {exc}"}
        try:
            _send(conn, reply)
        except OSError:
            return


class PainterProcess:
    """The worker's side: starts the painter, restarts it when it died, and makes each job's
    connection (before the job's process is forked, which inherits it)."""

    def __init__(self, memory_bytes: int = 0) -> None:
        self.memory_bytes = memory_bytes
        self.pid: int | None = None
        self._control: socket.socket | None = None

    def start(self) -> None:
        """Fork the painter (call it after everything is imported and warmed up)."""
        from deepscope.workers.supervision import die_with_parent, limit_memory

        parent_end, child_end = socket.socketpair()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the painter
            code = 0
            try:
                parent_end.close()
                with contextlib.suppress(OSError, AttributeError):
                    libc = ctypes.CDLL("libc.so.6", use_errno=True)
                    libc.prctl(_PR_SET_NAME, PROCESS_NAME.encode(), 0, 0, 0)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker stops it
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                die_with_parent(parent)
                limit_memory(self.memory_bytes)
                _serve(child_end)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        child_end.close()
        self.pid, self._control = pid, parent_end

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            done, _status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            done = self.pid
        return done == 0

    def connect(self) -> socket.socket | None:
        """A new connection to the painter (restarted first if it died); None when it cannot
        be reached (the job then draws its own pictures)."""
        try:
            if not self.alive():
                self.stop()
                self.start()
            assert self._control is not None
            mine, theirs = socket.socketpair()
            try:
                socket.send_fds(self._control, [b"c"], [theirs.fileno()])
            finally:
                theirs.close()
            return mine
        except OSError as exc:
            log.warning("painter unreachable (%s): jobs draw their own pictures", exc)
            return None

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None


# --- the job's side ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    id: str
    drawing: str
    path: Path
    kwargs: dict[str, Any]


class RemotePainter:
    """A job's painter (:class:`deepscope.analyses.context.Painter`): each picture is sent to
    the worker's painter at once and waited for in :meth:`finish`; a picture the painter
    could not draw is drawn here."""

    def __init__(self, conn: socket.socket, painter_pid: int | None = None) -> None:
        # Sends block too when a stuck painter stops reading: neither waits past the timeout.
        conn.settimeout(REPLY_TIMEOUT_S)
        self.conn = conn
        self.painter_pid = painter_pid
        self.local = LocalPainter()
        self.broken = False
        self._pending: list[_Pending] = []
        self._prefix = uuid.uuid4().hex[:8]

    def draw(self, drawing: str, path: Path, kwargs: dict[str, Any]) -> None:
        if not self.broken:
            job = _Pending(f"{self._prefix}-{len(self._pending)}", drawing, path, kwargs)
            arrays: list[np.ndarray] = []
            try:
                body = {"id": job.id, "drawing": drawing, "path": str(path)}
                _send(self.conn, {**body, "kwargs": encode(kwargs, arrays)}, arrays)
                self._pending.append(job)
                return
            except TypeError:
                pass  # not sendable: drawn here
            except OSError as exc:
                self._give_up(f"sending a picture failed ({exc})")
        self.local.draw(drawing, path, kwargs)

    def finish(self, *, raise_errors: bool = True) -> None:
        pending, self._pending = self._pending, []
        first: BaseException | None = None
        for job in pending:
            error = self._answer(job.id)
            if error is None:
                continue
            try:  # drawn here: the same call, so the same picture or the same error
                self.local.draw(job.drawing, job.path, job.kwargs)
            except Exception as exc:
                first = first or exc
        if first is not None and raise_errors:
            raise first

    def _answer(self, job_id: str) -> str | None:
        """None when the painter drew ``job_id``, else why not."""
        if self.broken:
            return "no painter"
        try:
            message = _recv(self.conn)
        except (OSError, ValueError) as exc:
            return self._give_up(f"no answer ({exc})")
        if message is None:
            return self._give_up("it closed the connection")
        reply, _arrays = message
        if reply.get("id") != job_id:
            return self._give_up(f"answer {reply.get('id')!r} for picture {job_id!r}")
        error = reply.get("error")
        return None if error is None else str(error)

    def _give_up(self, why: str) -> str:
        """The painter cannot be trusted with this job's pictures any more: stopped (the worker
        starts another for the next job); what is left is drawn here."""
        log.warning("painter: %s; the job draws its pictures itself", why)
        self.broken = True
        if self.painter_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.painter_pid, signal.SIGKILL)
        return why
