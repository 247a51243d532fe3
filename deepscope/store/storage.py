"""Blob and artifact storage through fsspec: a local directory by default, any fsspec URL.

Layout under the root (every name built here from ids and hashes, never from request fields):

* ``blobs/{sha[:2]}/{sha}`` — uploaded model files and datasets, content-addressed by sha256;
* ``inputs/{tenant}/{job}/{name}`` — images posted for prediction;
* ``artifacts/{tenant}/{job}/{path}`` — what a job wrote (PNGs, ``result.json``).

Uploads are streamed in chunks through :class:`UploadSink`, which hashes and counts while it
writes and stops at the size limit, so an oversized upload never lands in full on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.utils import get_protocol

__all__ = ["Storage", "UploadSink", "UploadTooLargeError", "safe_relpath"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[0-9a-f]{32}$")
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CHUNK = 1024 * 1024


class UploadTooLargeError(ValueError):
    """The upload went past the deployment's limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the limit of {limit} bytes (DEEPSCOPE_MAX_UPLOAD_BYTES)")
        self.limit = limit


def safe_relpath(path: str) -> str:
    """``path`` if it is a canonical relative POSIX path: no ``..``, ``.`` or empty segment,
    not absolute, no backslash or NUL.

    ValueError otherwise: artifact names come from the worker, but are checked anyway.
    """
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise ValueError(f"invalid relative path {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") or p != p.strip() for p in parts):
        raise ValueError(f"invalid relative path {path!r}")
    return path


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}")
    return value


def _mtime(info: dict[str, Any]) -> float | None:
    """A file's modification time from an fsspec ``info`` dict (local, s3, gcs, ...)."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class UploadSink:
    """Receives an upload chunk by chunk: writes a local temporary file, hashes, counts.

    ``write`` raises :class:`UploadTooLargeError` as soon as more than ``limit`` bytes arrived. The
    file is removed by ``discard`` (also called on a failed ``Storage.put_blob``).
    """

    def __init__(self, tmp_dir: Path, limit: int, filename: str | None = None) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self.path = Path(name)
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.limit = limit
        self.filename = filename
        self.head = b""  # the first bytes, for sniffing the format

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise UploadTooLargeError(self.limit)
        if len(self.head) < 64:
            self.head += data[: 64 - len(self.head)]
        self._hash.update(data)
        self._file.write(data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _options(protocol: str) -> dict[str, Any]:
    """The filesystem's options for ``protocol``, S3's from the standard AWS environment.

    Credentials (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_PROFILE``) are botocore's own business. The endpoint (``AWS_ENDPOINT_URL_S3``, else
    ``AWS_ENDPOINT_URL``: MinIO, Ceph, R2, moto, ...) and the region (``AWS_DEFAULT_REGION``,
    else ``AWS_REGION``) are passed explicitly: botocore reads the endpoint only from 1.31 on
    and ``AWS_REGION`` not at all. Several processes write the store, so listings are never
    cached (a cached listing would hide another process's objects).
    """
    if protocol in ("file", "local"):
        return {"auto_mkdir": True}
    options: dict[str, Any] = {"use_listings_cache": False}
    if protocol in ("s3", "s3a"):
        env = os.environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        if region:
            options["client_kwargs"] = {"region_name": region}
    return options


def _missing(url: str, exc: ImportError) -> ImportError:
    return ImportError(
        f"storage {url!r} (DEEPSCOPE_STORAGE_URL): {exc}; for s3:// install the s3 extra: "
        "pip install 'deepscope[server,s3]'"
    )


class Storage:
    """The storage root: ``Storage("/srv/deepscope/storage")`` or ``Storage("s3://b/prefix")``.

    Any fsspec URL works whose filesystem is installed (``pip install 'deepscope[server,s3]'`` for
    ``s3://``). The filesystem is made again in a forked process, which cannot use its
    parent's client (s3fs's event loop and connections).
    """

    def __init__(self, url: str) -> None:
        protocol = get_protocol(url)
        self.url = url
        self.local = protocol in ("file", "local")
        self._options = _options(protocol)
        self._fs, root = self._connect()
        self._pid = os.getpid()
        self.root = root.rstrip("/")
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def preload(url: str) -> None:
        """Import the filesystem of ``url`` (s3fs with botocore takes 0.3 s), as a forking
        worker does once before its first job. ImportError, saying what to install, when the
        filesystem is missing."""
        try:
            fsspec.get_filesystem_class(get_protocol(url))
        except ImportError as exc:
            raise _missing(url, exc) from exc

    def _connect(self) -> tuple[Any, str]:
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self._options)
        except ImportError as exc:
            raise _missing(self.url, exc) from exc
        return fs, str(root)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, made in this process."""
        if self._pid != os.getpid():
            self._fs, _ = self._connect()
            self._pid = os.getpid()
        return self._fs

    # --- keys -----------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return f"{self.root}/{key}"

    @staticmethod
    def blob_key(sha256: str) -> str:
        _check(_SHA256, sha256, "sha256")
        return f"blobs/{sha256[:2]}/{sha256}"

    @staticmethod
    def job_prefix(area: str, tenant: str, job_id: str) -> str:
        if area not in ("inputs", "artifacts"):
            raise ValueError(f"unknown storage area {area!r}")
        return f"{area}/{_check(_TENANT, tenant, 'tenant')}/{_check(_ID, job_id, 'job id')}"

    @classmethod
    def artifact_key(cls, tenant: str, job_id: str, relpath: str) -> str:
        return f"{cls.job_prefix('artifacts', tenant, job_id)}/{safe_relpath(relpath)}"

    @classmethod
    def input_key(cls, tenant: str, job_id: str, name: str) -> str:
        return f"{cls.job_prefix('inputs', tenant, job_id)}/{safe_relpath(name)}"

    # --- operations -----------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._full(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._full(key)))

    def put_blob(self, sink: UploadSink) -> str:
        """Store a finished upload under its sha256 (once; a duplicate is dropped). → sha256."""
        sink.close()
        sha = sink.sha256
        key = self.blob_key(sha)
        try:
            if not self.exists(key):
                self.put_file(sink.path, key, move=True)
        finally:
            sink.discard()
        return sha

    def put_file(self, local: Path, key: str, *, move: bool = False) -> None:
        """Copy (or, on local storage, move) a local file to ``key``; atomic on local storage."""
        full = self._full(key)
        if self.local:
            target = Path(full)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target then rename, so a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            os.close(fd)
            try:
                if move:
                    shutil.move(str(local), tmp)
                else:
                    shutil.copyfile(local, tmp)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
        else:
            self.fs.put_file(str(local), full)

    def put_bytes(self, key: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            self.put_file(Path(tmp.name), key, move=True)
        finally:
            Path(tmp.name).unlink(missing_ok=True)

    def get_file(self, key: str, local: Path) -> Path:
        """Copy ``key`` to the local file ``local``; FileNotFoundError when missing."""
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._full(key), str(local))
        return local

    @contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self._full(key), "rb") as f:
            yield f

    def iter_chunks(self, key: str, chunk: int = _CHUNK) -> Iterator[bytes]:
        with self.open(key) as f:
            while data := f.read(chunk):
                yield data

    def delete(self, key: str) -> None:
        full = self._full(key)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=self.fs.isdir(full))

    def blobs(self) -> Iterator[tuple[str, str, float | None]]:
        """Every file under ``blobs/``: (key, sha256 or "" for a leftover temporary file,
        modification time as a Unix time or None when the filesystem does not tell)."""
        base = self._full("blobs")
        if not self.fs.exists(base):
            return
        found: dict[str, dict[str, Any]] = self.fs.find(base, detail=True)
        for full, info in found.items():
            key = "blobs/" + full[len(base) :].lstrip("/")
            name = key.rsplit("/", 1)[-1]
            sha = name if _SHA256.fullmatch(name) and key == self.blob_key(name) else ""
            if not sha and not name.startswith(".tmp-"):
                continue  # not ours
            yield key, sha, _mtime(info)

    def local_path(self, key: str) -> Path | None:
        """The file's path when storage is local (workers then read it in place), else None."""
        return Path(self._full(key)) if self.local else None
