"""User text, checked where it comes in: one validator for every string a client sends (a
manifest, a job's params, the class names of an uploaded dataset), and a JSON reader that
refuses deep nesting before it parses.

A JSON string may hold an escaped lone surrogate (``"\\ud800"``): Python decodes it into a
``str`` that cannot be encoded as UTF-8, so it would fail later, far from the request (writing
the record to Redis, logging it, rendering a response). :func:`check_text` refuses it up front
and names the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_JSON_DEPTH",
    "TextError",
    "check_text",
    "json_depth",
    "load_json",
    "text_problem",
]

#: Arrays and objects nested deeper than this are refused (a manifest needs 3 levels).
MAX_JSON_DEPTH = 32

_SURROGATE = re.compile("[\ud800-\udfff]")
#: A JSON string literal (escapes included), then any bracket outside of strings.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class TextError(ValueError):
    """User text that is not valid Unicode, or JSON nested too deeply (HTTP 422)."""


def text_problem(value: str) -> str | None:
    """Why ``value`` is not valid text (it holds a lone surrogate), or None when it is."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return (
        f"is not valid Unicode text: it holds a lone surrogate (U+{ord(found.group()):04X}) "
        f"at character {found.start()}"
    )


def _join(where: str, key: object) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


def check_text(value: Any, where: str = "") -> None:
    """Every string in ``value`` (nested dicts, lists and tuples, keys too) is valid text.

    Raises:
        TextError: naming the first bad one (``manifest.name``, ``layers[0]``).
    """
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                raise TextError(f"{path or 'value'} {problem}")
        elif isinstance(item, Mapping):
            for key, sub in item.items():
                name = _join(path, key if isinstance(key, str) else str(key))
                if isinstance(key, str) and text_problem(key) is not None:
                    raise TextError(f"a key of {path or 'the object'} {text_problem(key)}")
                stack.append((sub, name))
        elif isinstance(item, list | tuple):
            stack.extend((sub, _join(path, i)) for i, sub in enumerate(item))


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in the JSON ``text`` (strings are skipped)."""
    depth = deepest = 0
    for token in _JSON_TOKEN.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def load_json(text: str, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse user JSON: nesting checked before parsing (``json`` recurses, and a deep enough
    document exhausts the stack), then every string checked (:func:`check_text`).

    Raises:
        TextError: nested deeper than ``max_depth``, not valid JSON, or invalid text; the
            message names ``what``.
    """
    if json_depth(text) > max_depth:
        raise TextError(f"{what} nests arrays or objects deeper than {max_depth} levels")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TextError(f"{what} is not valid JSON: {exc.msg} (at character {exc.pos})") from None
    except RecursionError:  # unreachable after the depth check; kept as a guard
        raise TextError(f"{what} nests arrays or objects too deeply") from None
    check_text(value, what)
    return value
