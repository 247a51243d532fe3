"""Tables of metrics for people (the HTML report, the CLI): plain data, no HTML."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Table", "fmt", "generic_table", "is_scalar"]


@dataclass
class Table:
    """A titled table of formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    #: Row indices to highlight (e.g. a layer over a threshold).
    marked: set[int] = field(default_factory=set)


def fmt(value: Any, key: str = "") -> str:
    """One table cell: floats to 4 significant digits; a missing condition number is ∞."""
    if value is None:
        return "∞" if "condition" in key else "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, list):
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return "×".join(str(v) for v in value) if len(value) <= 4 else f"[{len(value)} values]"
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def generic_table(title: str, rows: Sequence[dict[str, Any]]) -> Table:
    """Columns: every key whose values are scalars or short lists, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            short_list = isinstance(value, list) and len(value) <= 4
            if key not in columns and (is_scalar(value) or short_list):
                columns.append(key)
    body = [[fmt(row.get(c), c) for c in columns] for row in rows]
    return Table(title, [c.replace("_", " ") for c in columns], body)
