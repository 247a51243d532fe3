"""The Python SDK of the deepscope service: a typed httpx client.

::

    from deepscope.client import Client

    with Client("http://127.0.0.1:8000", key) as ds:
        model = ds.wait_model(ds.upload_model("fcnn1.safetensors").id)
        job = ds.wait(ds.submit(model.id, "signal_space", labels={"git_sha": "3f2a9c1"}))
        print(job.result.metrics["layers"][0]["condition_number"])
        ds.download_artifacts(job, "out/fcnn1")

Results are the service's own schemas (pydantic models). Every error the server answers is a
:class:`DeepscopeError` carrying its status code, ``detail`` and problem ``type``; an
unreachable server, a job that failed and a wait that timed out are too (``status_code``
None). Connection errors and 502/503/504 are retried with backoff for requests that are safe to
repeat (GET, DELETE, and the uploads and submits, which carry an Idempotency-Key), and polled
through while waiting. :class:`~deepscope.client.AsyncClient` is the same client for asyncio
(both build their requests and read their answers with ``deepscope.client._core``). Never
imports torch.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import httpx

from deepscope.client import _core
from deepscope.client._core import (
    DEFAULT_URL,
    DeepscopeError,
    JobWait,
    ModelWait,
    Page,
    Request,
    RetryPolicy,
    ident,
    resolve_credentials,
)
from deepscope.contract import (
    DatasetOut,
    JobOut,
    JobStatus,
    LinkOut,
    ModelOut,
    ModelStatus,
    Prediction,
    PredictMetrics,
    PredictOut,
    ReadyOut,
)
from deepscope.manifest import Manifest, ModelFormat

if TYPE_CHECKING:
    from deepscope.client._core import ImagesArg
    from deepscope.contract.compare import CompareOut

__all__ = [
    "DEFAULT_URL",
    "Client",
    "DeepscopeError",
    "Page",
    "RetryPolicy",
    "resolve_credentials",
]


class Client:
    """A connection to one deepscope service; use it as a context manager (or call close).

    ``retries``: more attempts for a request that met a connection error or a 502/503/504
    (``RetryPolicy`` for the details); ``unreachable_timeout``: how long ``wait`` keeps polling
    a service that does not answer (a restart, a deploy) before it gives up.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int | RetryPolicy = 4,
        unreachable_timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries)
        self.unreachable_timeout = unreachable_timeout
        self._http = httpx.Client(
            base_url=self.url,
            headers=_core.auth_headers(key),
            timeout=timeout,
            transport=transport,
        )

    @classmethod
    def from_env(cls, url: str | None = None, key: str | None = None, **kwargs: Any) -> Client:
        """A client for :func:`resolve_credentials`' URL and key."""
        resolved_url, resolved_key = resolve_credentials(url, key)
        return cls(resolved_url, resolved_key, **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- transport ------------------------------------------------------------------------

    def _send(self, request: Request) -> httpx.Response:
        """Send ``request``, retrying transient failures as :attr:`retry` allows; an error
        answer raises DeepscopeError."""
        attempt = 0
        while True:
            headers: httpx.Headers | None = None
            try:
                with request.httpx_kwargs() as kwargs:
                    resp = self._http.request(request.method, request.path, **kwargs)
            except httpx.TransportError as exc:
                error = _core.transport_error(self.url, request.method, request.path, exc)
            else:
                if resp.status_code < 400:
                    return resp
                error, headers = _core.response_error(resp), resp.headers
            delay = self.retry.delay(request, attempt, error, headers)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def _get(self, path: str, params: list[tuple[str, str]] | None = None) -> Any:
        return self._send(Request("GET", path, params=params or [])).json()

    def _download(self, request: Request, target: Path) -> Path:
        """Stream a GET to ``target`` (written whole or not at all), with retries."""
        tmp = _core.part_file(target)
        attempt = 0
        try:
            while True:
                headers: httpx.Headers | None = None
                try:
                    with (
                        request.httpx_kwargs() as kwargs,
                        self._http.stream(request.method, request.path, **kwargs) as resp,
                    ):
                        if resp.status_code < 400:
                            with tmp.open("wb") as f:
                                for chunk in resp.iter_bytes(_core.CHUNK):
                                    f.write(chunk)
                            tmp.replace(target)
                            return target
                        resp.read()
                        error, headers = _core.response_error(resp), resp.headers
                except httpx.TransportError as exc:
                    error = _core.transport_error(self.url, request.method, request.path, exc)
                delay = self.retry.delay(request, attempt, error, headers)
                if delay is None:
                    raise error
                time.sleep(delay)
                attempt += 1
        finally:
            tmp.unlink(missing_ok=True)

    # --- service --------------------------------------------------------------------------

    def ready(self) -> ReadyOut:
        """``/readyz``: Redis and workers per queue (answered even when not ready)."""
        try:
            resp = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise _core.transport_error(self.url, "GET", "/readyz", exc) from None
        return ReadyOut.model_validate(resp.json())

    def archs(self) -> list[str]:
        """Architectures the workers can build (a manifest's ``arch``)."""
        return [str(a) for a in self._get("/v1/archs")]

    def report_url(self, job: str | JobOut | None = None, *, ttl: int = 3600) -> str:
        """A signed, read-only link (valid ``ttl`` seconds) to a job's report page, or to the
        index of models and jobs without a job: open it in a browser."""
        params = [("ttl", str(ttl))]
        if job is not None:
            params.append(("job_id", ident(job)))
        return self.url + LinkOut.model_validate(self._get("/v1/ui/link", params)).url

    def report_html(self, job: str | JobOut, *, standalone: bool = True) -> str:
        """A job's report page (HTML). ``standalone`` (the default): one self-contained file,
        pictures, charts and their data inside, that opens from disk with no server (e.g. an
        artifact of a CI run); else the page as the service shows it, whose pictures are links
        to the service."""
        params = [("standalone", "true")] if standalone else []
        return self._send(Request("GET", f"/v1/jobs/{ident(job)}/report", params=params)).text

    # --- models ---------------------------------------------------------------------------

    def upload_model(
        self,
        path: str | Path,
        manifest: Manifest | dict[str, Any] | str | Path | None = None,
        *,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        input_shape: Sequence[int] | None = None,
        format: ModelFormat | str | None = None,
        class_names: Sequence[str] | None = None,
        normalization: dict[str, list[float]] | None = None,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 300.0,
    ) -> ModelOut:
        """Upload a model file; it is ``validating`` until a worker checked it (``wait=True``
        returns once it is ``ready`` or ``invalid``).

        The manifest is ``manifest`` (an object, a dict, or a JSON file), else the one beside
        the file (``model.json`` for ``model.safetensors``, as ``deepscope train`` writes),
        else built from the keyword arguments; given keywords override its fields. The format
        defaults to the file's suffix (``.safetensors``; ``.pt``/``.pth``: a state_dict).
        ``labels`` (git SHA, branch, …) are what lists filter by. The upload carries an
        Idempotency-Key (``idempotency_key``, else a fresh one), so a retry after a lost
        answer returns the same model; a file the tenant already uploaded with the same
        manifest comes back as that model.
        """
        request = _core.upload_model_request(
            path,
            manifest,
            arch=arch,
            arch_kwargs=arch_kwargs,
            input_shape=input_shape,
            format=format,
            class_names=class_names,
            normalization=normalization,
            name=name,
            labels=labels,
            idempotency_key=idempotency_key,
        )
        model = ModelOut.model_validate(self._send(request).json())
        return self.wait_model(model.id, timeout=timeout) if wait else model

    def get_model(self, model: str | ModelOut) -> ModelOut:
        return ModelOut.model_validate(self._get(f"/v1/models/{ident(model)}"))

    def list_models(
        self,
        *,
        status: ModelStatus | str | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[ModelOut]:
        """One page of models, newest first (iterate it; ``.next_cursor`` for the next page),
        filtered by status and labels (every one must match)."""
        request = _core.list_models_request(
            status=status, labels=labels, limit=limit, cursor=cursor
        )
        return _core.model_page(self._send(request).json())

    def iter_models(
        self,
        *,
        status: ModelStatus | str | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> Iterator[ModelOut]:
        """Every model that matches, page after page (``limit``: the page size)."""
        cursor: str | None = None
        while True:
            page = self.list_models(status=status, labels=labels, limit=limit, cursor=cursor)
            yield from page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def delete_model(self, model: str | ModelOut) -> None:
        self._send(Request("DELETE", f"/v1/models/{ident(model)}"))

    def wait_model(
        self, model: str | ModelOut, *, timeout: float = 300.0, poll: float = 0.1
    ) -> ModelOut:
        """Poll until the model is ``ready`` or ``invalid`` (returned either way: check
        ``.status`` and ``.error``); DeepscopeError after ``timeout`` seconds."""
        clock = ModelWait(timeout, poll, self.unreachable_timeout)
        while True:
            try:
                current = self.get_model(model)
            except DeepscopeError as exc:
                time.sleep(clock.tolerate(exc))
                continue
            interval = clock.next(current)
            if interval is None:
                return current
            time.sleep(interval)

    # --- prediction -----------------------------------------------------------------------

    def predict(
        self,
        model: str | ModelOut,
        images: ImagesArg,
        *,
        top_k: int = 5,
        timeout: float = 300.0,
    ) -> list[Prediction]:
        """What the model says about each image: PNG paths, one ``.npz`` path (``images``
        (N,H,W) or (N,C,H,W), uint8 or float in [0, 1]), or such an array. Small batches are
        answered within the request; larger ones run as a job, which this waits for."""
        resp = self._send(_core.predict_request(model, images, top_k))
        if resp.status_code == 200:
            return PredictOut.model_validate(resp.json()).predictions
        job = self.wait(JobOut.model_validate(resp.json()), progress=False, timeout=timeout)
        assert job.result is not None
        return job.result.metrics_as(PredictMetrics).predictions

    # --- datasets -------------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, *, name: str | None = None) -> DatasetOut:
        """Upload an ``.npz`` with ``images`` (N,H,W or N,C,H,W) and ``labels`` (N,)."""
        request = _core.upload_dataset_request(path, name)
        return DatasetOut.model_validate(self._send(request).json())

    def list_datasets(self) -> list[DatasetOut]:
        """The built-ins and this tenant's uploads (every page)."""
        out: list[DatasetOut] = []
        cursor: str | None = None
        while True:
            page = _core.dataset_page(self._send(_core.list_datasets_request(cursor)).json())
            out += page.items
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    def delete_dataset(self, dataset: str | DatasetOut) -> None:
        self._send(Request("DELETE", f"/v1/datasets/{ident(dataset)}"))

    # --- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        model: str | ModelOut,
        analysis: str,
        params: dict[str, Any] | None = None,
        dataset: str | DatasetOut | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        wait: float = 0.0,
    ) -> JobOut:
        """Queue an analysis (a result computed before for the same inputs comes back at once,
        ``cached`` and ``succeeded``).

        ``labels`` tag the job for lists; ``callback_url`` receives the final job, signed,
        when it ends (its host must be allowed by the deployment). The request carries an
        Idempotency-Key (``idempotency_key``, else a fresh one per call): a retry after a lost
        answer, or a rerun of a pipeline step with the same key, returns the same job.
        ``wait`` (seconds, ≤ 50): the service answers when the job ends, or after that long,
        whichever is first (``Prefer: wait``): submit and wait in one request, then
        :meth:`wait` (which sends nothing for a job that ended) if it is still running.
        """
        request = _core.submit_request(
            model,
            analysis,
            params,
            dataset,
            labels=labels,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            wait=_core.held(wait, self._http.timeout.read),
        )
        return JobOut.model_validate(self._send(request).json())

    def get_job(self, job: str | JobOut, *, wait: float = 0.0) -> JobOut:
        """The job now; with ``wait``, when it ends or after ``wait`` seconds (≤ 50)."""
        params = [("wait", f"{wait:g}")] if wait > 0 else None
        return JobOut.model_validate(self._get(f"/v1/jobs/{ident(job)}", params))

    def list_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        analysis: str | None = None,
        model_id: str | ModelOut | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[JobOut]:
        """One page of jobs, newest first, without their results (iterate it;
        ``.next_cursor`` for the next page). Filters apply before the limit."""
        request = _core.list_jobs_request(
            status=status,
            analysis=analysis,
            model_id=model_id,
            labels=labels,
            limit=limit,
            cursor=cursor,
        )
        return _core.job_page(self._send(request).json())

    def iter_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        analysis: str | None = None,
        model_id: str | ModelOut | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> Iterator[JobOut]:
        """Every job that matches, page after page (``limit``: the page size)."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(
                status=status,
                analysis=analysis,
                model_id=model_id,
                labels=labels,
                limit=limit,
                cursor=cursor,
            )
            yield from page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job: str | JobOut) -> JobOut:
        """Cancel a queued job or stop a running one (409 ``job_finished`` when it already
        finished)."""
        return JobOut.model_validate(self._send(Request("DELETE", f"/v1/jobs/{ident(job)}")).json())

    def wait(
        self,
        job: str | JobOut,
        *,
        progress: bool = True,
        timeout: float | None = None,
        raise_on_failure: bool = True,
        poll: float = 0.05,
    ) -> JobOut:
        """Wait until the job finished: each request is held by the service until the job
        ends (long polling, ``GET /v1/jobs/{id}?wait=``: told within a Redis round trip of
        the end), or a few seconds with ``progress`` (a progress bar on stderr); a service
        that does not hold requests is polled at intervals from ``poll`` growing to 1 s. A
        service that stops answering for a while (connection errors, 502/503/504) is polled
        through for up to ``unreachable_timeout``.

        Returns the finished job with its result. DeepscopeError (``.job`` set) when it failed
        or was canceled (unless ``raise_on_failure`` is False), or after ``timeout`` seconds.
        """
        clock = JobWait(
            job,
            timeout,
            poll,
            self.unreachable_timeout,
            progress=progress,
            http_timeout=self._http.timeout.read,
        )
        with _core.progress_bar(progress, clock.job_id, job) as update:
            while True:
                try:
                    started = time.monotonic()
                    current = (
                        clock.known
                        if clock.known is not None
                        else self.get_job(clock.job_id, wait=clock.hold())
                    )
                except DeepscopeError as exc:
                    time.sleep(clock.tolerate(exc))
                    continue
                update(current)
                interval = clock.next(current, time.monotonic() - started)
                if interval is None:
                    break
                time.sleep(interval)
        return clock.outcome(current, raise_on_failure)

    def compare(self, job: str | JobOut, baseline: str | JobOut) -> CompareOut:
        """Every numeric metric of ``job`` against ``baseline``'s (the same analysis), per
        layer (matched by name; unmatched layers listed) and for the whole job."""
        from deepscope.contract.compare import CompareOut

        return CompareOut.model_validate(self._send(_core.compare_request(job, baseline)).json())

    def _finished(self, job: str | JobOut) -> JobOut:
        """The job with its result (fetched unless given with one)."""
        current = job if isinstance(job, JobOut) and job.result is not None else self.get_job(job)
        if current.result is None:
            raise _core.no_artifacts_error(current)
        return current

    def download_artifacts(self, job: str | JobOut, out_dir: str | Path) -> list[Path]:
        """Write the job's ``result.json`` and every artifact under ``out_dir`` (created);
        returns the files written. The job must have succeeded."""
        current = self._finished(job)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for url, target in _core.artifact_targets(current, out):
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(self._download(Request("GET", url), target))
        _core.write_result_json(current, out, written)
        return written

    def download_bundle(self, job: str | JobOut, path: str | Path) -> Path:
        """One zip of the job's ``result.json``, its artifacts and its self-contained
        ``report.html``, written to ``path`` (a directory: ``path/<job id>.zip``). The job must
        have succeeded (409 ``job_not_succeeded`` otherwise)."""
        target = _core.bundle_target(ident(job), path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return self._download(Request("GET", f"/v1/jobs/{ident(job)}/bundle"), target)

    def log_to_mlflow(self, job: str | JobOut, *, run_id: str | None = None) -> str:
        """Log a succeeded job to MLflow: every layer's metrics as
        ``<analysis>/<layer>/<metric>``, its params, artifacts (under ``deepscope/<job id>/``)
        and standalone ``report.html``. The run: ``run_id``, else the active run, else
        ``MLFLOW_RUN_ID``, else a new one (in ``MLFLOW_EXPERIMENT_NAME``) that is ended after.
        Returns the run's id. Needs ``pip install 'deepscope[mlflow]'``."""
        from deepscope.client import mlflow as ds_mlflow

        ds_mlflow.require_mlflow()
        current = self._finished(job)
        with tempfile.TemporaryDirectory(prefix="deepscope-mlflow-") as tmp:
            artifacts = Path(tmp) / "artifacts"
            self.download_artifacts(current, artifacts)
            report = self.report_html(current, standalone=True)
            return ds_mlflow.log_job(current, artifacts, report, run_id=run_id)
