"""What the list routes share: their query parameters (``limit``, ``cursor``, ``label``), and
the checks of them that FastAPI cannot do alone (a cursor's form, a label filter's form)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from deepscope.contract.api import LABEL_KEY
from deepscope.contract.errors import ProblemType
from deepscope.service.deps import problem
from deepscope.store.records import CursorError, decode_cursor

__all__ = ["Cursor", "LabelFilter", "Limit", "check_cursor", "label_filters", "labels_match"]

Limit = Annotated[int, Query(ge=1, le=1000, description="items per page")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="the next_cursor of the previous page; none: the first"),
]
LabelFilter = Annotated[
    list[str] | None,
    Query(
        description="key=value: only items with this label (repeat: all of them)",
        examples=["branch=main"],
    ),
]


def _invalid(where: str, message: str) -> Exception:
    return problem(
        422,
        ProblemType.INVALID_PARAMS,
        f"{where}: {message}",
        errors=[{"loc": ["query", where], "msg": message, "type": "value_error"}],
    )


def check_cursor(cursor: str | None) -> None:
    """A 422 ``invalid_params`` for a cursor this service did not make, before any work."""
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except CursorError as exc:
            raise _invalid("cursor", str(exc)) from None


def label_filters(values: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` → ``{k: v}``; a 422 ``invalid_params`` for one that is not
    ``key=value`` with a valid key, or for two values of one key (no item has both)."""
    wanted: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not LABEL_KEY.fullmatch(key):
            raise _invalid("label", f"{item!r} is not key=value with a valid label key")
        if wanted.get(key, value) != value:
            raise _invalid("label", f"two values for label {key!r}")
        wanted[key] = value
    return wanted


def labels_match(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    """Does an item with ``labels`` have every label in ``wanted``?"""
    return all(labels.get(k) == v for k, v in wanted.items())
