"""The Python SDK of the deepscope service: a typed httpx client.

::

    from deepscope.client import Client

    with Client("http://127.0.0.1:8000", key) as ds:
        model = ds.wait_model(ds.upload_model("fcnn1.safetensors").id)
        job = ds.wait(ds.submit(model.id, "signal_space"))
        print(job.result.metrics["layers"][0]["condition_number"])
        ds.download_artifacts(job, "out/fcnn1")

Results are the service's own schemas (pydantic models). Every error the server answers is a
:class:`DeepscopeError` carrying its status code and ``detail``; an unreachable server, a job
that failed and a wait that timed out are too (``status_code`` None). Never imports torch.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, Self

import httpx
import numpy as np
from pydantic import ValidationError

from deepscope.contract import (
    DatasetList,
    DatasetOut,
    JobList,
    JobOut,
    JobStatus,
    LinkOut,
    ModelList,
    ModelOut,
    ModelStatus,
    Prediction,
    PredictMetrics,
    PredictOut,
    ReadyOut,
)
from deepscope.manifest import Manifest, ModelFormat, manifest_path_for

__all__ = [
    "DEFAULT_URL",
    "Client",
    "DeepscopeError",
    "resolve_credentials",
]

DEFAULT_URL = "http://127.0.0.1:8000"
_FORMATS = {
    ".safetensors": ModelFormat.SAFETENSORS,
    ".pt": ModelFormat.STATE_DICT,
    ".pth": ModelFormat.STATE_DICT,
    ".bin": ModelFormat.STATE_DICT,
    ".pt2": ModelFormat.PT2,
}
_CHUNK = 1024 * 1024

ImagesArg = str | Path | Sequence[str | Path] | np.ndarray


class DeepscopeError(Exception):
    """What went wrong: the server's ``detail`` and HTTP status code (None when no answer came:
    unreachable server, a failed job, a timeout)."""

    def __init__(self, status_code: int | None, detail: str, *, job: JobOut | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        #: The job, for a job that failed or was canceled.
        self.job = job

    def __str__(self) -> str:
        return self.detail if self.status_code is None else f"{self.status_code}: {self.detail}"


def resolve_credentials(url: str | None = None, key: str | None = None) -> tuple[str, str | None]:
    """``url`` / ``key``, else ``DEEPSCOPE_URL`` / ``DEEPSCOPE_API_KEY``, else the local
    defaults: ``http://127.0.0.1:8000`` and the development key that ``deepscope up`` keeps in
    ``$DEEPSCOPE_DATA_DIR/dev-api-key`` (``data/dev-api-key``)."""
    url = url or os.environ.get("DEEPSCOPE_URL") or DEFAULT_URL
    key = key or os.environ.get("DEEPSCOPE_API_KEY") or None
    if key is None:
        dev = Path(os.environ.get("DEEPSCOPE_DATA_DIR") or "data") / "dev-api-key"
        if dev.is_file():
            key = dev.read_text().strip() or None
    return url.rstrip("/"), key


def _id(obj: str | ModelOut | JobOut) -> str:
    return obj if isinstance(obj, str) else obj.id


def _safe_target(out_dir: Path, rel: str) -> Path:
    """``out_dir/rel``, refusing anything that would land outside ``out_dir``."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise DeepscopeError(None, f"refusing the artifact path {rel!r}")
    return out_dir.joinpath(*parts)


class Client:
    """A connection to one deepscope service; use it as a context manager (or call close)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
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

    # --- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise DeepscopeError(None, f"{method} {self.url}{path} timed out ({exc})") from None
        except httpx.TransportError as exc:
            raise DeepscopeError(None, f"cannot reach {self.url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                detail = str(resp.json()["detail"])
            except (ValueError, KeyError, TypeError):
                detail = resp.text.strip()[:500] or resp.reason_phrase
            raise DeepscopeError(resp.status_code, detail)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- service --------------------------------------------------------------------------

    def ready(self) -> ReadyOut:
        """``/readyz``: Redis and workers per queue (answered even when not ready)."""
        try:
            resp = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise DeepscopeError(None, f"cannot reach {self.url}: {exc}") from None
        return ReadyOut.model_validate(resp.json())

    def archs(self) -> list[str]:
        """Architectures the workers can build (a manifest's ``arch``)."""
        return [str(a) for a in self._json("GET", "/v1/archs")]

    def report_url(self, job: str | JobOut | None = None, *, ttl: int = 3600) -> str:
        """A signed, read-only link (valid ``ttl`` seconds) to a job's report page, or to the
        index of models and jobs without a job: open it in a browser."""
        params: dict[str, Any] = {"ttl": ttl}
        if job is not None:
            params["job_id"] = _id(job)
        link = LinkOut.model_validate(self._json("GET", "/v1/ui/link", params=params))
        return self.url + link.url

    def report_html(self, job: str | JobOut, *, standalone: bool = True) -> str:
        """A job's report page (HTML). ``standalone`` (the default): one self-contained file,
        pictures, charts and their data inside, that opens from disk with no server (e.g. an
        artifact of a CI run); else the page as the service shows it, whose pictures are links
        to the service."""
        params = {"standalone": "true"} if standalone else {}
        return self._request("GET", f"/v1/jobs/{_id(job)}/report", params=params).text

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
        wait: bool = False,
        timeout: float = 300.0,
    ) -> ModelOut:
        """Upload a model file; it is ``validating`` until a worker checked it (``wait=True``
        returns once it is ``ready`` or ``invalid``).

        The manifest is ``manifest`` (an object, a dict, or a JSON file), else the one beside
        the file (``model.json`` for ``model.safetensors``, as ``deepscope train`` writes),
        else built from the keyword arguments; given keywords override its fields. The format
        defaults to the file's suffix (``.safetensors``; ``.pt``/``.pth``: a state_dict).
        """
        path = Path(path)
        if not path.is_file():
            raise DeepscopeError(None, f"no such model file: {path}")
        man = self._manifest(path, manifest)
        updates: dict[str, Any] = {
            "arch": arch,
            "arch_kwargs": arch_kwargs,
            "input_shape": tuple(input_shape) if input_shape is not None else None,
            "format": ModelFormat(format) if format is not None else None,
            "class_names": list(class_names) if class_names is not None else None,
            "normalization": normalization,
        }
        raw = man.model_dump(mode="json")
        raw.update({k: v for k, v in updates.items() if v is not None})
        inferred = format is None and manifest is None and path.suffix in _FORMATS
        if inferred and not manifest_path_for(path).is_file():
            raw["format"] = _FORMATS[path.suffix].value
        try:
            man = Manifest.model_validate(raw)
        except ValidationError as exc:
            raise DeepscopeError(None, f"invalid manifest: {exc.errors()[0]['msg']}") from None
        fields = {"manifest": man.model_dump_json(exclude_none=True)}
        if name:
            fields["name"] = name
        with path.open("rb") as f:
            files = {"file": (path.name, f, "application/octet-stream")}
            model = ModelOut.model_validate(
                self._json("POST", "/v1/models", files=files, data=fields)
            )
        return self.wait_model(model.id, timeout=timeout) if wait else model

    @staticmethod
    def _manifest(path: Path, manifest: Manifest | dict[str, Any] | str | Path | None) -> Manifest:
        try:
            if isinstance(manifest, Manifest):
                return manifest
            if isinstance(manifest, dict):
                return Manifest.model_validate(manifest)
            if isinstance(manifest, str | Path):
                return Manifest.read(Path(manifest))
            beside = manifest_path_for(path)
            return Manifest.read(beside) if beside.is_file() else Manifest()
        except ValueError as exc:
            raise DeepscopeError(None, str(exc).splitlines()[0]) from None

    def get_model(self, model: str | ModelOut) -> ModelOut:
        return ModelOut.model_validate(self._json("GET", f"/v1/models/{_id(model)}"))

    def list_models(self) -> list[ModelOut]:
        return ModelList.model_validate(self._json("GET", "/v1/models")).models

    def delete_model(self, model: str | ModelOut) -> None:
        self._request("DELETE", f"/v1/models/{_id(model)}")

    def wait_model(
        self, model: str | ModelOut, *, timeout: float = 300.0, poll: float = 0.1
    ) -> ModelOut:
        """Poll until the model is ``ready`` or ``invalid`` (returned either way: check
        ``.status`` and ``.error``); DeepscopeError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for interval in _backoff(poll):
            current = self.get_model(model)
            if current.status is not ModelStatus.VALIDATING:
                return current
            if time.monotonic() + interval > deadline:
                raise DeepscopeError(
                    None, f"model {current.id} still validating after {timeout:g} s"
                )
            time.sleep(interval)
        raise AssertionError("unreachable")

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
        with ExitStack() as stack:
            files = self._image_files(images, stack)
            resp = self._request(
                "POST", f"/v1/models/{_id(model)}/predict", files=files, params={"top_k": top_k}
            )
        if resp.status_code == 200:
            return PredictOut.model_validate(resp.json()).predictions
        job = self.wait(JobOut.model_validate(resp.json()), progress=False, timeout=timeout)
        assert job.result is not None
        return job.result.metrics_as(PredictMetrics).predictions

    @staticmethod
    def _image_files(images: ImagesArg, stack: ExitStack) -> list[tuple[str, Any]]:
        if isinstance(images, np.ndarray):
            buf = io.BytesIO()
            np.savez(buf, images=images)
            return [("file", ("images.npz", buf.getvalue(), "application/octet-stream"))]
        paths = [Path(images)] if isinstance(images, str | Path) else [Path(p) for p in images]
        if not paths:
            raise DeepscopeError(None, "no images given")
        for p in paths:
            if not p.is_file():
                raise DeepscopeError(None, f"no such image file: {p}")
        if len(paths) == 1 and paths[0].suffix == ".npz":
            f: IO[bytes] = stack.enter_context(paths[0].open("rb"))
            return [("file", (paths[0].name, f, "application/octet-stream"))]
        out: list[tuple[str, Any]] = []
        for p in paths:
            f = stack.enter_context(p.open("rb"))
            out.append(("files", (p.name, f, "image/png")))
        return out

    # --- datasets -------------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, *, name: str | None = None) -> DatasetOut:
        """Upload an ``.npz`` with ``images`` (N,H,W or N,C,H,W) and ``labels`` (N,)."""
        path = Path(path)
        if not path.is_file():
            raise DeepscopeError(None, f"no such dataset file: {path}")
        with path.open("rb") as f:
            return DatasetOut.model_validate(
                self._json(
                    "POST",
                    "/v1/datasets",
                    files={"file": (path.name, f, "application/octet-stream")},
                    data={"name": name} if name else {},
                )
            )

    def list_datasets(self) -> list[DatasetOut]:
        """The built-ins and this tenant's uploads."""
        return DatasetList.model_validate(self._json("GET", "/v1/datasets")).datasets

    def delete_dataset(self, dataset: str | DatasetOut) -> None:
        ident = dataset if isinstance(dataset, str) else dataset.id
        self._request("DELETE", f"/v1/datasets/{ident}")

    # --- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        model: str | ModelOut,
        analysis: str,
        params: dict[str, Any] | None = None,
        dataset: str | DatasetOut | None = None,
    ) -> JobOut:
        """Queue an analysis (a result computed before for the same inputs comes back at once,
        ``cached`` and ``succeeded``)."""
        body: dict[str, Any] = {"model_id": _id(model), "analysis": analysis}
        if params:
            body["params"] = params
        if dataset is not None:
            body["dataset"] = dataset if isinstance(dataset, str) else dataset.id
        return JobOut.model_validate(self._json("POST", "/v1/jobs", json=body))

    def get_job(self, job: str | JobOut) -> JobOut:
        return JobOut.model_validate(self._json("GET", f"/v1/jobs/{_id(job)}"))

    def list_jobs(self, *, status: JobStatus | str | None = None, limit: int = 100) -> list[JobOut]:
        """The newest jobs first (without their results)."""
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = JobStatus(status).value
        return JobList.model_validate(self._json("GET", "/v1/jobs", params=params)).jobs

    def cancel(self, job: str | JobOut) -> JobOut:
        """Cancel a queued job or stop a running one (409 when it already finished)."""
        return JobOut.model_validate(self._json("DELETE", f"/v1/jobs/{_id(job)}"))

    def wait(
        self,
        job: str | JobOut,
        *,
        progress: bool = True,
        timeout: float | None = None,
        raise_on_failure: bool = True,
        poll: float = 0.05,
    ) -> JobOut:
        """Poll until the job finished (intervals from ``poll`` growing to 1 s); with
        ``progress``, a progress bar on stderr.

        Returns the finished job with its result. DeepscopeError (``.job`` set) when it failed
        or was canceled (unless ``raise_on_failure`` is False), or after ``timeout`` seconds.
        """
        job_id = _id(job)
        # A finished job as submit() returned it (a cache hit) needs no request; a listed one
        # lacks its result.
        known: JobOut | None = None
        if isinstance(job, JobOut) and job.status.terminal:
            known = job if job.result is not None or job.status is not JobStatus.SUCCEEDED else None
        deadline = None if timeout is None else time.monotonic() + timeout
        with _progress_bar(progress, job_id, job) as update:
            for interval in _backoff(poll):
                current = known if known is not None else self.get_job(job_id)
                update(current)
                if current.status.terminal:
                    break
                if deadline is not None and time.monotonic() + interval > deadline:
                    raise DeepscopeError(
                        None, f"job {job_id} still {current.status.value} after {timeout:g} s"
                    )
                time.sleep(interval)
        if raise_on_failure and current.status is not JobStatus.SUCCEEDED:
            what = current.status.value
            if current.error is not None:
                what += f" ({current.error.type}): {current.error.message}"
            raise DeepscopeError(None, f"job {current.id} {what}", job=current)
        return current

    def download_artifacts(self, job: str | JobOut, out_dir: str | Path) -> list[Path]:
        """Write the job's ``result.json`` and every artifact under ``out_dir`` (created);
        returns the files written. The job must have succeeded."""
        current = job if isinstance(job, JobOut) and job.result is not None else self.get_job(job)
        if current.result is None:
            raise DeepscopeError(
                None, f"job {current.id} is {current.status.value}: it has no artifacts"
            )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        prefix = f"/v1/artifacts/{current.id}/"
        written: list[Path] = []
        for artifact in current.result.artifacts:
            if not artifact.url.startswith(prefix):
                raise DeepscopeError(None, f"unexpected artifact URL {artifact.url!r}")
            target = _safe_target(out, artifact.url[len(prefix) :])
            target.parent.mkdir(parents=True, exist_ok=True)
            self._download(artifact.url, target)
            written.append(target)
        result_json = out / "result.json"
        if result_json not in written:  # jobs whose result has no result.json (predictions)
            body = current.result.model_dump(mode="json", by_alias=True)
            result_json.write_text(json.dumps(body, indent=2) + "\n")
            written.append(result_json)
        return written

    def _download(self, url: str, target: Path) -> None:
        tmp = target.with_name(f".{target.name}.part")
        try:
            with self._http.stream("GET", url) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    try:
                        detail = str(resp.json()["detail"])
                    except (ValueError, KeyError, TypeError):
                        detail = resp.reason_phrase
                    raise DeepscopeError(resp.status_code, detail)
                with tmp.open("wb") as f:
                    for chunk in resp.iter_bytes(_CHUNK):
                        f.write(chunk)
            tmp.replace(target)
        except httpx.TransportError as exc:
            raise DeepscopeError(None, f"cannot reach {self.url}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)


def _backoff(start: float, factor: float = 1.5, ceiling: float = 1.0) -> Iterator[float]:
    """Poll intervals: ``start``, growing by ``factor`` up to ``ceiling`` seconds."""
    interval = start
    while True:
        yield interval
        interval = min(ceiling, interval * factor)


@contextmanager
def _progress_bar(enabled: bool, job_id: str, job: str | JobOut) -> Iterator[Any]:
    """``update(job)`` for a rich progress bar on stderr (a no-op when disabled)."""
    if not enabled:
        yield lambda _job: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    label = job.analysis if isinstance(job, JobOut) else "job"
    with Progress(
        TextColumn("[bold]{task.fields[label]}[/bold] {task.fields[job]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task("", total=1.0, label=label, job=job_id[:8], status="")

        def update(current: JobOut) -> None:
            status = current.status.value
            if current.message and not current.status.terminal:
                status += f": {current.message}"
            bar.update(
                task,
                completed=current.progress,
                label=current.analysis,
                status=status,
            )

        yield update
