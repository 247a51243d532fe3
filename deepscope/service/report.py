"""The HTML pages: a job's report (pictures, metrics as tables, spectra) and the tenant's index.

Pure functions from the API's views (:class:`JobOut`, :class:`ModelOut`) to what the Jinja2
templates in ``templates/`` show; every value is escaped by Jinja2 (autoescape on). Picture URLs
get a signed link (:mod:`deepscope.service.links`) so that the browser can load them.

A report with spectra also carries them as JSON (:func:`chart_data`, :func:`script_json`) that
``static/report.js`` draws with the vendored uPlot. The self-contained variant of a report
(:func:`standalone_assets`, :func:`data_uri`) inlines its scripts, styles and pictures, so that
the saved file opens from disk with no server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from deepscope.contract import Artifact, CompareOut, JobOut, ModelOut
from deepscope.contract.tables import Table, fmt

__all__ = [
    "CHART_SCRIPTS",
    "COMPARE_SCRIPTS",
    "HTML_HEADERS",
    "PROFILE_POINTS",
    "Figure",
    "Script",
    "StandaloneAssets",
    "chart_css",
    "chart_data",
    "compare_chart_data",
    "compare_table",
    "data_uri",
    "downloads",
    "figures",
    "model_label",
    "prediction_table",
    "render_page",
    "script_json",
    "served_scripts",
    "spectrum_of",
    "standalone_assets",
    "static_media_type",
    "static_text",
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
_STATIC = Path(__file__).parent / "static"


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


@dataclass
class Figure:
    name: str
    url: str
    description: str


def _top(top_k: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t.get('class')} {float(t.get('probability', 0.0)):.1%}" for t in top_k)


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


def figures(artifacts: Sequence[Artifact], query: str) -> tuple[list[Figure], list[Figure]]:
    """(spectrum plots, other pictures) with signed URLs."""
    spectra: list[Figure] = []
    pictures: list[Figure] = []
    for a in artifacts:
        if a.media_type != "image/png":
            continue
        fig = Figure(a.name, f"{a.url}?{query}", a.description)
        (spectra if a.name.startswith(("spectrum", "spectra")) else pictures).append(fig)
    return spectra, pictures


def downloads(artifacts: Sequence[Artifact], query: str) -> list[Figure]:
    return [
        Figure(a.name, f"{a.url}?{query}", a.description or a.media_type)
        for a in artifacts
        if a.media_type != "image/png"
    ]


def model_label(model: ModelOut | None, model_id: str) -> str:
    return model.name if model is not None else f"model {model_id[:8]} (deleted)"


# --- interactive spectra ----------------------------------------------------------------------

#: Most singular values of one layer that a page gets: as many as the bounded results'
#: ``spectrum.profile`` holds; the full lists of older results are thinned to it, so that a deep
#: model's page stays small.
PROFILE_POINTS = 256

#: The scripts of a report with charts, in the order they must run (report.js needs uPlot and
#: the shared pieces of charts.js).
CHART_SCRIPTS = ("uplot.iife.min.js", "charts.js", "report.js")
#: What a report compared with a baseline adds (after :data:`CHART_SCRIPTS`).
COMPARE_SCRIPTS = ("compare.js",)

#: What ``static/`` holds for pages: the only names the API serves from it.
_STATIC_MEDIA = {
    "ui.js": "text/javascript",
    "report.js": "text/javascript",
    "charts.js": "text/javascript",
    "compare.js": "text/javascript",
    "uplot.iife.min.js": "text/javascript",
    "uplot.min.css": "text/css",
}


def _finite(value: Any) -> float | None:
    """A JSON number, or None for anything else (JSON has no NaN nor ∞: they become null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _short(value: Any) -> float | None:
    # 6 significant digits: the page shows 4, and the JSON of a deep model's spectra halves.
    number = _finite(value)
    return None if number is None else float(f"{number:.6g}")


def _profile_indices(count: int, points: int = PROFILE_POINTS) -> list[int]:
    """Every index when ``count <= points``, else ``points`` evenly spaced ones from the first to
    the last (how the bounded results pick their profile)."""
    if count <= points:
        return list(range(count))
    return sorted({round(k * (count - 1) / (points - 1)) for k in range(points)})


def spectrum_of(layer: dict[str, Any]) -> dict[str, Any] | None:
    """A layer's spectrum as the page draws it: ``{count, max, min, complete, profile: {indices,
    values}}`` (the singular values at those 0-based indices, descending; ``complete`` false for
    a partial spectrum, its largest and smallest values only, which the page does not join).

    Taken from the layer's ``spectrum`` (bounded results); for results made before those,
    thinned from the full ``singular_values``. None without either, or when it does not hold
    together (indices and values of different lengths, indices out of range)."""
    spectrum = layer.get("spectrum")
    if isinstance(spectrum, dict):
        count = spectrum.get("count")
        profile = spectrum.get("profile")
        if isinstance(count, bool) or not isinstance(count, int) or not isinstance(profile, dict):
            return None
        indices, values = profile.get("indices"), profile.get("values")
        if not isinstance(indices, list) or not isinstance(values, list):
            return None
        if len(indices) != len(values) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in indices
        ):
            return None
        top, bottom = spectrum.get("max"), spectrum.get("min")
        complete = spectrum.get("complete") is not False
    else:
        full = layer.get("singular_values")
        if not isinstance(full, list):
            return None
        count = len(full)
        indices = _profile_indices(count)
        values = [full[i] for i in indices]
        top, bottom = (full[0], full[-1]) if full else (None, None)
        complete = True
    if count == 0 or not indices:
        return None
    shown = [_short(v) for v in values]
    return {
        "count": count,
        "max": _short(top) if _finite(top) is not None else shown[0],
        "min": _short(bottom) if _finite(bottom) is not None else shown[-1],
        "complete": complete,
        "profile": {"indices": indices, "values": shown},
    }


def chart_data(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What ``static/report.js`` draws, from ``metrics.layers``: each layer that has a spectrum
    with its ``name``, ``kind``, ``rank``, ``condition_number`` (None: unbounded) and
    ``spectrum`` (:func:`spectrum_of`), in depth order. None when no layer has a spectrum (the
    analysis has none to draw)."""
    layers = metrics.get("layers")
    if not isinstance(layers, list):
        return None
    drawn: list[dict[str, Any]] = []
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        spectrum = spectrum_of(layer)
        if spectrum is None:
            continue
        rank = layer.get("rank")
        drawn.append(
            {
                "name": str(layer.get("name") or f"layer {len(drawn) + 1}"),
                "kind": str(layer.get("kind") or ""),
                "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
                "condition_number": _short(layer.get("condition_number")),
                "spectrum": spectrum,
            }
        )
    return {"layers": drawn} if drawn else None


def _ratio(job: dict[str, Any], base: dict[str, Any]) -> dict[str, list[float | None]]:
    """σᵢ(job) / σ(baseline) at the job's profile points, against the relative index
    ``(i + 1) / count``. Where the two layers have as many singular values the indices pair up
    exactly; otherwise the baseline's log σ is interpolated linearly in the relative index (a
    reshaped layer is still compared along its spectrum). Zeros have no ratio (None)."""
    bx = [(i + 1) / base["count"] for i in base["profile"]["indices"]]
    by = base["profile"]["values"]
    xs: list[float | None] = []
    ratios: list[float | None] = []
    for i, v in zip(job["profile"]["indices"], job["profile"]["values"], strict=True):
        x = (i + 1) / job["count"]
        # The baseline's value at x: the segment of bx around x (clamped at both ends).
        k = next((j for j, b in enumerate(bx) if b >= x), len(bx) - 1)
        if k == 0 or bx[k] <= x:
            ref = by[k]
        else:
            lo, hi = by[k - 1], by[k]
            if lo is None or hi is None or lo <= 0 or hi <= 0:
                ref = None
            else:
                t = (x - bx[k - 1]) / (bx[k] - bx[k - 1])
                ref = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
        xs.append(float(f"{x:.6g}"))
        ok = v is not None and ref is not None and v > 0 and ref > 0
        ratios.append(_short(v / ref) if ok else None)
    return {"x": xs, "ratio": ratios}


def compare_chart_data(
    metrics: dict[str, Any], baseline: dict[str, Any], baseline_id: str
) -> dict[str, Any] | None:
    """What ``static/compare.js`` draws: for each layer both results have a spectrum of
    (matched by name, in the job's order), both spectra (:func:`spectrum_of`) and their ratio
    σᵢ/σᵢ(baseline) (:func:`_ratio`). None when no layer has both."""
    mine, theirs = chart_data(metrics), chart_data(baseline)
    if mine is None or theirs is None:
        return None
    by_name = {layer["name"]: layer for layer in theirs["layers"]}
    layers = []
    for layer in mine["layers"]:
        other = by_name.get(layer["name"])
        if other is None:
            continue
        layers.append(
            {
                "name": layer["name"],
                "job": layer["spectrum"],
                "baseline": other["spectrum"],
                "condition_number": layer["condition_number"],
                "baseline_condition_number": other["condition_number"],
                "difference": _ratio(layer["spectrum"], other["spectrum"]),
            }
        )
    return {"baseline_id": baseline_id, "layers": layers} if layers else None


def _change(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1%}"


def compare_table(diff: CompareOut) -> Table:
    """The comparison as a table for people: one row per layer and metric, then job-level
    metrics; layers on one side only are named in the note."""
    rows = [
        [
            d.layer,
            name.replace("_", " "),
            fmt(m.value),
            fmt(m.baseline),
            fmt(m.difference),
            _change(m.relative_change),
        ]
        for d in diff.layers
        for name, m in d.metrics.items()
    ]
    rows += [
        [
            "(job)",
            name.replace("_", " "),
            fmt(m.value),
            fmt(m.baseline),
            fmt(m.difference),
            _change(m.relative_change),
        ]
        for name, m in diff.metrics.items()
    ]
    notes = ["change = (this job − baseline) / |baseline|; — where either is ∞ or the baseline 0"]
    if diff.only_in_job:
        notes.append("only in this job: " + ", ".join(diff.only_in_job))
    if diff.only_in_baseline:
        notes.append("only in the baseline: " + ", ".join(diff.only_in_baseline))
    return Table(
        f"Compared with baseline {diff.baseline_id}",
        ["layer", "metric", "this job", "baseline", "difference", "change"],
        rows,
        "; ".join(notes),
    )


_SCRIPT_UNSAFE = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def script_json(value: Any) -> Markup:
    """``value`` as JSON to place inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` become ``\\u003c`` and friends (the same string to JSON.parse), so
    that no ``</script>`` or ``<!--`` in a layer name can end the element or change how the
    HTML parser reads it. NaN and ∞ are not JSON: pass None (:func:`chart_data` does)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Markup(text.translate(_SCRIPT_UNSAFE))  # made inert just above


# --- scripts, styles and the self-contained report ---------------------------------------------


@dataclass(frozen=True)
class Script:
    """One ``<script>`` of a page: ``src`` (served by the API) or ``text`` (inlined)."""

    src: str = ""
    text: Markup = field(default_factory=Markup)


def static_media_type(name: str) -> str | None:
    """The media type of ``static/{name}``; None for a name the API does not serve."""
    return _STATIC_MEDIA.get(name)


@cache
def static_text(name: str) -> str:
    """``static/{name}`` (one of the served names; KeyError else)."""
    if name not in _STATIC_MEDIA:
        raise KeyError(name)
    return (_STATIC / name).read_text(encoding="utf-8")


def _inert(text: str, element: str) -> Markup:
    """``text`` to inline between ``<{element}>`` tags. Our own files never contain the two
    sequences that the HTML parser reacts to there; a vendored upgrade that did fails loudly
    here (and in the tests) instead of breaking pages."""
    if re.search(rf"</{element}|<!--", text, flags=re.IGNORECASE):
        raise ValueError(f"a static file holds </{element} or <!--: it cannot be inlined")
    return Markup(text)  # our own files, checked just above


def chart_css() -> Markup:
    """uPlot's stylesheet, for an inline ``<style>`` (the pages' CSP allows inline styles only)."""
    return _inert(static_text("uplot.min.css"), "style")


def served_scripts(names: Sequence[str]) -> list[Script]:
    """``<script src>`` tags for ``static/`` files, as the live pages load them."""
    return [Script(src=f"/v1/ui/static/{name}") for name in names]


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@dataclass(frozen=True)
class StandaloneAssets:
    """The inlined scripts of a self-contained page and the policy that lets only them run."""

    scripts: list[Script]
    #: For the page's ``<meta http-equiv="Content-Security-Policy">``, which applies when the
    #: file is opened from disk: nothing may be fetched, only these scripts run.
    meta_csp: str
    #: The HTTP response's headers (its CSP adds frame-ancestors: a <meta> policy cannot carry
    #: it, and the browser logs an error when it tries).
    headers: dict[str, str]


def standalone_assets(names: Sequence[str]) -> StandaloneAssets:
    """The ``static/`` scripts ``names`` inlined, allowed by their hashes (no 'unsafe-inline':
    a name or a caption that smuggled markup in still could not run a script)."""
    texts = [_inert(static_text(name), "script") for name in names]
    hashes = " ".join(_sha256_source(str(t)) for t in texts)
    meta_csp = (
        f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {hashes}; "
        "base-uri 'none'; form-action 'none'"
    )
    headers = {
        **HTML_HEADERS,
        "Content-Security-Policy": f"{meta_csp}; frame-ancestors 'none'",
    }
    return StandaloneAssets([Script(text=t) for t in texts], meta_csp, headers)


def data_uri(media_type: str, data: bytes) -> str:
    """``data:`` URL of a file, for a page that must show it without the service."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
