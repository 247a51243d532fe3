"""Error texts for people: one formatter of validation errors for the API, the CLI and the
workers, and one line from any exception; and the stable kinds of HTTP errors
(:class:`ProblemType`, the ``type`` of an RFC 9457 problem body)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

__all__ = [
    "PROBLEM_PREFIX",
    "ProblemType",
    "add_private_root",
    "describe_errors",
    "problem_info",
    "problem_slug",
    "public_text",
    "user_message",
]

#: Where problem types live: a problem body's ``type`` is this prefix and the slug.
PROBLEM_PREFIX = "/v1/problems/"


class ProblemType(StrEnum):
    """The stable kinds of error the API answers (the slug of a problem body's ``type``,
    ``/v1/problems/<slug>``): a script tells errors apart by these, never by their text."""

    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    MODEL_NOT_READY = "model_not_ready"
    MODEL_INVALID = "model_invalid"
    JOB_FINISHED = "job_finished"
    QUOTA_EXCEEDED = "quota_exceeded"
    BUILTIN_DATASET = "builtin_dataset"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    IDEMPOTENCY_IN_PROGRESS = "idempotency_in_progress"
    ANALYSIS_MISMATCH = "analysis_mismatch"
    JOB_NOT_SUCCEEDED = "job_not_succeeded"
    INVALID_PARAMS = "invalid_params"
    INVALID_UPLOAD = "invalid_upload"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    QUEUE_FULL = "queue_full"
    CALLBACK_NOT_ALLOWED = "callback_not_allowed"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL = "internal"


#: Each problem type: (title, the HTTP statuses it comes with, what it means and what to do).
_PROBLEMS: dict[ProblemType, tuple[str, tuple[int, ...], str]] = {
    ProblemType.UNAUTHORIZED: (
        "Unauthorized",
        (401,),
        "The API key is missing or wrong, or a signed link expired or does not cover this "
        "page. Send Authorization: Bearer KEY.",
    ),
    ProblemType.NOT_FOUND: (
        "Not found",
        (404,),
        "No such object for this tenant (another tenant's objects read as missing).",
    ),
    ProblemType.MODEL_NOT_READY: (
        "Model not ready",
        (409,),
        "The model is still being validated by a worker; retry when its status is ready.",
    ),
    ProblemType.MODEL_INVALID: (
        "Model invalid",
        (409,),
        "The model failed validation (its error says why); upload a corrected one.",
    ),
    ProblemType.JOB_FINISHED: (
        "Job finished",
        (409,),
        "The job already ended, so it cannot be canceled.",
    ),
    ProblemType.QUOTA_EXCEEDED: (
        "Quota exceeded",
        (409,),
        "The tenant has as many models or datasets as the deployment allows; delete one.",
    ),
    ProblemType.BUILTIN_DATASET: (
        "Built-in dataset",
        (409,),
        "A built-in dataset (digits, fashion-mnist) belongs to every tenant and cannot be deleted.",
    ),
    ProblemType.IDEMPOTENCY_CONFLICT: (
        "Idempotency key reused",
        (409,),
        "This Idempotency-Key was used with another request; use a new key per request.",
    ),
    ProblemType.IDEMPOTENCY_IN_PROGRESS: (
        "Request in progress",
        (409,),
        "A request with this Idempotency-Key is still being processed; retry after "
        "Retry-After seconds.",
    ),
    ProblemType.ANALYSIS_MISMATCH: (
        "Analyses differ",
        (422,),
        "Only two jobs of the same analysis can be compared.",
    ),
    ProblemType.JOB_NOT_SUCCEEDED: (
        "Job not succeeded",
        (409,),
        "The job has no result (yet): it is queued, running, failed or canceled.",
    ),
    ProblemType.INVALID_PARAMS: (
        "Invalid parameters",
        (422,),
        "A field of the body, the path or the query is invalid; errors lists each one "
        "(loc, msg, type).",
    ),
    ProblemType.INVALID_UPLOAD: (
        "Invalid upload",
        (400, 422),
        "The request body is not a well-formed multipart upload, or a file, manifest or .npz "
        "in it is not what it should be.",
    ),
    ProblemType.PAYLOAD_TOO_LARGE: (
        "Payload too large",
        (413,),
        "The upload, or the images in it, exceed a limit of this deployment.",
    ),
    ProblemType.QUEUE_FULL: (
        "Queue full",
        (429,),
        "Too many of the tenant's jobs wait already; retry after Retry-After seconds.",
    ),
    ProblemType.CALLBACK_NOT_ALLOWED: (
        "Callback not allowed",
        (422,),
        "The callback_url is not http(s), or its host is not in the deployment's allowed list "
        "(DEEPSCOPE_CALLBACK_HOSTS).",
    ),
    ProblemType.SERVICE_UNAVAILABLE: (
        "Service unavailable",
        (503,),
        "The job store (Redis) is unreachable; retry later.",
    ),
    ProblemType.INTERNAL: (
        "Internal error",
        (500,),
        "An unexpected error on the server; it is logged.",
    ),
}

#: The problem type a bare HTTP status stands for, when the raiser named none.
_BY_STATUS: dict[int, ProblemType] = {
    400: ProblemType.INVALID_UPLOAD,
    401: ProblemType.UNAUTHORIZED,
    403: ProblemType.UNAUTHORIZED,
    404: ProblemType.NOT_FOUND,
    413: ProblemType.PAYLOAD_TOO_LARGE,
    422: ProblemType.INVALID_PARAMS,
    429: ProblemType.QUEUE_FULL,
    503: ProblemType.SERVICE_UNAVAILABLE,
}


def problem_slug(status: int) -> str:
    """The slug for an error raised with a status only (an HTTPException of a library, or one
    without a more precise kind): the status's usual kind, else ``internal`` for 5xx and
    ``http_<status>`` otherwise."""
    known = _BY_STATUS.get(status)
    if known is not None:
        return known.value
    return ProblemType.INTERNAL.value if status >= 500 else f"http_{status}"


def problem_info(slug: str) -> tuple[str, tuple[int, ...], str] | None:
    """(title, statuses, description) of a known problem type; None otherwise."""
    try:
        return _PROBLEMS[ProblemType(slug)]
    except ValueError:
        return None


#: An object's default repr, ``<_io.BytesIO object at 0x7f...>``: noise, and an address.
_REPR = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")
#: ``<function f at 0x...>``, ``<bound method A.f of ...>``: the name is what the user knows.
_CALLABLE = re.compile(r"^(?:built-in )?(?:function|method|bound method|class) '?([\w.]+)")
#: Where a path ends: whitespace, quotes and the punctuation that surrounds paths in messages.
_PATH_TAIL = r"(?:/[^\s'\"`:,;()\[\]{}<>]*)?"
_roots: set[str] = set()
_pattern: tuple[frozenset[str], re.Pattern[str]] | None = None


def add_private_root(path: str | os.PathLike[str]) -> None:
    """Paths under ``path`` (a data directory, a storage root) are server paths: messages for
    users show their base names only (see :func:`public_text`)."""
    text = os.path.abspath(os.fspath(path))
    if text.count("/") >= 1 and text != "/":
        _roots.add(text.rstrip("/"))


def _default_roots() -> set[str]:
    roots = {tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm", sys.prefix, sys.base_prefix}
    roots.add(str(Path(__file__).resolve().parents[2]))  # where deepscope is installed
    for name in ("DEEPSCOPE_DATA_DIR", "HOME"):
        if os.environ.get(name):
            roots.add(os.path.abspath(os.environ[name]))
    with contextlib.suppress(OSError):
        roots.add(os.getcwd())
    return {r.rstrip("/") for r in roots if r and r.rstrip("/")}


def _path_pattern() -> re.Pattern[str]:
    global _pattern
    roots = frozenset(_default_roots() | _roots)
    if _pattern is None or _pattern[0] != roots:
        # Longest first, so that a root inside another one wins.
        alternatives = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
        compiled = re.compile(rf"(?<![\w.~/-])(?:{alternatives})(?![\w.-]){_PATH_TAIL}")
        _pattern = (roots, compiled)
    return _pattern[1]


def _base_name(match: re.Match[str]) -> str:
    path = match.group()
    stripped = path.rstrip(".")
    name = stripped.rstrip("/").rsplit("/", 1)[-1]
    return (name or "…") + path[len(stripped) :]


def _no_repr(match: re.Match[str]) -> str:
    named = _CALLABLE.match(match.group(1).strip())
    return named.group(1).rsplit(".", 1)[-1] if named else ""


def public_text(text: str, *, paths: bool = True) -> str:
    """``text`` fit to show a client: object reprs (``<_io.BytesIO object at 0x...>``) removed
    (a function's or class's keeps its name), paths on this server (under the data and
    temporary directories, the working directory, the installation) reduced to their base
    names unless ``paths`` is false, and characters that cannot be encoded (lone surrogates)
    escaped."""
    out = _REPR.sub(_no_repr, text)
    if paths:
        out = _path_pattern().sub(_base_name, out)
    out = re.sub(r"\(\s*\)", "", out)
    out = re.sub(r"[ \t]{2,}", " ", out).replace(" )", ")").replace(" :", ":").strip()
    return out.encode("utf-8", "backslashreplace").decode("utf-8")


def describe_errors(errors: Iterable[Mapping[str, Any]], *, skip: int = 0) -> str:
    """pydantic / FastAPI error dicts → ``field.sub: problem; ...``.

    ``skip`` drops that many leading location parts (``body`` of a request).
    """
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())][skip:]
        parts.append(f"{'.'.join(loc) or 'value'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid value"


def user_message(exc: BaseException, *, local: bool = False) -> str:
    """One readable line: pydantic errors become ``invalid parameters: field: problem; ...``, a
    TorchScript error its model's own exception, anything else its first line.

    The line goes through :func:`public_text` (no object reprs, no server paths); ``local``
    keeps the paths (the command line, whose user owns the files)."""
    return public_text(_message(exc), paths=not local)


def _message(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "invalid parameters: " + describe_errors(exc.errors())
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file: {exc.filename}"
    text = str(exc).strip()
    if text.startswith("The following operation failed in the TorchScript interpreter"):
        # The model's own exception is the last line, after a TorchScript traceback.
        return "the model raised " + text.splitlines()[-1].removeprefix("builtins.")
    return text.splitlines()[0] if text else type(exc).__name__
