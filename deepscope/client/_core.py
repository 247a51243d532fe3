"""What :class:`~deepscope.client.Client` and :class:`~deepscope.client.AsyncClient` share:
building requests, parsing responses and errors, and deciding when to retry and how long to
wait. Pure functions and small classes, no I/O of their own (a file to upload is opened by the
transport, per attempt), so the two clients differ only in how they send: ``httpx.Client``
and ``time.sleep``, or ``httpx.AsyncClient`` and ``asyncio.sleep``.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import ValidationError

from deepscope.contract import (
    DatasetList,
    DatasetOut,
    JobList,
    JobOut,
    JobStatus,
    ModelList,
    ModelOut,
    ModelStatus,
)
from deepscope.manifest import Manifest, ModelFormat, manifest_path_for

if TYPE_CHECKING:
    import numpy as np

    ImagesArg = str | Path | Sequence[str | Path] | np.ndarray

__all__ = [
    "DEFAULT_URL",
    "IDEMPOTENCY_HEADER",
    "DeepscopeError",
    "JobWait",
    "ModelWait",
    "Page",
    "Request",
    "RetryPolicy",
    "resolve_credentials",
]

DEFAULT_URL = "http://127.0.0.1:8000"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_PROBLEM_PREFIX = "/v1/problems/"
_PROBLEM_MEDIA_TYPE = "application/problem+json"
_FORMATS = {
    ".safetensors": ModelFormat.SAFETENSORS,
    ".pt": ModelFormat.STATE_DICT,
    ".pth": ModelFormat.STATE_DICT,
    ".bin": ModelFormat.STATE_DICT,
    ".pt2": ModelFormat.PT2,
}
#: Methods whose repetition changes nothing more than the first call did.
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: Answers of a proxy or a server that is restarting: worth another try.
_TRANSIENT_STATUSES = frozenset({502, 503, 504})
CHUNK = 1024 * 1024

T = TypeVar("T")


# --- errors ---------------------------------------------------------------------------------


class DeepscopeError(Exception):
    """What went wrong: the server's ``detail`` and HTTP status code (None when no answer came:
    unreachable server, a failed job, a timeout).

    ``type`` is the problem's stable slug (``model_not_ready``, ``quota_exceeded``,
    ``invalid_params``, …) when the server answered RFC 9457 problem+json, else None;
    ``errors`` the structured list of invalid fields of a 422 (``[{"loc", "msg", "type"}]``).
    """

    def __init__(
        self,
        status_code: int | None,
        detail: str,
        *,
        job: JobOut | None = None,
        problem: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        #: The job, for a job that failed or was canceled.
        self.job = job
        #: The problem type's slug, e.g. ``"model_not_ready"`` (None: not problem+json).
        self.type = problem
        #: A 422's invalid fields (None when the body has none).
        self.errors = errors
        #: A connection error or a 502/503/504: the same request may succeed later.
        self.transient = transient

    def __str__(self) -> str:
        return self.detail if self.status_code is None else f"{self.status_code}: {self.detail}"


def response_error(resp: httpx.Response) -> DeepscopeError:
    """The :class:`DeepscopeError` of a (read) error response: ``detail`` from the JSON body
    (FastAPI's or a problem's), else the text; ``type`` and ``errors`` from problem+json."""
    body: Any = None
    with suppress(ValueError):
        body = resp.json()
    detail: str | None = None
    if isinstance(body, dict) and "detail" in body:
        detail = str(body["detail"])
    if not detail:
        detail = resp.text.strip()[:500] or resp.reason_phrase
    problem: str | None = None
    errors: list[dict[str, Any]] | None = None
    media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if isinstance(body, dict) and (
        media == _PROBLEM_MEDIA_TYPE
        or (isinstance(body.get("type"), str) and body["type"].startswith(_PROBLEM_PREFIX))
    ):
        kind = body.get("type")
        if isinstance(kind, str) and kind not in ("", "about:blank"):
            problem = kind.rsplit("/", 1)[-1]
        if isinstance(body.get("errors"), list):
            errors = [e for e in body["errors"] if isinstance(e, dict)]
    return DeepscopeError(
        resp.status_code,
        detail,
        problem=problem,
        errors=errors,
        transient=resp.status_code in _TRANSIENT_STATUSES,
    )


def transport_error(url: str, method: str, path: str, exc: httpx.TransportError) -> DeepscopeError:
    """An error for a request that got no answer (connection refused or reset, timeout)."""
    if isinstance(exc, httpx.TimeoutException):
        return DeepscopeError(
            None,
            f"{method} {url}{path} timed out ({exc})",
            transient=not isinstance(exc, httpx.ReadTimeout),
        )
    return DeepscopeError(None, f"cannot reach {url}: {exc}", transient=True)


# --- credentials ----------------------------------------------------------------------------


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


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


# --- requests -------------------------------------------------------------------------------

#: A file part: (field, (file name, a path opened per attempt or bytes, media type)).
FilePart = tuple[str, tuple[str, Path | bytes, str]]


@dataclass(frozen=True)
class Request:
    """One HTTP request, as data: both clients send it, and send it again on a transient
    failure when :attr:`retryable`."""

    method: str
    path: str
    params: list[tuple[str, str]] = field(default_factory=list)
    json: Any = None
    data: dict[str, str] | None = None
    files: list[FilePart] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        """Safe to send twice: an idempotent method, or a POST the server deduplicates by its
        Idempotency-Key."""
        return self.method in _IDEMPOTENT_METHODS or IDEMPOTENCY_HEADER in self.headers

    @contextmanager
    def httpx_kwargs(self) -> Iterator[dict[str, Any]]:
        """Keyword arguments of ``httpx.(Async)Client.request``/``stream``; files given as
        paths are opened here and closed on exit (each attempt reads them from the start)."""
        with ExitStack() as stack:
            kwargs: dict[str, Any] = {"headers": self.headers or None}
            if self.params:
                kwargs["params"] = self.params
            if self.json is not None:
                kwargs["json"] = self.json
            if self.data is not None:
                kwargs["data"] = self.data
            if self.files is not None:
                files = []
                for name, (filename, content, media) in self.files:
                    handle: Any = (
                        stack.enter_context(content.open("rb"))
                        if isinstance(content, Path)
                        else content
                    )
                    files.append((name, (filename, handle, media)))
                kwargs["files"] = files
            yield kwargs


def new_idempotency_key() -> str:
    """A fresh key for one logical call (kept across that call's retries)."""
    return str(uuid.uuid4())


def _idempotency(key: str | None) -> dict[str, str]:
    return {IDEMPOTENCY_HEADER: key or new_idempotency_key()}


def ident(obj: str | ModelOut | JobOut | DatasetOut) -> str:
    return obj if isinstance(obj, str) else obj.id


def _label_params(labels: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """``label=key=value`` query parameters (repeatable; every one must match)."""
    return [("label", f"{k}={v}") for k, v in (labels or {}).items()]


def submit_request(
    model: str | ModelOut,
    analysis: str,
    params: dict[str, Any] | None = None,
    dataset: str | DatasetOut | None = None,
    *,
    labels: Mapping[str, str] | None = None,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
    wait: float = 0.0,
) -> Request:
    """``POST /v1/jobs``; ``wait`` > 0 asks the service to hold the answer until the job ends
    or that many seconds passed (``Prefer: wait=S``, RFC 7240)."""
    body: dict[str, Any] = {"model_id": ident(model), "analysis": analysis}
    if params:
        body["params"] = params
    if dataset is not None:
        body["dataset"] = ident(dataset)
    if labels:
        body["labels"] = dict(labels)
    if callback_url is not None:
        body["callback_url"] = callback_url
    headers = _idempotency(idempotency_key)
    if wait > 0:
        headers["Prefer"] = f"wait={wait:g}"
    return Request("POST", "/v1/jobs", json=body, headers=headers)


def _list_request(
    path: str,
    filters: Sequence[tuple[str, str | None]],
    labels: Mapping[str, str] | None,
    limit: int | None,
    cursor: str | None,
) -> Request:
    """``GET path`` with the filters that are set, the labels, and the page's limit and cursor."""
    params = [(name, value) for name, value in filters if value is not None]
    params += _label_params(labels)
    params += [(n, str(v)) for n, v in (("limit", limit), ("cursor", cursor)) if v is not None]
    return Request("GET", path, params=params)


def list_jobs_request(
    *,
    status: JobStatus | str | None = None,
    analysis: str | None = None,
    model_id: str | ModelOut | None = None,
    labels: Mapping[str, str] | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Request:
    filters = [
        ("status", None if status is None else JobStatus(status).value),
        ("analysis", analysis),
        ("model_id", None if model_id is None else ident(model_id)),
    ]
    return _list_request("/v1/jobs", filters, labels, limit, cursor)


def list_models_request(
    *,
    status: ModelStatus | str | None = None,
    labels: Mapping[str, str] | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Request:
    filters = [("status", None if status is None else ModelStatus(status).value)]
    return _list_request("/v1/models", filters, labels, limit, cursor)


def list_datasets_request(cursor: str | None = None) -> Request:
    return Request("GET", "/v1/datasets", params=[("cursor", cursor)] if cursor else [])


def compare_request(job: str | JobOut, baseline: str | JobOut) -> Request:
    return Request("GET", f"/v1/jobs/{ident(job)}/compare", params=[("baseline", ident(baseline))])


def read_manifest(path: Path, manifest: Manifest | dict[str, Any] | str | Path | None) -> Manifest:
    """The manifest given (object, dict or JSON file), else the one beside ``path``, else an
    empty one."""
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


def upload_model_request(
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
) -> Request:
    """``POST /v1/models``: the file, its manifest (see ``Client.upload_model``), name and
    labels, with an Idempotency-Key."""
    path = Path(path)
    if not path.is_file():
        raise DeepscopeError(None, f"no such model file: {path}")
    man = read_manifest(path, manifest)
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
    if labels:
        fields["labels"] = json.dumps(dict(labels))
    return Request(
        "POST",
        "/v1/models",
        data=fields,
        files=[("file", (path.name, path, "application/octet-stream"))],
        headers=_idempotency(idempotency_key),
    )


def upload_dataset_request(path: str | Path, name: str | None = None) -> Request:
    path = Path(path)
    if not path.is_file():
        raise DeepscopeError(None, f"no such dataset file: {path}")
    return Request(
        "POST",
        "/v1/datasets",
        data={"name": name} if name else {},
        files=[("file", (path.name, path, "application/octet-stream"))],
    )


def predict_request(model: str | ModelOut, images: ImagesArg, top_k: int) -> Request:
    """``POST /v1/models/{id}/predict`` with PNG files, one ``.npz``, or an array (sent as an
    ``.npz``; numpy is imported only then)."""
    files: list[FilePart]
    if isinstance(images, str | Path) or (
        isinstance(images, Sequence) and all(isinstance(p, str | Path) for p in images)
    ):
        paths = [Path(images)] if isinstance(images, str | Path) else [Path(p) for p in images]
        if not paths:
            raise DeepscopeError(None, "no images given")
        for p in paths:
            if not p.is_file():
                raise DeepscopeError(None, f"no such image file: {p}")
        if len(paths) == 1 and paths[0].suffix == ".npz":
            files = [("file", (paths[0].name, paths[0], "application/octet-stream"))]
        else:
            files = [("files", (p.name, p, "image/png")) for p in paths]
    else:
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, images=np.asarray(images))
        files = [("file", ("images.npz", buf.getvalue(), "application/octet-stream"))]
    return Request(
        "POST", f"/v1/models/{ident(model)}/predict", params=[("top_k", str(top_k))], files=files
    )


# --- responses ------------------------------------------------------------------------------


@dataclass
class Page(Generic[T]):
    """One page of a list: its items (iterate the page, or ``.items``) and the cursor of the
    next page (None on the last)."""

    items: list[T]
    next_cursor: str | None = None

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> T:
        return self.items[index]


def job_page(body: Any) -> Page[JobOut]:
    parsed = JobList.model_validate(body)
    return Page(parsed.jobs, _next_cursor(body))


def model_page(body: Any) -> Page[ModelOut]:
    parsed = ModelList.model_validate(body)
    return Page(parsed.models, _next_cursor(body))


def dataset_page(body: Any) -> Page[DatasetOut]:
    parsed = DatasetList.model_validate(body)
    return Page(parsed.datasets, _next_cursor(body))


def _next_cursor(body: Any) -> str | None:
    cursor = body.get("next_cursor") if isinstance(body, dict) else None
    return str(cursor) if cursor else None


def artifact_targets(job: JobOut, out_dir: Path) -> list[tuple[str, Path]]:
    """(URL, file under ``out_dir``) for every artifact of a job with a result."""
    assert job.result is not None
    prefix = f"/v1/artifacts/{job.id}/"
    out: list[tuple[str, Path]] = []
    for artifact in job.result.artifacts:
        if not artifact.url.startswith(prefix):
            raise DeepscopeError(None, f"unexpected artifact URL {artifact.url!r}")
        out.append((artifact.url, safe_target(out_dir, artifact.url[len(prefix) :])))
    return out


def write_result_json(job: JobOut, out_dir: Path, written: list[Path]) -> None:
    """``result.json`` from the job itself, for results without that artifact (predictions)."""
    assert job.result is not None
    result_json = out_dir / "result.json"
    if result_json not in written:
        body = job.result.model_dump(mode="json", by_alias=True)
        result_json.write_text(json.dumps(body, indent=2) + "\n")
        written.append(result_json)


def no_artifacts_error(job: JobOut) -> DeepscopeError:
    return DeepscopeError(None, f"job {job.id} is {job.status.value}: it has no artifacts")


def safe_target(out_dir: Path, rel: str) -> Path:
    """``out_dir/rel``, refusing anything that would land outside ``out_dir``."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise DeepscopeError(None, f"refusing the artifact path {rel!r}")
    return out_dir.joinpath(*parts)


def bundle_target(job_id: str, path: str | Path) -> Path:
    """Where a bundle goes: ``path``, or ``path/<job id>.zip`` for a directory."""
    target = Path(path)
    return target / f"{job_id}.zip" if target.is_dir() else target


def part_file(target: Path) -> Path:
    """The temporary file a download goes to before it is renamed into place."""
    return target.with_name(f".{target.name}.part")


# --- retries and waiting --------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a request that got a connection error or a 502/503/504 (and, for a POST with
    an Idempotency-Key, a 409 ``idempotency_in_progress``): up to ``retries`` more attempts,
    waiting ``backoff`` seconds doubling up to ``max_backoff`` (with jitter, so clients that
    failed together do not come back together), or the server's Retry-After when it says."""

    retries: int = 4
    backoff: float = 0.25
    max_backoff: float = 8.0

    def delay(
        self,
        request: Request,
        attempt: int,
        error: DeepscopeError,
        headers: Mapping[str, str] | None = None,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 0), or None
        to give up and raise ``error``."""
        if attempt >= self.retries or not request.retryable:
            return None
        in_progress = error.type == "idempotency_in_progress"
        if not (error.transient or in_progress):
            return None
        base = min(self.max_backoff, self.backoff * 2.0**attempt)
        wait = base * random.uniform(0.5, 1.0)
        retry_after = (headers or {}).get("retry-after")
        if retry_after is not None:
            with suppress(ValueError):  # an HTTP date: our own backoff will do
                wait = max(wait, min(self.max_backoff, float(retry_after)))
        return wait


def poll_intervals(start: float, factor: float = 1.5, ceiling: float = 1.0) -> Iterator[float]:
    """Poll intervals: ``start``, growing by ``factor`` up to ``ceiling`` seconds."""
    interval = start
    while True:
        yield interval
        interval = min(ceiling, interval * factor)


class _Poll:
    """The clock of a wait: its intervals, its deadline, and how long the service may stay
    unreachable (transient errors are polled through until then)."""

    def __init__(self, timeout: float | None, poll: float, unreachable_s: float) -> None:
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.intervals = poll_intervals(poll)
        self.unreachable_s = unreachable_s
        self._failing_since: float | None = None

    def tolerate(self, error: DeepscopeError) -> float:
        """The interval before polling again after ``error``; re-raises it unless it is
        transient and the service has not been unreachable longer than allowed."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        interval = next(self.intervals)
        if (
            not error.transient
            or now - self._failing_since > self.unreachable_s
            or (self.deadline is not None and now + interval > self.deadline)
        ):
            raise error
        return interval

    def answered(self) -> None:
        self._failing_since = None


#: How long one request of a wait asks the service to hold it (``GET /v1/jobs/{id}?wait=``,
#: ``Prefer: wait``): without a progress bar, long (one request per half minute, told at once
#: when the job ends); with one, short enough for the bar to move.
LONG_POLL_S = 30.0
PROGRESS_POLL_S = 2.0


def hold_for(progress: bool) -> float:
    """The hold a wait asks for, with or without a progress bar to draw."""
    return PROGRESS_POLL_S if progress else LONG_POLL_S


def held(wait: float, http_timeout: float | None) -> float:
    """How long a request may ask the service to hold it: ``wait``, less than the client's
    read timeout by a margin (or the transport gives up first)."""
    return wait if http_timeout is None else max(0.0, min(wait, http_timeout - 5.0))


class JobWait(_Poll):
    """``wait``: long-poll a job until it finished.

    Each request asks the service to answer when the job ends or after :meth:`hold` seconds
    (``?wait=``); when it held the request that long, the next goes out at once. A service that
    answered sooner without the job ending (one that does not long-poll) is polled at the
    growing intervals instead."""

    def __init__(
        self,
        job: str | JobOut,
        timeout: float | None,
        poll: float,
        unreachable_s: float,
        *,
        progress: bool = False,
        http_timeout: float | None = None,
    ) -> None:
        super().__init__(timeout, poll, unreachable_s)
        self.job_id = ident(job)
        self.asked = held(hold_for(progress), http_timeout)
        # A finished job as submit() returned it (a cache hit) needs no request; a listed one
        # lacks its result.
        self.known: JobOut | None = None
        if isinstance(job, JobOut) and job.status.terminal:
            ok = job.result is not None or job.status is not JobStatus.SUCCEEDED
            self.known = job if ok else None

    def hold(self) -> float:
        """The ``wait`` of the next request: at most what is left before the deadline."""
        if self.deadline is None:
            return self.asked
        return max(0.0, min(self.asked, self.deadline - time.monotonic()))

    def next(self, current: JobOut, held: float = 0.0) -> float | None:
        """None when ``current`` is finished, else the seconds to sleep before the next poll
        (DeepscopeError when that would pass the deadline). ``held``: how long the request
        that answered ``current`` took."""
        self.answered()
        if current.status.terminal:
            return None
        asked = self.hold()
        interval = 0.0 if asked > 0 and held >= 0.8 * asked else next(self.intervals)
        if self.deadline is not None and time.monotonic() + interval > self.deadline:
            assert self.timeout is not None
            raise DeepscopeError(
                None, f"job {self.job_id} still {current.status.value} after {self.timeout:g} s"
            )
        return interval

    @staticmethod
    def outcome(current: JobOut, raise_on_failure: bool) -> JobOut:
        if raise_on_failure and current.status is not JobStatus.SUCCEEDED:
            what = current.status.value
            if current.error is not None:
                what += f" ({current.error.type}): {current.error.message}"
            raise DeepscopeError(None, f"job {current.id} {what}", job=current)
        return current


class ModelWait(_Poll):
    """``wait_model``: poll a model until it is ready or invalid."""

    def __init__(self, timeout: float, poll: float, unreachable_s: float) -> None:
        super().__init__(timeout, poll, unreachable_s)

    def next(self, current: ModelOut) -> float | None:
        self.answered()
        if current.status is not ModelStatus.VALIDATING:
            return None
        interval = next(self.intervals)
        if self.deadline is not None and time.monotonic() + interval > self.deadline:
            raise DeepscopeError(
                None, f"model {current.id} still validating after {self.timeout:g} s"
            )
        return interval


@contextmanager
def progress_bar(enabled: bool, job_id: str, job: str | JobOut) -> Iterator[Any]:
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
            bar.update(task, completed=current.progress, label=current.analysis, status=status)

        yield update
