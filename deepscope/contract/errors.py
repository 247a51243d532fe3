"""Error texts for people: one formatter of validation errors for the API, the CLI and the
workers, and one line from any exception."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

__all__ = ["describe_errors", "user_message"]


def describe_errors(errors: Iterable[Mapping[str, Any]], *, skip: int = 0) -> str:
    """pydantic / FastAPI error dicts → ``field.sub: problem; ...``.

    ``skip`` drops that many leading location parts (``body`` of a request).
    """
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())][skip:]
        parts.append(f"{'.'.join(loc) or 'value'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid value"


def user_message(exc: BaseException) -> str:
    """One readable line: pydantic errors become ``invalid parameters: field: problem; ...``, a
    TorchScript error its model's own exception, anything else its first line."""
    if isinstance(exc, ValidationError):
        return "invalid parameters: " + describe_errors(exc.errors())
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file: {exc.filename}"
    text = str(exc).strip()
    if text.startswith("The following operation failed in the TorchScript interpreter"):
        # The model's own exception is the last line, after a TorchScript traceback.
        return "the model raised " + text.splitlines()[-1].removeprefix("builtins.")
    return text.splitlines()[0] if text else type(exc).__name__
