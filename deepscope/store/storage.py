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


class Storage:
    """The storage root: ``Storage("/srv/deepscope/storage")`` or ``Storage("s3://b/prefix")``."""

    def __init__(self, url: str) -> None:
        protocol = get_protocol(url)
        self.local = protocol in ("file", "local")
        kwargs: dict[str, Any] = {"auto_mkdir": True} if self.local else {}
        fs, root = fsspec.core.url_to_fs(url, **kwargs)
        self.fs: Any = fs
        self.root = root.rstrip("/")
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

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

    def local_path(self, key: str) -> Path | None:
        """The file's path when storage is local (workers then read it in place), else None."""
        return Path(self._full(key)) if self.local else None
