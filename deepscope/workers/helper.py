"""A forking worker's helper: one long-lived process that computes its jobs' analyses.

A job's process is forked fresh for it, and a fresh process pays a page fault for every page
it writes: torch's kernels, the numbers, the drawing (canvases, text, encoders) write
thousands, so a small analysis costs a forked job about twice what it costs a process that
has run one before (fcnn1's ``signal_space`` with its pictures: about 38 ms against 20). The
helper is forked once from the warmed worker and stays warm. The worker plans each analysis
job on a model without code (a :class:`~deepscope.workers.computing.Run`) and hands it to the
helper before it forks the job's process (:func:`start_run`), so the computation overlaps the
fork; the job's process collects the result (:func:`collect`), relaying its progress (and
noticing a cancel), and publishes it as before.

* The job's process stays the job: RQ's timeout, a cancel or a shutdown kills it, and the
  helper, which watches its connection while it computes, exits at once when the job's end of
  it closes (the worker starts another for the next job). The helper has the memory limit of
  a job, and is replaced when what it holds grows past :data:`REFRESH_BYTES`.
* Each job gets a connection of its own (a socket pair, one end passed to the helper over its
  control socket): a job that dies leaves nothing behind for the next one.
* The wire format is length-prefixed JSON: nothing a job sends is unpickled or run. Jobs on
  code-bearing models never reach the helper (the worker decides, :mod:`supervision`).
* What the helper could not do (it died, broke the protocol, met anything but a user's error)
  the job's process does itself, from a clean directory: the same computation, with the same
  result or error. A user's error (``ValueError``: bad params for this model, a dataset that
  does not fit) is the job's error, said once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import redis

from deepscope.analyses.context import Progress
from deepscope.contract.errors import user_message
from deepscope.contract.result import Result
from deepscope.settings import Settings
from deepscope.store.backend import Backend
from deepscope.workers import runtime
from deepscope.workers.computing import Run, compute

__all__ = ["PROCESS_NAME", "REFRESH_BYTES", "SETTLE_S", "HelperProcess", "collect", "start_run"]

log = logging.getLogger("deepscope.worker")

_LENGTH = struct.Struct("<Q")
#: The helper's name in ``ps`` and ``/proc/PID/comm`` (beside its worker's job processes).
PROCESS_NAME = "ds-helper"
_PR_SET_NAME = 15
#: Resident memory the helper may gain over its start (models kept, allocator slack) before it
#: leaves after a run, for a fresh one.
REFRESH_BYTES = 512 * 1024 * 1024
#: Seconds the worker waits, after a job, for the helper to be done with it.
SETTLE_S = 5.0
_PING, _PONG = b"p", b"k"


# --- the wire format: length-prefixed JSON ----------------------------------------------------


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    while view:
        n = sock.recv_into(view)
        if n == 0:
            return None
        view = view[n:]
    return buf


def _recv(sock: socket.socket) -> dict[str, Any] | None:
    """The next message; None when the other end closed.

    Raises:
        OSError: the connection failed.
        ValueError: what came is not a message.
    """
    raw = _recv_exact(sock, _LENGTH.size)
    if raw is None:
        return None
    data = _recv_exact(sock, _LENGTH.unpack(raw)[0])
    if data is None:
        return None
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message


# --- the helper's side ------------------------------------------------------------------------


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serve(control: socket.socket, settings: Settings) -> None:
    """The helper's loop: take a job's connection, run what it asks, answer."""
    # Storage and settings only: a run reads files and writes its directory, never Redis (the
    # client connects on its first command, which never comes).
    backend = Backend(
        settings,
        redis=redis.Redis.from_url(settings.resolved_redis_url()),
        storage=runtime.storage(settings.storage_location),
    )
    start = _resident_bytes()
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(control, 1, 1)
        if msg == _PING:
            control.sendall(_PONG)  # done with the last job (HelperProcess.release)
            continue
        if not fds:
            return  # the worker is gone
        with socket.socket(fileno=fds[0]) as conn:
            fresh = _serve_job(conn, backend)
        if not fresh or _resident_bytes() - start > REFRESH_BYTES:
            return  # the worker starts another for its next job


def _serve_job(conn: socket.socket, backend: Backend) -> bool:
    """Answer one job's requests. → whether this process is still fit for the next job."""
    while True:
        try:
            message = _recv(conn)
        except (OSError, ValueError):
            return True  # a job that died mid-message: its connection ends with it
        if message is None:
            return True
        try:
            run = Run.model_validate(message["run"])
        except (KeyError, ValueError) as exc:
            with contextlib.suppress(OSError):
                _send(conn, {"error": {"user": False, "message": f"bad request: {exc}"}})
            return True
        fresh = True

        def progress(fraction: float, text: str) -> None:
            _send(conn, {"progress": [fraction, text]})

        try:
            with _dies_with(conn):
                result = compute(backend, run, progress)
            reply: dict[str, Any] = {"result": result.model_dump(mode="json", by_alias=True)}
        except Exception as exc:
            user = isinstance(exc, ValueError)
            # After anything but a user's error (out of memory, a bug) a fresh helper serves
            # the next job: this one's state is not known.
            fresh = user
            reply = {"error": {"user": user, "message": user_message(exc)}}
        try:
            _send(conn, reply)
        except OSError:
            return fresh
        if not fresh:
            return False


@contextlib.contextmanager
def _dies_with(conn: socket.socket) -> Iterator[None]:
    """Exit this process at once if the job's end of ``conn`` closes (or speaks) while the
    block runs: the job was killed (timeout, cancel, shutdown), and so is its computation,
    wherever it is (a long kernel does not return to Python to be told)."""
    stop_read, stop_write = os.pipe()

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLRDHUP)
        poller.register(stop_read, select.POLLIN)
        events = dict(poller.poll())
        if stop_read not in events:
            os._exit(1)

    watcher = threading.Thread(target=watch, name="job-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        os.write(stop_write, b"x")
        watcher.join()
        os.close(stop_read)
        os.close(stop_write)


class HelperProcess:
    """The worker's side: starts the helper, restarts it when it is gone, and makes each job's
    connection (before the job's process is forked, which inherits it)."""

    def __init__(self, settings: Settings) -> None:
        """``settings``: the worker's (storage, the memory a job may use)."""
        self.settings = settings
        self.pid: int | None = None
        self._control: socket.socket | None = None

    def start(self) -> None:
        """Fork the helper (call it after everything is imported and warmed up)."""
        from deepscope.workers.supervision import die_with_parent, limit_memory

        parent_end, child_end = socket.socketpair()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the helper
            code = 0
            try:
                parent_end.close()
                with contextlib.suppress(OSError, AttributeError):
                    libc = ctypes.CDLL("libc.so.6", use_errno=True)
                    libc.prctl(_PR_SET_NAME, PROCESS_NAME.encode(), 0, 0, 0)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker stops it
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                die_with_parent(parent)
                limit_memory(self.settings.job_memory_bytes())
                _serve(child_end, self.settings)
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
        """A new connection to the helper (restarted first if it is gone); None when it cannot
        be reached (the job then computes itself)."""
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
            log.warning("helper unreachable (%s): jobs compute themselves", exc)
            return None

    def release(self, conn: socket.socket) -> None:
        """Close a job's connection (its process has ended) and return once the helper is
        done with it: back for the next job, or gone (a helper that does not say so within
        :data:`SETTLE_S` is stopped). Then nothing writes into the job's directory."""
        conn.close()
        control = self._control
        if control is None or not self.alive():
            return
        try:
            control.settimeout(SETTLE_S)
            control.sendall(_PING)
            if control.recv(1) != _PONG:
                raise OSError("the helper did not answer")
            control.settimeout(None)
        except OSError:
            self.stop()

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


def start_run(conn: socket.socket, run: Run) -> bool:
    """Hand ``run`` to the helper at the other end of ``conn`` (the worker does, before it
    forks the job's process, so that the helper computes while the job's process starts).
    → whether it was sent."""
    try:
        _send(conn, {"run": run.model_dump(mode="json", by_alias=True)})
    except OSError as exc:
        log.warning("helper unreachable (%s): the job computes itself", exc)
        return False
    return True


def collect(
    conn: socket.socket, progress: Progress, helper_pid: int | None = None
) -> Result | None:
    """The result of the run handed to the helper at the other end of ``conn``, its progress
    passed to ``progress`` (whatever that raises, a cancel, ends the wait: the job's process
    ends, and the helper's computation with it). → None when the helper could not compute it
    (the caller computes it itself).

    Raises:
        ValueError: the run's own user error (bad params, a dataset that does not fit).
    """
    conn.settimeout(None)  # as long as the run: the job's timeout bounds it
    try:
        while True:
            message = _recv(conn)
            if message is None:
                _give_up("it closed the connection", helper_pid)
                return None
            if "progress" in message:
                fraction, text = message["progress"]
                progress(float(fraction), str(text))
                continue
            if "result" in message:
                return Result.model_validate(message["result"])
            error = message["error"]
            if error["user"]:
                failure = str(error["message"])
                break
            log.info("helper: %s; the job computes itself", error["message"])
            return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _give_up(f"{type(exc).__name__}: {exc}", helper_pid)
        return None
    raise ValueError(failure)


def _give_up(why: str, helper_pid: int | None) -> None:
    """The helper cannot be trusted with this job: stopped (the worker starts another for the
    next job)."""
    log.warning("helper: %s; the job computes itself", why)
    if helper_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper_pid, signal.SIGKILL)
