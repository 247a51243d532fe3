"""The HTML pages: a job's report (pictures, metrics as tables, spectra) and the tenant's index.

Pure functions from the API's views (:class:`JobOut`, :class:`ModelOut`) to what the Jinja2
templates in ``templates/`` show; every value is escaped by Jinja2 (autoescape on). Picture URLs
get a signed link (:mod:`deepscope.service.links`) so that the browser can load them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from deepscope.service.schemas import ArtifactOut, JobOut, ModelOut

__all__ = [
    "HTML_HEADERS",
    "Figure",
    "Table",
    "downloads",
    "figures",
    "fmt",
    "metric_tables",
    "model_label",
    "prediction_table",
    "render_page",
]

#: Headers of every page: no scripts but our own, pictures only from here, no Referer (the
#: links carry signatures), never cached (they expire).
HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    "script-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

_TEMPLATES = Path(__file__).parent / "templates"


@cache
def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["when"] = _when
    return env


def render_page(template: str, **context: Any) -> str:
    """Render ``templates/{template}`` with ``context``."""
    return _environment().get_template(template).render(**context)


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    #: Row indices to highlight (e.g. a layer over a threshold).
    marked: set[int] = field(default_factory=set)


@dataclass
class Figure:
    name: str
    url: str
    description: str


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _generic_table(title: str, rows: Sequence[dict[str, Any]]) -> Table:
    """Columns: every key whose values are scalars or short shapes, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            short_list = isinstance(value, list) and len(value) <= 4
            if key not in columns and (_is_scalar(value) or short_list):
                columns.append(key)
    body = [[fmt(row.get(c), c) for c in columns] for row in rows]
    return Table(title, [c.replace("_", " ") for c in columns], body)


def _signal_space(metrics: dict[str, Any]) -> list[Table]:
    layers = metrics.get("layers") or []
    rows = []
    for layer in layers:
        sv = layer.get("singular_values") or []
        rows.append(
            [
                fmt(layer.get("name")),
                fmt(layer.get("kind")),
                fmt(layer.get("view")),
                fmt(layer.get("matrix_shape")),
                fmt(layer.get("rank")),
                fmt(layer.get("condition_number"), "condition_number"),
                fmt(layer.get("stable_rank")),
                fmt(layer.get("spectral_norm")),
                fmt(float(sv[-1]) if sv else None),
            ]
        )
    columns = [
        "layer",
        "kind",
        "view",
        "matrix",
        "rank",
        "condition number",
        "stable rank",
        "spectral norm",
        "smallest σ",
    ]
    note = (
        "condition number σ₁/σₙ (∞: singular); stable rank ‖W‖²_F/‖W‖²₂; "
        "the full spectra are in result.json and the plots below"
    )
    return [Table("Signal spaces: one row per layer", columns, rows, note)]


def _residuals(metrics: dict[str, Any]) -> list[Table]:
    layers = metrics.get("layers") or []
    summary = []
    for layer in layers:
        classes = layer.get("classes") or []
        lost = [float(c["lost_fraction"]) for c in classes if c.get("lost_fraction") is not None]
        worst = max(classes, key=lambda c: c.get("lost_fraction") or 0.0) if classes else {}
        summary.append(
            [
                fmt(layer.get("name")),
                fmt(layer.get("kind")),
                fmt(layer.get("input_shape")),
                fmt(sum(lost) / len(lost) if lost else None),
                fmt(max(lost) if lost else None),
                fmt(worst.get("class")),
            ]
        )
    tables = [
        Table(
            "Residuals: share of each layer's input it cannot see (null space)",
            ["layer", "kind", "input", "mean lost fraction", "max lost fraction", "worst class"],
            summary,
            "lost fraction ‖x − P_row(W)x‖² / ‖x‖²",
        )
    ]
    for layer in layers:
        rows = [
            [
                fmt(c.get("class")),
                fmt(c.get("input_norm")),
                fmt(c.get("residual_norm")),
                fmt(c.get("lost_fraction")),
                fmt(c.get("projection_relative_error")),
            ]
            for c in layer.get("classes") or []
        ]
        tables.append(
            Table(
                f"{layer.get('name')}: per class",
                ["class", "input norm", "residual norm", "lost fraction", "projection rel. error"],
                rows,
            )
        )
    return tables


_SPECIFIC = {"signal_space": _signal_space, "residuals": _residuals}


def metric_tables(analysis: str, metrics: dict[str, Any]) -> list[Table]:
    """The metrics as tables: the known analyses laid out for reading, any other list of
    records as a generic table, the remaining scalars as one summary table."""
    tables = _SPECIFIC[analysis](metrics) if analysis in _SPECIFIC else []
    handled = {"layers"} if analysis in _SPECIFIC else set()
    scalars: list[list[str]] = []
    for key, value in metrics.items():
        if key in handled:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            if analysis == "predict" and key == "predictions":
                tables.append(_predict_table(value))
            else:
                tables.append(_generic_table(key.replace("_", " "), value))
        elif _is_scalar(value) or (isinstance(value, list) and all(map(_is_scalar, value))):
            shown = ", ".join(fmt(v) for v in value) if isinstance(value, list) else fmt(value)
            scalars.append([key.replace("_", " "), shown])
    if scalars:
        tables.insert(0, Table("Summary", ["metric", "value"], scalars))
    return tables


def _top(top_k: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t.get('class')} {float(t.get('probability', 0.0)):.1%}" for t in top_k)


def _predict_table(predictions: list[dict[str, Any]]) -> Table:
    rows = []
    for i, pred in enumerate(predictions):
        top_k = pred.get("top_k") or [{}]
        rows.append(
            [str(i), fmt(top_k[0].get("class")), fmt(top_k[0].get("probability")), _top(top_k)]
        )
    return Table("Predictions", ["image", "class", "probability", "top classes"], rows)


def prediction_table(job: JobOut) -> Table | None:
    """What the model says about each image the analysis generated (None when none)."""
    result = job.result
    if result is None or result.predictions is None:
        return None
    rows = []
    for p in result.predictions.images:
        top_k = [t.model_dump(by_alias=True) for t in p.top_k]
        rows.append(
            [
                f"{p.artifact.rsplit('/', 1)[-1]} · {p.array} · #{p.index}",
                p.predicted_class,
                fmt(p.probability),
                _top(top_k),
            ]
        )
    return Table(
        "What the model says about the generated images",
        ["image (file · array · index)", "predicted class", "probability", "top classes"],
        rows,
        f"{result.predictions.input}; ask about any other image with POST {result.predictions.url}",
    )


def figures(artifacts: Sequence[ArtifactOut], query: str) -> tuple[list[Figure], list[Figure]]:
    """(spectrum plots, other pictures) with signed URLs."""
    spectra: list[Figure] = []
    pictures: list[Figure] = []
    for a in artifacts:
        if a.media_type != "image/png":
            continue
        fig = Figure(a.name, f"{a.url}?{query}", a.description)
        (spectra if a.name.startswith(("spectrum", "spectra")) else pictures).append(fig)
    return spectra, pictures


def downloads(artifacts: Sequence[ArtifactOut], query: str) -> list[Figure]:
    return [
        Figure(a.name, f"{a.url}?{query}", a.description or a.media_type)
        for a in artifacts
        if a.media_type != "image/png"
    ]


def model_label(model: ModelOut | None, model_id: str) -> str:
    return model.name if model is not None else f"model {model_id[:8]} (deleted)"
