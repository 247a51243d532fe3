"""Streaming ``multipart/form-data``: file parts go chunk by chunk into :class:`UploadSink`\\ s,
which hash and count while writing and stop at the size limit (413).

FastAPI's ``UploadFile`` only reaches the handler after Starlette has received the whole body,
so an oversized upload would land in full on disk first; parsing ``request.stream()`` here
enforces the limit as the bytes arrive.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from deepscope.store.backend import Backend
from deepscope.store.storage import UploadSink, UploadTooLargeError

__all__ = [
    "FilePart",
    "MultipartError",
    "ParsedForm",
    "TooManyFilesError",
    "multipart_body",
    "parse_multipart",
    "sweep_orphans",
]

log = logging.getLogger("deepscope.service")

_MAX_FIELD_BYTES = 1024 * 1024
_MAX_FIELDS = 32
#: Bytes read and dropped after the limit was hit, so that the client (still sending) gets the
#: 413 rather than a reset connection; past this the connection is simply closed.
_DRAIN_BYTES = 64 * 1024 * 1024
#: Headers and small fields besides the file parts.
_OVERHEAD = 1024 * 1024 + 64 * 1024


class MultipartError(ValueError):
    """A malformed multipart body (HTTP 400)."""


class TooManyFilesError(UploadTooLargeError):
    """More file parts than the route takes (HTTP 413, like any upload over a limit)."""

    def __init__(self, limit: int) -> None:
        ValueError.__init__(self, f"too many files: at most {limit} per request")
        self.limit = limit


@dataclass
class FilePart:
    field: str
    filename: str | None
    content_type: str | None
    sink: UploadSink


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)

    def files_named(self, *names: str) -> list[FilePart]:
        return [f for f in self.files if f.field in names]

    def discard(self) -> None:
        """Remove the temporary files (a stored file was already moved away)."""
        for part in self.files:
            part.sink.discard()


class _Parser:
    def __init__(self, tmp_dir: Path, limit: int, max_files: int) -> None:
        self.tmp_dir = tmp_dir
        self.limit = limit
        self.max_files = max_files
        self.form = ParsedForm()
        self.total = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._field: str = ""
        self._data = bytearray()
        self._file: FilePart | None = None

    def on_part_begin(self) -> None:
        self._headers = {}
        self._data = bytearray()
        self._file = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise MultipartError("a multipart part has no name in its Content-Disposition")
        self._field = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if len(self.form.files) >= self.max_files:
                raise TooManyFilesError(self.max_files)
            ctype = self._headers.get(b"content-type")
            self._file = FilePart(
                field=self._field,
                filename=options[b"filename"].decode("utf-8", "replace"),
                content_type=ctype.decode("latin-1") if ctype else None,
                sink=UploadSink(self.tmp_dir, self.limit),
            )
            self.form.files.append(self._file)
        elif len(self.form.fields) >= _MAX_FIELDS:
            raise MultipartError(f"too many form fields: at most {_MAX_FIELDS}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is not None:
            self.total += len(chunk)
            if self.total > self.limit:
                raise UploadTooLargeError(self.limit)
            self._file.sink.write(chunk)
        else:
            if len(self._data) + len(chunk) > _MAX_FIELD_BYTES:
                raise MultipartError(
                    f"form field {self._field!r} is larger than {_MAX_FIELD_BYTES} bytes"
                )
            self._data += chunk

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.sink.close()
        else:
            try:
                self.form.fields[self._field] = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise MultipartError(f"form field {self._field!r} is not UTF-8 text") from None


async def _drain(request: Request) -> None:
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > _DRAIN_BYTES:
                return
    except Exception:  # the client went away: nothing left to drain
        return


async def parse_multipart(
    request: Request, *, tmp_dir: Path, limit: int, max_files: int = 1
) -> ParsedForm:
    """Parse the request body as it arrives; the caller must ``discard()`` the result.

    Raises:
        MultipartError: not multipart/form-data, no boundary, malformed body.
        UploadTooLargeError: the file parts together exceed ``limit`` bytes.
    """
    ctype, options = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data":
        raise MultipartError("the body must be multipart/form-data")
    boundary = options.get(b"boundary")
    if not boundary:
        raise MultipartError("multipart/form-data without a boundary")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + _OVERHEAD + _DRAIN_BYTES:
        raise UploadTooLargeError(limit)
    handler = _Parser(tmp_dir, limit, max_files)
    parser = MultipartParser(
        boundary,
        callbacks={
            "on_part_begin": handler.on_part_begin,
            "on_part_data": handler.on_part_data,
            "on_part_end": handler.on_part_end,
            "on_header_field": handler.on_header_field,
            "on_header_value": handler.on_header_value,
            "on_header_end": handler.on_header_end,
            "on_headers_finished": handler.on_headers_finished,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except UploadTooLargeError:
        handler.form.discard()
        await _drain(request)
        raise
    except MultipartError:
        handler.form.discard()
        raise
    except Exception as exc:  # python-multipart's own parse errors
        handler.form.discard()
        raise MultipartError(f"malformed multipart body: {exc}") from None
    return handler.form


def multipart_body(
    properties: dict[str, dict[str, object]], required: list[str]
) -> dict[str, object]:
    """``openapi_extra`` for a route that parses its multipart body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": properties, "required": required}
                }
            },
        }
    }


def sweep_orphans(backend: Backend, tmp_dir: Path, max_age_s: float) -> tuple[int, int]:
    """Delete what uploads that never finished left behind, once older than ``max_age_s``:
    temporary upload files in ``tmp_dir`` (a process killed mid-request), the directories of
    job runs killed before they published (local storage) and stored blobs no model or dataset
    references (killed between storing and registering). Run when the API starts; logs and
    swallows its errors. → (temporary files and run directories, blobs) deleted."""
    cutoff = time.time() - max_age_s
    files = 0
    try:
        for path in tmp_dir.glob("upload-*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    files += 1
            except FileNotFoundError:
                continue
        artifacts = backend.storage.local_path("artifacts")
        for path in artifacts.glob("*/.*.run-*") if artifacts is not None else ():
            try:
                if path.is_dir() and path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    files += 1
            except FileNotFoundError:
                continue
        blobs = len(backend.sweep_blobs(max_age_s))
    except Exception:
        log.exception("sweeping orphaned uploads failed")
        return files, 0
    if files or blobs:
        log.warning("swept %d temporary file(s) and %d orphaned blob(s)", files, blobs)
    return files, blobs
