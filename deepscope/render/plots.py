"""Plots that need axes: all of a job's spectra in one figure, and curves over layers.

Matplotlib's object API (``Figure``), never pyplot: no global figure registry to leak in a
long-lived worker and no display backend to pick. One ``Figure`` per PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, LogLocator

__all__ = ["SpectrumLine", "curves_plot", "spectra_figure"]

_DPI: Final = 110
_LEGEND_MAX: Final = 12  # more layers than this: a depth colourbar instead of a legend
_TICKS_MAX: Final = 40  # more layer names than this on an axis: label every k-th


@dataclass(frozen=True)
class SpectrumLine:
    """One layer's singular-value profile, maybe decimated.

    ``values`` (k,) are σ at the 0-based positions ``indices`` (k,) of the full descending
    spectrum of ``count`` values, so it is drawn at x = (index + 1) / count.
    ``condition_number`` is σ₁/σₙ; None or inf when unbounded (σₙ = 0).
    """

    name: str
    indices: np.ndarray
    values: np.ndarray
    count: int
    condition_number: float | None

    def __post_init__(self) -> None:
        indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        if indices.shape != values.shape:
            raise ValueError(
                f"{self.name}: {indices.size} indices for {values.size} singular values"
            )
        if indices.size and (indices.min() < 0 or indices.max() >= self.count):
            raise ValueError(f"{self.name}: indices must lie in [0, {self.count})")
        # Frozen: normalise the arrays once, here.
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "values", values)

    @classmethod
    def full(
        cls, name: str, values: np.ndarray, condition_number: float | None = None
    ) -> SpectrumLine:
        """A whole spectrum (n,); the condition number defaults to σ₁/σₙ (None if σₙ = 0)."""
        sv = np.asarray(values, dtype=np.float64).reshape(-1)
        if condition_number is None and sv.size and sv[-1] > 0:
            condition_number = float(sv[0] / sv[-1])
        return cls(name, np.arange(sv.size), sv, int(sv.size), condition_number)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI, bbox_inches="tight")
    return out


def _log_axis(axis: Any) -> None:
    """Every decade labelled (up to 13, then every other), minor ticks 2…9 for the grid."""
    axis.set_major_locator(LogLocator(base=10.0, numticks=13))
    axis.set_major_formatter(LogFormatterSciNotation(base=10.0))
    axis.set_minor_locator(LogLocator(base=10.0, subs=tuple(range(2, 10)), numticks=100))
    # Spans of ≤ 2 decades would show one or two labels: label some minor ticks (2, 3, 5…).
    axis.set_minor_formatter(
        LogFormatterSciNotation(base=10.0, labelOnlyBase=False, minor_thresholds=(2, 0.5))
    )


def _name_ticks(ax: Any, names: Sequence[str]) -> None:
    """Layer names under the x axis, rotated; every k-th when there are more than 40."""
    step = max(1, math.ceil(len(names) / _TICKS_MAX))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks], rotation=60, fontsize=7, ha="right")
    ax.set_xlim(-0.6, len(names) - 0.4)


def spectra_figure(
    layers: Sequence[SpectrumLine], path: str | os.PathLike[str], *, title: str
) -> Path:
    """All layers' spectra of a job in one PNG; returns ``path``.

    Left: σᵢ/σ₁ against i/n (log y), one line per layer coloured by depth (legend up to 12
    layers, else a depth colourbar). Right: condition number σ₁/σₙ by depth (log y), with
    unbounded ones as "∞" markers at the top.
    """
    if not layers:
        raise ValueError("spectra_figure needs at least one layer")
    count = len(layers)
    cmap = colormaps["viridis"]
    colours = [cmap(k / max(count - 1, 1)) for k in range(count)]
    fig = Figure(figsize=(12.5, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.15, 1.0))

    ratios: list[tuple[np.ndarray, np.ndarray]] = []
    for line in layers:
        v = line.values
        top = float(v.max()) if v.size else 0.0
        if top <= 0.0 or not math.isfinite(top):
            ratios.append((np.empty(0), np.empty(0)))
            continue
        ratios.append(((line.indices + 1) / line.count, v / top))
    positive = [float(r[r > 0].min()) for _, r in ratios if (r > 0).any()]
    # σᵢ = 0 has no place on a log axis: draw it at a floor a decade below the smallest
    # positive ratio, and say so, rather than dropping the rank deficiency silently.
    floor = 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-16
    zeros = False
    for k, (line, (x, r)) in enumerate(zip(layers, ratios, strict=True)):
        if r.size == 0:
            continue
        zeros = zeros or bool((r <= 0).any())
        left.plot(
            x,
            np.where(r > 0, r, floor),
            color=colours[k],
            lw=1.2 if count <= _LEGEND_MAX else 0.9,
            marker="." if r.size <= 40 else None,
            ms=3,
            label=line.name,
        )
    left.set_yscale("log")
    _log_axis(left.yaxis)
    left.set_xlim(0.0, 1.0)
    left.set_ylim(floor / 2 if zeros else None, 1.6)
    left.set_xlabel("relative index i / n")
    left.set_ylabel("σᵢ / σ₁")
    left.grid(True, which="major", alpha=0.45)
    left.grid(True, which="minor", alpha=0.15)
    if zeros:
        left.axhline(floor, color="0.4", lw=0.8, ls=":")
        left.text(0.99, floor * 1.4, "σᵢ = 0 drawn here", ha="right", va="bottom", fontsize=7)
    if count <= _LEGEND_MAX:
        left.legend(fontsize=7, loc="lower left")
    else:
        bar = fig.colorbar(
            ScalarMappable(norm=Normalize(0, count - 1), cmap=cmap), ax=left, pad=0.01
        )
        bar.set_ticks([0, count - 1])
        bar.set_ticklabels([layers[0].name, layers[-1].name], fontsize=7)
        bar.set_label("layer depth", fontsize=8)
        bar.ax.yaxis.set_label_position("left")  # names on the right, the label beside the bar

    depth = np.arange(count)
    cond = np.array(
        [
            np.inf if c is None or math.isnan(c) else float(c)
            for c in (x.condition_number for x in layers)
        ]
    )
    bounded = np.isfinite(cond) & (cond > 0)
    right.set_yscale("log")
    if bounded.any():
        right.plot(depth[bounded], cond[bounded], color="0.6", lw=0.8, zorder=1)
        right.scatter(
            depth[bounded],
            cond[bounded],
            c=[colours[k] for k in depth[bounded]],
            s=18,
            zorder=2,
            edgecolors="0.2",
            linewidths=0.4,
        )
        lo, hi = float(cond[bounded].min()), float(cond[bounded].max())
    else:
        lo, hi = 1.0, 10.0
    unbounded = ~bounded
    top = 10.0 ** (math.ceil(math.log10(hi)) + 1)
    if unbounded.any():
        right.scatter(
            depth[unbounded],
            np.full(unbounded.sum(), top),
            marker="^",
            s=40,
            color="crimson",
            zorder=3,
            label="unbounded (σₙ = 0)",
        )
        for k in depth[unbounded]:
            right.annotate(
                "∞",
                (float(k), top),
                textcoords="offset points",
                xytext=(0, 5),
                ha="center",
                fontsize=9,
                color="crimson",
            )
        right.legend(fontsize=7, loc="lower right")
    # Headroom for the ∞ markers only when there are some.
    right.set_ylim(lo / 3, top * 4 if unbounded.any() else hi * 3)
    _log_axis(right.yaxis)
    _name_ticks(right, [x.name for x in layers])
    right.set_ylabel("condition number σ₁ / σₙ")
    right.grid(True, which="major", alpha=0.45)
    right.grid(True, which="minor", alpha=0.15)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def curves_plot(
    x_labels: Sequence[str],
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str,
    logy: bool = False,
) -> Path:
    """One line per key of ``curves`` over the named x positions (e.g. layers by depth).

    Each curve holds len(x_labels) values (NaN: a gap). ``logy``: log y axis, where values
    ≤ 0 are not drawn. Returns ``path``.
    """
    for label, values in curves.items():
        if len(values) != len(x_labels):
            raise ValueError(f"curve {label!r} has {len(values)} values for {len(x_labels)} x")
    fig = Figure(
        figsize=(max(5.5, min(0.3 * len(x_labels) + 3.5, 16.0)), 3.8), layout="constrained"
    )
    ax = fig.subplots()
    x = np.arange(len(x_labels))
    for label, values in curves.items():
        ax.plot(x, np.asarray(values, dtype=np.float64), marker="o", ms=3, label=label)
    if logy:
        ax.set_yscale("log", nonpositive="mask")
        _log_axis(ax.yaxis)
    _name_ticks(ax, list(x_labels))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.4)
    if logy:
        ax.grid(True, which="minor", alpha=0.12)
    if curves:
        # Many curves: the legend goes outside, in columns, rather than over the data.
        many = len(curves) > 8
        ax.legend(
            fontsize=7,
            ncol=max(1, math.ceil(len(curves) / 20)) if many else 1,
            loc="upper left" if many else "best",
            bbox_to_anchor=(1.01, 1.0) if many else None,
        )
    return _save(fig, path)
