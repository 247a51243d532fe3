"""The worker classes and what keeps jobs from being lost when processes die.

* :class:`ForkingWorker` (cpu workers): RQ's forking ``Worker``, where each job's process (the
  work horse) gets a memory limit (``RLIMIT_AS``: the address space at the fork plus
  ``job_memory_mb``, so a job that asks for too much gets a ``MemoryError`` instead of the
  kernel's OOM killer), dies with its worker (``PR_SET_PDEATHSIG``: no orphan keeps writing
  after the worker was killed), and is killed by the worker when it runs past its time limit
  by more than a few seconds (RQ's own limit is an exception raised in Python, which a job
  stuck in native code never sees). A horse that died without reporting is settled at once:
  retried while ``job_retries`` allow, else failed with "worker died" (or "timed out").
* :class:`InProcessWorker` (gpu workers): runs jobs in its own process so that models stay
  loaded on the device, except jobs on code-bearing models (``.pt2``, TorchScript), which get
  a forked process with the same limits, on the CPU.
* Stopping (SIGTERM / SIGINT, RQ's warm shutdown): the current job may finish within
  ``worker_grace_s`` (``DEEPSCOPE_WORKER_GRACE_S``); past it the job's process is killed (an
  in-process job: the worker exits) and the job is queued again at the front, spending no
  retry (:func:`deepscope.store.recovery.requeue_interrupted`). A second signal (RQ's cold
  shutdown) does the same at once. A rolling restart loses no job.
* :class:`Supervisor`: a thread in every worker process that writes the worker's heartbeat and,
  once its own heartbeats have been getting through for ``worker_dead_after_s``, settles the
  jobs of workers that stopped beating (:func:`deepscope.store.recovery.reap_as_leader`: one
  process at a time, the API's reaper included).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.executions import Execution
from rq.job import Job
from rq.utils import now
from rq.worker import SimpleWorker

from deepscope.manifest import ModelFormat
from deepscope.settings import Settings
from deepscope.store.backend import Backend
from deepscope.store.queues import PREDICT, RUN_JOB, VALIDATE_MODEL, connect
from deepscope.store.records import ModelRecord, Records
from deepscope.store.recovery import (
    Death,
    beat,
    forget,
    reap_as_leader,
    recover_rq_job,
    requeue_interrupted,
)
from deepscope.workers import model_cache, runtime
from deepscope.workers.analysis_job import discard, plan
from deepscope.workers.computing import Run
from deepscope.workers.helper import HelperProcess, start_run

__all__ = [
    "CODE_FORMATS",
    "ForkingWorker",
    "InProcessWorker",
    "Supervisor",
    "die_with_parent",
    "job_model",
    "limit_memory",
]

log = logging.getLogger("deepscope.worker")

#: Formats whose loading runs code from the file.
CODE_FORMATS = frozenset({ModelFormat.PT2, ModelFormat.TORCHSCRIPT})
#: Seconds past a job's time limit after which its worker kills its process.
KILL_GRACE_S = 5
#: How often (seconds) a forking worker looks at its job's process (RQ's default is 30).
_MONITOR_INTERVAL_S = 5
#: How often RQ's own registry maintenance runs (its default is 10 minutes).
_MAINTENANCE_INTERVAL_S = 30
_PR_SET_PDEATHSIG = 1


def _address_space() -> int:
    """Bytes of virtual address space this process has mapped (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def limit_memory(extra_bytes: int) -> int | None:
    """Cap this process's address space at what it maps now plus ``extra_bytes``
    (``RLIMIT_AS``); allocations past it fail (``MemoryError``, torch's "not enough memory")
    instead of waking the OOM killer. → the limit in bytes, None when not applied."""
    if extra_bytes <= 0:
        return None
    try:
        base = _address_space()
    except (OSError, ValueError):
        return None
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = base + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit at once when the
    parent is already gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def job_model(records: Records, job: Job) -> ModelRecord | None:
    """The model an analysis, prediction or validation job works on; None for other jobs, or
    when its record or model is gone."""
    args = list(job.args or [])
    if not args or not isinstance(args[0], str):
        return None
    if job.func_name in (RUN_JOB, PREDICT):
        rec = records.get_job(args[0])
        return records.get_model(rec.model_id) if rec is not None else None
    if job.func_name == VALIDATE_MODEL:
        return records.get_model(args[0])
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class ForkingWorker(Worker):
    """RQ's forking worker with per-job limits and settlement of jobs whose process died."""

    def __init__(
        self,
        *args: Any,
        settings: Settings | None = None,
        helper: HelperProcess | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("job_monitoring_interval", _MONITOR_INTERVAL_S)
        kwargs.setdefault("maintenance_interval", _MAINTENANCE_INTERVAL_S)
        super().__init__(*args, **kwargs)
        self.deepscope_settings = settings if settings is not None else Settings()
        self.helper = helper
        self._parent_pid = os.getpid()
        self._horse_death: tuple[int | None, Any] | None = None
        self._timed_out: set[str] = set()
        #: The job this worker runs now, and the one it stopped because its grace ran out.
        self._current: Job | None = None
        self._interrupted: str | None = None
        self._grace_timer: threading.Timer | None = None

    # --- in the job's process -------------------------------------------------------------

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        die_with_parent(self._parent_pid)
        limit_memory(self.deepscope_settings.job_memory_bytes())
        super().main_work_horse(job, queue)

    # --- in the worker --------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._parent_pid = os.getpid()
        self._horse_death = None
        self._current = job
        try:
            with self._helped(job):
                super().execute_job(job, queue)
        finally:
            self._current = None

    @contextlib.contextmanager
    def _helped(self, job: Job) -> Iterator[None]:
        """What this long-lived process does for the job's freshly forked one, which would pay
        for every page it writes. An analysis on a model without code is planned here and
        handed to the worker's helper, which computes it warm while the job's process starts
        (:mod:`deepscope.workers.helper`); otherwise an analysis's or prediction's model is
        loaded here (and kept: a job on a model used lately loads nothing), which the job's
        process inherits."""
        if job.func_name not in (RUN_JOB, PREDICT):
            yield
            return
        config = runtime.config()
        backend = runtime.backend(self.connection)
        conn, run = self._hand_over(backend, job) if job.func_name == RUN_JOB else (None, None)
        if conn is None and config.model_cache > 0:
            try:
                model_cache.prefetch(backend, job_model(backend.records, job))
            except (RedisError, ValueError) as exc:
                self.log.info("Worker %s: job %s: model not read ahead: %s", self.name, job.id, exc)
        config.helper, config.helper_run = conn, run
        config.helper_pid = self.helper.pid if conn is not None and self.helper else None
        try:
            yield
        finally:
            config.helper, config.helper_pid, config.helper_run = None, None, None
            if conn is not None and self.helper is not None:
                self.helper.release(conn)
            if run is not None:
                discard(backend, run)

    def _hand_over(self, backend: Backend, job: Job) -> tuple[socket.socket | None, Run | None]:
        """The analysis job planned and handed to the helper → (the job's connection to it,
        the run); (None, None) when it stays with the job (no helper, a model with code, any
        error: the job meets it again and reports it)."""
        args = list(job.args or [])
        if self.helper is None or not args or not isinstance(args[0], str):
            return None, None
        try:
            rec = backend.records.get_job(args[0])
            model = backend.records.get_model(rec.model_id) if rec is not None else None
            if rec is None or model is None or model.format in CODE_FORMATS:
                return None, None
            run = plan(backend, rec, model)
        except (RedisError, ValueError, OSError) as exc:
            self.log.info("Worker %s: job %s: not handed to the helper: %s", self.name, job.id, exc)
            return None, None
        conn = self.helper.connect()
        if conn is None or not start_run(conn, run):
            if conn is not None:
                self.helper.release(conn)
            discard(backend, run)
            return None, None
        return conn, run

    # --- stopping: warm (finish the job within the grace period, else queue it again), cold

    def handle_warm_shutdown_request(self) -> None:
        """SIGTERM / SIGINT (RQ's warm shutdown): RQ lets the current job finish and then
        stops; past ``worker_grace_s`` the job is stopped and queued again, so a rolling
        restart loses nothing and waits a bounded time."""
        super().handle_warm_shutdown_request()  # type: ignore[no-untyped-call]
        job = self._current
        if job is None or self._grace_timer is not None:
            return
        grace = self.deepscope_settings.worker_grace_s
        self.log.info(
            "Worker %s: job %s may finish within %.0f s (DEEPSCOPE_WORKER_GRACE_S); "
            "then it is queued again",
            self.name,
            job.id,
            grace,
        )
        self._grace_timer = threading.Timer(grace, self._grace_over, args=(job.id,))
        self._grace_timer.daemon = True
        self._grace_timer.start()

    def _grace_over(self, job_id: str) -> None:
        """(Timer thread) The grace period ran out with the job still running."""
        job = self._current
        if job is None or job.id != job_id:
            return
        grace = self.deepscope_settings.worker_grace_s
        reason = f"its worker was stopped and the job ran past the {grace:.0f} s grace period"
        if self.horse_pid:
            # The main thread sees its process die and queues it again (monitor_work_horse).
            self._interrupted = job.id
            self.log.warning("Worker %s: %s: stopping job %s", self.name, reason, job.id)
            self.kill_horse()
            return
        # In this process (an in-process worker): it cannot be interrupted safely, so it is
        # queued again from here and the process ends at once, its run with it.
        self._requeue(job, reason)
        self._exit_now()

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        """A second SIGTERM / SIGINT (RQ's cold shutdown): stop the job now, queue it again."""
        asked = self._shutdown_requested_date
        if asked is not None and (now() - asked).total_seconds() < 1:
            return  # RQ ignores a repeat within a second (a pool's signal and the terminal's)
        job = self._current
        if job is not None:
            reason = "its worker was stopped at once (a second stop signal)"
            if self.horse_pid:
                self.kill_horse()
                self.wait_for_horse()
                self._horse_pid = 0
                self._requeue(job, reason)
            else:
                self._requeue(job, reason)
                self._exit_now()
        super().request_force_stop(signum, frame)

    def _requeue(self, job: Job, reason: str) -> None:
        try:
            requeue_interrupted(self.connection, self.deepscope_settings, job, reason)
        except Exception:  # best effort: the reaper settles it once this worker is silent
            self.log.exception("Worker %s: could not queue job %s again", self.name, job.id)

    def _exit_now(self) -> None:
        """End this process now, deregistered (its in-process job was queued again)."""
        with contextlib.suppress(Exception):
            forget(self.connection, self.name)
            self.register_death()  # type: ignore[no-untyped-call]
        logging.shutdown()
        os._exit(0)

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        super().maintain_heartbeats(job, execution)
        timeout = job.timeout
        if not self.horse_pid or timeout is None or timeout <= 0 or job.started_at is None:
            return
        running = (now() - job.started_at).total_seconds()
        if running > timeout + KILL_GRACE_S and job.id not in self._timed_out:
            self.log.warning(
                "Worker %s: job %s ran %.0f s, past its limit of %d s: killing its process",
                self.name,
                job.id,
                running,
                timeout,
            )
            self._timed_out.add(job.id)
            self.kill_horse()

    def handle_work_horse_killed(
        self, job: Job, retpid: int | None, ret_val: int | None, rusage: Any
    ) -> None:
        self._horse_death = (ret_val, rusage)
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)  # type: ignore[no-untyped-call]

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Execution) -> None:
        super().monitor_work_horse(job, queue, execution)
        if self._interrupted == job.id:
            # Stopped at the end of the grace period: queued again, no retry spent.
            self._interrupted = None
            self._horse_death = None
            self._timed_out.discard(job.id)
            grace = self.deepscope_settings.worker_grace_s
            self._requeue(
                job, f"its worker was stopped and the job ran past the {grace:.0f} s grace period"
            )
            return
        timed_out = job.id in self._timed_out
        self._timed_out.discard(job.id)
        if self._horse_death is None and not timed_out:
            return
        ret_val, rusage = self._horse_death or (None, None)
        self._horse_death = None
        if timed_out:
            death = Death("it ran past its time limit", timed_out_after=int(job.timeout or 0))
        else:
            if ret_val is not None and os.WIFSIGNALED(ret_val):
                how = f"killed by {_signal_name(os.WTERMSIG(ret_val))}"
            elif ret_val is not None and os.WIFEXITED(ret_val):
                how = f"exited with code {os.WEXITSTATUS(ret_val)}"
            else:
                how = "lost"
            used = getattr(rusage, "ru_maxrss", 0) or 0
            memory = f" after using {used // 1024} MiB" if used else ""
            death = Death(f"the job's process was {how}{memory}")
        try:
            recover_rq_job(self.connection, self.deepscope_settings, job, death)
        except Exception:  # settling is best effort: the reaper and the API try again
            self.log.exception("Worker %s: could not settle job %s", self.name, job.id)


class InProcessWorker(ForkingWorker):
    """Runs jobs in its own process (models stay loaded on the device), except jobs on
    code-bearing models, which get a forked, limited process on the CPU."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self._isolate(job):
            super().execute_job(job, queue)
            return
        # SimpleWorker's way: in this process.
        self._current = job
        try:
            SimpleWorker.execute_job(self, job, queue)  # type: ignore[arg-type]
        finally:
            self._current = None

    def _isolate(self, job: Job) -> bool:
        try:
            model = job_model(Records(self.connection), job)
        except (RedisError, ValueError):
            return True  # when in doubt, the safe way
        return model is not None and model.format in CODE_FORMATS

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        if self.horse_pid:
            return super().get_heartbeat_ttl(job, working_time)
        return SimpleWorker.get_heartbeat_ttl(self, job, working_time)  # type: ignore[arg-type]

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        # Without a horse, RQ's kill would signal this process's own group.
        if self.horse_pid:
            super().kill_horse(sig)

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        import torch

        from deepscope.workers import runtime

        # A forked child must not touch a CUDA context it inherited, nor GNU OpenMP's threads:
        # this process may have computed on several (after which a forked child hangs in its
        # first parallel region), so the child computes on one.
        torch.set_num_threads(1)
        runtime.configure(device="cpu", model_cache=0)
        super().main_work_horse(job, queue)


class Supervisor:
    """The heartbeat and reaper thread of one worker process."""

    def __init__(self, settings: Settings, worker_name: str) -> None:
        self.settings = settings
        self.worker_name = worker_name
        self.redis = connect(settings.resolved_redis_url(), retry_for_s=1.0)
        self.interval = max(1.0, settings.worker_dead_after_s / 5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deepscope-supervisor", daemon=True)

    def start(self) -> None:
        beat(self.redis, self.worker_name)  # known before the first job
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(RedisError):
            forget(self.redis, self.worker_name)

    def _run(self) -> None:
        streak_since: float | None = time.monotonic()
        failing = False
        while not self._stop.wait(self.interval):
            try:
                beat(self.redis, self.worker_name)
                if streak_since is None:
                    streak_since = time.monotonic()
                failing = False
                # After an outage every worker looks silent until its next beat: judge others
                # only once this one has been getting through for a whole dead-after period.
                if time.monotonic() - streak_since >= self.settings.worker_dead_after_s:
                    settled = reap_as_leader(
                        self.redis, self.settings, self.worker_name, ttl_s=3 * self.interval
                    )
                    if settled:
                        log.warning("settled %d job(s) of dead workers: %s", len(settled), settled)
            except RedisError as exc:
                streak_since = None
                if not failing:
                    log.warning("heartbeat: Redis unreachable (%s); retrying", exc)
                failing = True
            except Exception:
                log.exception("heartbeat: unexpected error")
