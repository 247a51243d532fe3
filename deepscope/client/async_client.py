"""The SDK for asyncio: :class:`AsyncClient` has :class:`~deepscope.client.Client`'s methods as
coroutines (and ``iter_jobs``/``iter_models`` as async iterators).

::

    async with AsyncClient(url, key) as ds:
        job = await ds.wait(await ds.submit(model_id, "signal_space"), progress=False)

Both clients build their requests, read their answers and decide their retries and waits with
the same code (``deepscope.client._core``); this one only sends with ``httpx.AsyncClient`` and
sleeps with ``asyncio.sleep``. File uploads are read from disk by httpx's multipart encoder
(blocking reads, as httpx does for files in async code).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
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

__all__ = ["AsyncClient"]


class AsyncClient:
    """A connection to one deepscope service for asyncio; ``async with`` it (or ``await
    aclose()``). The arguments are :class:`~deepscope.client.Client`'s."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int | RetryPolicy = 4,
        unreachable_timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries)
        self.unreachable_timeout = unreachable_timeout
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=_core.auth_headers(key),
            timeout=timeout,
            transport=transport,
        )

    @classmethod
    def from_env(cls, url: str | None = None, key: str | None = None, **kwargs: Any) -> AsyncClient:
        """A client for :func:`resolve_credentials`' URL and key."""
        resolved_url, resolved_key = resolve_credentials(url, key)
        return cls(resolved_url, resolved_key, **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- transport ------------------------------------------------------------------------

    async def _send(self, request: Request) -> httpx.Response:
        """``Client._send`` for asyncio: the same retries."""
        attempt = 0
        while True:
            headers: httpx.Headers | None = None
            try:
                with request.httpx_kwargs() as kwargs:
                    resp = await self._http.request(request.method, request.path, **kwargs)
            except httpx.TransportError as exc:
                error = _core.transport_error(self.url, request.method, request.path, exc)
            else:
                if resp.status_code < 400:
                    return resp
                error, headers = _core.response_error(resp), resp.headers
            delay = self.retry.delay(request, attempt, error, headers)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def _get(self, path: str, params: list[tuple[str, str]] | None = None) -> Any:
        return (await self._send(Request("GET", path, params=params or []))).json()

    async def _download(self, request: Request, target: Path) -> Path:
        """Stream a GET to ``target`` (written whole or not at all), with retries."""
        tmp = _core.part_file(target)
        attempt = 0
        try:
            while True:
                headers: httpx.Headers | None = None
                try:
                    with request.httpx_kwargs() as kwargs:
                        async with self._http.stream(
                            request.method, request.path, **kwargs
                        ) as resp:
                            if resp.status_code < 400:
                                with tmp.open("wb") as f:
                                    async for chunk in resp.aiter_bytes(_core.CHUNK):
                                        f.write(chunk)
                                tmp.replace(target)
                                return target
                            await resp.aread()
                            error, headers = _core.response_error(resp), resp.headers
                except httpx.TransportError as exc:
                    error = _core.transport_error(self.url, request.method, request.path, exc)
                delay = self.retry.delay(request, attempt, error, headers)
                if delay is None:
                    raise error
                await asyncio.sleep(delay)
                attempt += 1
        finally:
            tmp.unlink(missing_ok=True)

    # --- service --------------------------------------------------------------------------

    async def ready(self) -> ReadyOut:
        try:
            resp = await self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise _core.transport_error(self.url, "GET", "/readyz", exc) from None
        return ReadyOut.model_validate(resp.json())

    async def archs(self) -> list[str]:
        return [str(a) for a in await self._get("/v1/archs")]

    async def report_url(self, job: str | JobOut | None = None, *, ttl: int = 3600) -> str:
        params = [("ttl", str(ttl))]
        if job is not None:
            params.append(("job_id", ident(job)))
        return self.url + LinkOut.model_validate(await self._get("/v1/ui/link", params)).url

    async def report_html(self, job: str | JobOut, *, standalone: bool = True) -> str:
        params = [("standalone", "true")] if standalone else []
        request = Request("GET", f"/v1/jobs/{ident(job)}/report", params=params)
        return (await self._send(request)).text

    # --- models ---------------------------------------------------------------------------

    async def upload_model(
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
        model = ModelOut.model_validate((await self._send(request)).json())
        return await self.wait_model(model.id, timeout=timeout) if wait else model

    async def get_model(self, model: str | ModelOut) -> ModelOut:
        return ModelOut.model_validate(await self._get(f"/v1/models/{ident(model)}"))

    async def list_models(
        self,
        *,
        status: ModelStatus | str | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[ModelOut]:
        request = _core.list_models_request(
            status=status, labels=labels, limit=limit, cursor=cursor
        )
        return _core.model_page((await self._send(request)).json())

    async def iter_models(
        self,
        *,
        status: ModelStatus | str | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[ModelOut]:
        cursor: str | None = None
        while True:
            page = await self.list_models(status=status, labels=labels, limit=limit, cursor=cursor)
            for model in page:
                yield model
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def delete_model(self, model: str | ModelOut) -> None:
        await self._send(Request("DELETE", f"/v1/models/{ident(model)}"))

    async def wait_model(
        self, model: str | ModelOut, *, timeout: float = 300.0, poll: float = 0.1
    ) -> ModelOut:
        clock = ModelWait(timeout, poll, self.unreachable_timeout)
        while True:
            try:
                current = await self.get_model(model)
            except DeepscopeError as exc:
                await asyncio.sleep(clock.tolerate(exc))
                continue
            interval = clock.next(current)
            if interval is None:
                return current
            await asyncio.sleep(interval)

    # --- prediction -----------------------------------------------------------------------

    async def predict(
        self,
        model: str | ModelOut,
        images: ImagesArg,
        *,
        top_k: int = 5,
        timeout: float = 300.0,
    ) -> list[Prediction]:
        resp = await self._send(_core.predict_request(model, images, top_k))
        if resp.status_code == 200:
            return PredictOut.model_validate(resp.json()).predictions
        job = await self.wait(JobOut.model_validate(resp.json()), progress=False, timeout=timeout)
        assert job.result is not None
        return job.result.metrics_as(PredictMetrics).predictions

    # --- datasets -------------------------------------------------------------------------

    async def upload_dataset(self, path: str | Path, *, name: str | None = None) -> DatasetOut:
        request = _core.upload_dataset_request(path, name)
        return DatasetOut.model_validate((await self._send(request)).json())

    async def list_datasets(self) -> list[DatasetOut]:
        out: list[DatasetOut] = []
        cursor: str | None = None
        while True:
            resp = await self._send(_core.list_datasets_request(cursor))
            page = _core.dataset_page(resp.json())
            out += page.items
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    async def delete_dataset(self, dataset: str | DatasetOut) -> None:
        await self._send(Request("DELETE", f"/v1/datasets/{ident(dataset)}"))

    # --- jobs -----------------------------------------------------------------------------

    async def submit(
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
        return JobOut.model_validate((await self._send(request)).json())

    async def get_job(self, job: str | JobOut, *, wait: float = 0.0) -> JobOut:
        """The job now; with ``wait``, when it ends or after ``wait`` seconds (≤ 50)."""
        params = [("wait", f"{wait:g}")] if wait > 0 else None
        return JobOut.model_validate(await self._get(f"/v1/jobs/{ident(job)}", params))

    async def list_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        analysis: str | None = None,
        model_id: str | ModelOut | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[JobOut]:
        request = _core.list_jobs_request(
            status=status,
            analysis=analysis,
            model_id=model_id,
            labels=labels,
            limit=limit,
            cursor=cursor,
        )
        return _core.job_page((await self._send(request)).json())

    async def iter_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        analysis: str | None = None,
        model_id: str | ModelOut | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[JobOut]:
        cursor: str | None = None
        while True:
            page = await self.list_jobs(
                status=status,
                analysis=analysis,
                model_id=model_id,
                labels=labels,
                limit=limit,
                cursor=cursor,
            )
            for job in page:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job: str | JobOut) -> JobOut:
        resp = await self._send(Request("DELETE", f"/v1/jobs/{ident(job)}"))
        return JobOut.model_validate(resp.json())

    async def wait(
        self,
        job: str | JobOut,
        *,
        progress: bool = False,
        timeout: float | None = None,
        raise_on_failure: bool = True,
        poll: float = 0.05,
    ) -> JobOut:
        """``Client.wait`` as a coroutine (no progress bar unless asked: async code is rarely
        a terminal's foreground)."""
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
                        else await self.get_job(clock.job_id, wait=clock.hold())
                    )
                except DeepscopeError as exc:
                    await asyncio.sleep(clock.tolerate(exc))
                    continue
                update(current)
                interval = clock.next(current, time.monotonic() - started)
                if interval is None:
                    break
                await asyncio.sleep(interval)
        return clock.outcome(current, raise_on_failure)

    async def compare(self, job: str | JobOut, baseline: str | JobOut) -> CompareOut:
        from deepscope.contract.compare import CompareOut

        resp = await self._send(_core.compare_request(job, baseline))
        return CompareOut.model_validate(resp.json())

    async def _finished(self, job: str | JobOut) -> JobOut:
        if isinstance(job, JobOut) and job.result is not None:
            return job
        current = await self.get_job(job)
        if current.result is None:
            raise _core.no_artifacts_error(current)
        return current

    async def download_artifacts(self, job: str | JobOut, out_dir: str | Path) -> list[Path]:
        current = await self._finished(job)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for url, target in _core.artifact_targets(current, out):
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(await self._download(Request("GET", url), target))
        _core.write_result_json(current, out, written)
        return written

    async def download_bundle(self, job: str | JobOut, path: str | Path) -> Path:
        target = _core.bundle_target(ident(job), path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return await self._download(Request("GET", f"/v1/jobs/{ident(job)}/bundle"), target)

    async def log_to_mlflow(self, job: str | JobOut, *, run_id: str | None = None) -> str:
        """``Client.log_to_mlflow``; MLflow's own (blocking) calls run in a thread."""
        from deepscope.client import mlflow as ds_mlflow

        ds_mlflow.require_mlflow()
        current = await self._finished(job)
        with tempfile.TemporaryDirectory(prefix="deepscope-mlflow-") as tmp:
            artifacts = Path(tmp) / "artifacts"
            await self.download_artifacts(current, artifacts)
            report = await self.report_html(current, standalone=True)
            return await asyncio.to_thread(
                ds_mlflow.log_job, current, artifacts, report, run_id=run_id
            )
