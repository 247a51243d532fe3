"""Error texts for people: one formatter of validation errors for the API, the CLI and the
workers, and one line from any exception."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

__all__ = ["add_private_root", "describe_errors", "public_text", "user_message"]

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
