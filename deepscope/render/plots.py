"""Plots that need axes: all of a job's spectra in one figure, and curves over layers.

:func:`spectra_figure` is on every ``signal_space`` job's path, so it is drawn with numpy +
Pillow in a few milliseconds (matplotlib took ~250 ms a figure): lines, grid and text drawn
straight onto one RGB image, text from cached stamps, one PNG encode. It touches as little
memory as it can, since a forked job pays for every fresh page. Its layout (the two plot
boxes and their data ranges) is stored in the PNG's ``deepscope:axes`` text chunk, for
tests and clients.

:func:`curves_plot` uses matplotlib's object API (``Figure``), never pyplot: no global
figure registry to leak in a long-lived worker and no display backend to pick.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, LogLocator
from PIL import Image, ImageDraw

from deepscope.render import text as txt
from deepscope.render.colors import colormap_lut
from deepscope.render.grid import write_png

__all__ = ["AXES_KEY", "SpectrumLine", "curves_plot", "spectra_figure"]

_DPI: Final = 110
_LEGEND_MAX: Final = 12  # more layers than this: a depth colourbar instead of a legend
_TICKS_MAX: Final = 40  # more layer names than this on an axis: label every k-th


@dataclass(frozen=True)
class SpectrumLine:
    """One layer's singular-value profile, maybe decimated.

    ``values`` (k,) are σ at the 0-based positions ``indices`` (k,) of the full descending
    spectrum of ``count`` values, so it is drawn at x = (index + 1) / count.
    ``condition_number`` is σ₁/σₙ; None or inf when unbounded (σₙ = 0).
    ``partial``: only some values are known (e.g. the largest and smallest of an operator), so
    the line joins consecutive indices only and each known value gets a dot: a gap is not
    bridged by a line that would suggest values nobody computed.
    """

    name: str
    indices: np.ndarray
    values: np.ndarray
    count: int
    condition_number: float | None
    partial: bool = False

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


# --- the spectra figure: numpy + Pillow ----------------------------------------------------

Colour = tuple[int, int, int]

# Layout, in pixels.
_MARGIN: Final = 12
_PLOT_H: Final = 340
_LEFT_W: Final = 520
_RIGHT_W: Final = 470  # at most; a few layers get a narrower plot (fewer pixels to encode)
_NAME_MAX: Final = 240  # layer names are cut to this width (legend, colour bar, ticks)
_BAND: Final = 28  # the condition plot's "∞" band above its finite range, when needed
_BAND_GAP: Final = 16  # between the band's separator and the finite range's top
_DECADES_MAX: Final = 12  # more decades than this on an axis: label every k-th
_DECADE_STEPS: Final = (1, 2, 3, 5, 10, 20, 25, 50, 100)
_MINOR_MIN_PX: Final = 28  # minor grid lines (2…9 × 10^k) only when a decade is this tall
_DOTS_MAX: Final = 40  # a spectrum with at most this many values gets a dot per value

_WHITE: Final = (255, 255, 255)
_BLACK: Final = (0, 0, 0)
_GREY_TEXT: Final = (70, 70, 70)
_GRID_MAJOR: Final = (214, 214, 214)
_GRID_MINOR: Final = (240, 240, 240)
_JOIN: Final = (150, 150, 150)
_EDGE: Final = (50, 50, 50)
_ZERO_LINE: Final = (100, 100, 100)
_UNBOUNDED: Final = (220, 20, 60)  # crimson
_UNBOUNDED_TEXT: Final = (180, 0, 40)


@dataclass(frozen=True)
class _Axes:
    """A plot box on the figure and its data → pixel map (y in log10 units).

    ``u``/``v`` give continuous offsets inside the box: x from ``xlim[0]`` (0) to
    ``xlim[1]`` (width), y from ``ylim[1]`` (``top``) down to ``ylim[0]`` (height); the
    first ``top`` pixels are kept for the "∞" band.
    """

    x0: int
    y0: int
    width: int
    height: int
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    top: int = 0

    def u(self, x: Any) -> Any:
        return (np.asarray(x, dtype=np.float64) - self.xlim[0]) * (
            self.width / (self.xlim[1] - self.xlim[0])
        )

    def v(self, ly: Any) -> Any:
        return self.top + (self.ylim[1] - np.asarray(ly, dtype=np.float64)) * (
            (self.height - self.top) / (self.ylim[1] - self.ylim[0])
        )

    def row(self, ly: float) -> int:
        """The figure's pixel row of the value at log10 ``ly`` (inside the box)."""
        return self.y0 + min(max(int(self.v(ly)), 0), self.height - 1)

    def column(self, x: float) -> int:
        return self.x0 + min(max(int(self.u(x)), 0), self.width - 1)

    def points(self, x: np.ndarray, ly: np.ndarray) -> list[float]:
        """Flat [x, y, x, y, …] figure coordinates of the data points."""
        xy = np.column_stack((self.u(x) + self.x0, self.v(ly) + self.y0))
        return list(xy.ravel())

    def hline(self, draw: ImageDraw.ImageDraw, ly: float, fill: Colour, dash: int = 0) -> None:
        """A 1-px horizontal line across the box; ``dash``: dashes of that many pixels."""
        y = self.row(ly)
        if not dash:
            draw.line((self.x0, y, self.x0 + self.width - 1, y), fill=fill)
            return
        for x in range(self.x0, self.x0 + self.width, 2 * dash):
            draw.line((x, y, min(x + dash, self.x0 + self.width) - 1, y), fill=fill)

    def vline(self, draw: ImageDraw.ImageDraw, x: float, fill: Colour) -> None:
        c = self.column(x)
        draw.line((c, self.y0, c, self.y0 + self.height - 1), fill=fill)

    def frame(self, draw: ImageDraw.ImageDraw) -> None:
        box = (self.x0 - 1, self.y0 - 1, self.x0 + self.width, self.y0 + self.height)
        draw.rectangle(box, outline=_BLACK)

    def layout(self) -> dict[str, Any]:
        return {
            "box": [self.x0, self.y0, self.x0 + self.width, self.y0 + self.height],
            "x": list(self.xlim),
            "log10_y": list(self.ylim),
            "top_band": self.top,
        }


def _log_ticks(
    lo: float, hi: float, pixels: int
) -> tuple[list[tuple[int, int]], list[int], list[float]]:
    """(labels (mantissa, exponent), decades with a grid line, minor grid lines), log10.

    Every decade in [lo, hi] is labelled, or every k-th past 12 (k = 2, 3, 5, 10…; always
    10⁰); a span of at most 2.2 decades also labels 2× and 5× each decade. Minor lines at
    2…9 × each decade only where a decade is tall enough for them to be lines, not a wash.
    """
    first, last = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
    decades = list(range(first, last + 1))
    need = len(decades) / _DECADES_MAX
    step = next((k for k in _DECADE_STEPS if k >= need), math.ceil(need))
    labels = [(1, e) for e in decades if e % step == 0]
    if hi - lo <= 2.2:
        for e in range(math.floor(lo), math.ceil(hi)):
            labels += [(m, e) for m in (2, 5) if lo < e + math.log10(m) < hi]
    per_decade = pixels / max(hi - lo, 1e-9)
    lines = decades if per_decade >= 6 else [e for m, e in labels if m == 1]
    minors: list[float] = []
    if per_decade >= _MINOR_MIN_PX:
        subs = np.log10(np.arange(2, 10))
        for e in range(math.floor(lo), math.ceil(hi)):
            minors += [float(e + s) for s in subs if lo < e + s < hi]
    return labels, lines, minors


_SUPERSCRIPT_RAISE: Final = 5


@lru_cache(maxsize=128)
def _power_stamp(mantissa: int, exponent: int) -> Image.Image:
    """The label "10^exponent" (or "m×10^exponent") as an "L" mask, cached; the exponent
    smaller and raised: Unicode superscript digits are too small to read at this size."""
    base, small = txt.font(12), txt.font(10)
    head = "10" if mantissa == 1 else f"{mantissa}×10"
    exp = str(exponent).replace("-", "−")
    wb, we = txt.text_width(base, head), txt.text_width(small, exp)
    mask = Image.new("L", (wb + 1 + we, txt.line_height(base) + _SUPERSCRIPT_RAISE), 0)
    draw = ImageDraw.Draw(mask)
    draw.text((0, _SUPERSCRIPT_RAISE), head, font=base, fill=255, anchor="la")
    draw.text((wb + 1, 0), exp, font=small, fill=255, anchor="la")
    return mask


def _decade_labels(figure: Image.Image, axes: _Axes, labels: Sequence[tuple[int, int]]) -> None:
    """Right-aligned "10ᵏ" left of the axis, centred on each labelled tick."""
    centre = _SUPERSCRIPT_RAISE + txt.line_height(txt.font(12)) / 2
    for m, e in labels:
        mask = _power_stamp(m, e)
        y = round(axes.row(e + math.log10(m)) - centre + 0.5)
        x = axes.x0 - 8 - mask.width
        figure.paste(_BLACK, (x, y, x + mask.width, y + mask.height), mask)


def _y_ticks(
    draw: ImageDraw.ImageDraw, axes: _Axes, majors: Sequence[float], minors: Sequence[float]
) -> None:
    for ly, length in [(m, 5) for m in majors] + [(m, 3) for m in minors]:
        y = axes.row(ly)
        draw.line((axes.x0 - 1 - length, y, axes.x0 - 2, y), fill=_BLACK)


def _depth_colours(count: int) -> list[Colour]:
    """Viridis by depth, first layer dark: entry floor(256·k/(count − 1)), as matplotlib."""
    lut = colormap_lut("viridis")
    picks = [min(int(k / max(count - 1, 1) * 256), 255) for k in range(count)]
    return [(int(lut[i, 0]), int(lut[i, 1]), int(lut[i, 2])) for i in picks]


def _conditions(layers: Sequence[SpectrumLine]) -> np.ndarray:
    return np.array(
        [
            np.inf if c is None or math.isnan(c) else float(c)
            for c in (x.condition_number for x in layers)
        ],
        dtype=np.float64,
    )


AXES_KEY: Final = "deepscope:axes"
"""PNG text chunk of :func:`spectra_figure`: JSON {"spectra": …, "condition": …}, each with
the plot's "box" [x0, y0, x1, y1) in pixels, its "x" limits, "log10_y" limits (of the part
under "top_band" pixels, the "∞" band of unbounded condition numbers)."""


def spectra_figure(
    layers: Sequence[SpectrumLine], path: str | os.PathLike[str], *, title: str
) -> Path:
    """All layers' spectra of a job in one PNG; returns ``path``.

    Left: σᵢ/σ₁ against i/n (log y), one line per layer coloured by depth (legend up to 12
    layers, else a depth colourbar); σᵢ = 0 is drawn on a dotted floor a decade below the
    smallest positive ratio. Right: condition number σ₁/σₙ by depth (log y), with
    unbounded ones (None, inf, NaN) as red triangles in an "∞" band at the top.
    The plot boxes and their ranges are stored in the PNG (:data:`AXES_KEY`).
    """
    if not layers:
        raise ValueError("spectra_figure needs at least one layer")
    count = len(layers)
    colours = _depth_colours(count)
    tick_face, label_face, small = txt.font(12), txt.font(13), txt.font(11)
    title_face, infinity_face = txt.font(15, bold=True), txt.font(16)
    lh_small, lh_label = txt.line_height(small), txt.line_height(label_face)

    # Left: each layer's profile normalised by its largest value.
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
    # In log10 units: 10**floor may underflow for subnormal ratios.
    floor = float(math.floor(math.log10(min(positive))) - 1) if positive else -16.0
    zeros = any(bool((r <= 0).any()) for _, r in ratios)
    if zeros:
        bottom = floor - 0.3
    elif positive:
        low = math.log10(min(positive))
        # Down to the decade below the data, unless that wastes most of a decade.
        bottom = low - 0.15 if low - math.floor(low) < 0.1 else float(math.floor(low))
        bottom = min(bottom, -1.0)  # 10⁻¹ and 10⁰ at least: two labelled decades
    else:
        bottom = -1.0
    left_y = (bottom, math.log10(1.6))

    # Right: condition numbers, the unbounded ones in a band above the finite range.
    cond = _conditions(layers)
    bounded = np.isfinite(cond) & (cond > 0)
    unbounded = ~bounded
    log_cond = np.log10(np.where(bounded, cond, 1.0))
    if bounded.any():
        right_y = (
            float(math.floor(log_cond[bounded].min() - 0.15)),
            float(math.ceil(log_cond[bounded].max() + 0.15)),
        )
    else:
        right_y = (0.0, 1.0)
    band = _BAND if unbounded.any() else 0
    top = band + _BAND_GAP if band else 0

    left_ticks = _log_ticks(*left_y, _PLOT_H)
    right_ticks = _log_ticks(*right_y, _PLOT_H - top)

    # Horizontal layout: [y label | ticks | left plot | legend | y label | ticks | right plot].
    names = [txt.fit_middle(small, x.name, _NAME_MAX) for x in layers]
    left_tw = max(_power_stamp(m, e).width for m, e in left_ticks[0])
    right_tw = max(
        [_power_stamp(m, e).width for m, e in right_ticks[0]]
        + [txt.text_width(infinity_face, "∞") if band else 0]
    )
    x_left = _MARGIN + lh_label + 6 + left_tw + 8
    side_x = x_left + _LEFT_W + 16
    drawn = [k for k in range(count) if ratios[k][1].size]
    legend = count <= _LEGEND_MAX
    if legend:
        side_w = 30 + max([txt.text_width(small, names[k]) for k in drawn] + [0])
    else:
        ends = max(txt.text_width(small, names[0]), txt.text_width(small, names[-1]))
        side_w = lh_small + 4 + 14 + 6 + ends
    x_right = side_x + side_w + 24 + lh_label + 6 + right_tw + 8
    right_w = min(_RIGHT_W, 280 + 40 * count)
    width = x_right + right_w + _MARGIN + 8

    # Vertical: title, a note row, the plots, then tick labels / rotated layer names.
    y_plot = _MARGIN + txt.line_height(title_face) + 8 + lh_small + 4
    step = max(1, math.ceil(count / _TICKS_MAX), math.ceil(count * (lh_small + 1) / right_w))
    shown = list(range(0, count, step))
    names_h = max(txt.text_width(small, names[k]) for k in shown)
    below = max(8 + txt.line_height(tick_face) + 6 + lh_label, 10 + names_h)
    height = y_plot + _PLOT_H + below + _MARGIN

    figure = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(figure)
    caption = txt.fit(title_face, title, width - 2 * _MARGIN)
    txt.paste_text(figure, (width / 2, _MARGIN), caption, title_face, _BLACK, "ma")

    # --- left: the spectra ---
    left = _Axes(x_left, y_plot, _LEFT_W, _PLOT_H, (0.0, 1.0), left_y)
    labelled, lines, minors = left_ticks
    for ly in minors:
        left.hline(draw, ly, _GRID_MINOR)
    for gx in (0.2, 0.4, 0.6, 0.8):
        left.vline(draw, gx, _GRID_MAJOR)
    for e in lines:
        left.hline(draw, e, _GRID_MAJOR)
    if zeros:
        left.hline(draw, floor, _ZERO_LINE, dash=2)
    # Drawn straight on the figure, without antialiasing: a supersampled data area (4× the
    # pixels, then reduced) costs more than the rest of the figure in a freshly forked job.
    line_width = 1 if count > _LEGEND_MAX else 2
    for k in drawn:
        xs, rs = ratios[k]
        log_r = np.full(rs.shape, floor)
        np.log10(rs, out=log_r, where=rs > 0)
        xy = left.points(xs, log_r)
        runs = [xy]
        if layers[k].partial:
            # Break the line wherever indices skip (two points per index in xy).
            cuts = (np.flatnonzero(np.diff(layers[k].indices) > 1) + 1) * 2
            runs = [xy[a:b] for a, b in zip([0, *cuts], [*cuts, len(xy)], strict=True)]
        for run in runs:
            if len(run) >= 4:
                draw.line(run, fill=colours[k], width=line_width, joint="curve")
        if rs.size <= _DOTS_MAX or layers[k].partial:
            for px, py in zip(xy[::2], xy[1::2], strict=True):
                qx, qy = round(px), round(py)
                draw.ellipse((qx - 3, qy - 3, qx + 3, qy + 3), fill=colours[k])
    left.frame(draw)
    _y_ticks(draw, left, lines, minors)
    _decade_labels(figure, left, labelled)
    for tx in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        px = left.column(tx)
        draw.line((px, left.y0 + left.height, px, left.y0 + left.height + 4), fill=_BLACK)
        label = f"{tx:.1f}"
        txt.paste_text(
            figure, (px + 0.5, left.y0 + left.height + 7), label, tick_face, _BLACK, "ma"
        )
    y_xlabel = left.y0 + left.height + 8 + txt.line_height(tick_face) + 4
    txt.paste_text(
        figure,
        (left.x0 + left.width / 2, y_xlabel),
        "relative index i / n",
        label_face,
        _BLACK,
        "ma",
    )
    txt.paste_text(
        figure,
        (_MARGIN, left.y0 + left.height / 2),
        "σᵢ / σ₁",
        label_face,
        _BLACK,
        "lm",
        rotate=True,
    )
    if zeros:
        y = left.row(floor) - 2
        note = "σᵢ = 0 drawn here"
        box = (left.x0 + 4, y - lh_small, left.x0 + 8 + txt.text_width(small, note), y)
        draw.rectangle(box, fill=_WHITE)
        txt.paste_text(figure, (left.x0 + 6, y), note, small, _GREY_TEXT, "ld")

    # --- between: a legend, or a depth colour bar ---
    if legend:
        y = left.y0 + 2
        for k in drawn:
            mid = y + lh_small // 2
            draw.rectangle((side_x, mid - 1, side_x + 22, mid), fill=colours[k])
            draw.ellipse((side_x + 8, mid - 3, side_x + 14, mid + 3), fill=colours[k])
            txt.paste_text(figure, (side_x + 28, y), names[k], small, _BLACK, "la")
            y += lh_small + 3
    else:
        bar_x = side_x + lh_small + 4
        lut = colormap_lut("viridis")
        column = lut[np.linspace(255, 0, _PLOT_H).round().astype(np.intp)]
        bar = np.ascontiguousarray(np.repeat(column[:, None, :], 14, axis=1))
        figure.paste(Image.fromarray(bar, mode="RGB"), (bar_x, left.y0))
        draw.rectangle((bar_x - 1, left.y0 - 1, bar_x + 14, left.y0 + _PLOT_H), outline=_BLACK)
        for y, name in ((left.y0, names[-1]), (left.y0 + _PLOT_H - 1, names[0])):
            draw.line((bar_x + 14, y, bar_x + 17, y), fill=_BLACK)
            txt.paste_text(figure, (bar_x + 20, y), name, small, _BLACK, "lm")
        txt.paste_text(
            figure,
            (side_x, left.y0 + _PLOT_H / 2),
            "layer depth",
            small,
            _GREY_TEXT,
            "lm",
            rotate=True,
        )

    # --- right: condition numbers by depth ---
    right = _Axes(x_right, y_plot, right_w, _PLOT_H, (-0.6, count - 0.4), right_y, top=top)
    labelled, lines, minors = right_ticks
    for ly in minors:
        right.hline(draw, ly, _GRID_MINOR)
    for e in lines:
        right.hline(draw, e, _GRID_MAJOR)
    if band:
        y = right.y0 + band
        for x in range(right.x0, right.x0 + right.width - 3, 6):
            draw.line((x, y, x + 2, y), fill=_GRID_MAJOR)
    depth = np.arange(count)
    xy = right.points(depth[bounded], log_cond[bounded])
    if len(xy) >= 4:
        draw.line(xy, fill=_JOIN, width=1)
    rad = 3.5 if count > 30 else 4.5
    for k, px, py in zip(depth[bounded], xy[::2], xy[1::2], strict=True):
        draw.ellipse((px - rad, py - rad, px + rad, py + rad), fill=colours[k], outline=_EDGE)
    if band:
        cy = right.y0 + band / 2
        side = 4.0 if count > 30 else 6.0
        for px in right.u(depth[unbounded]) + right.x0:
            draw.polygon(
                [(px - side, cy + side * 0.8), (px + side, cy + side * 0.8), (px, cy - side)],
                fill=_UNBOUNDED,
            )
    right.frame(draw)
    _y_ticks(draw, right, lines, minors)
    _decade_labels(figure, right, labelled)
    if band:
        y = right.y0 + band // 2
        draw.line((right.x0 - 6, y, right.x0 - 2, y), fill=_BLACK)
        txt.paste_text(figure, (right.x0 - 8, y), "∞", infinity_face, _UNBOUNDED_TEXT, "rm")
        which = [layers[k].name for k in depth[unbounded]]
        note = f"▲ ∞: σ₁/σₙ unbounded (σₙ = 0) for {len(which)} layer" + "s" * (len(which) > 1)
        if txt.text_width(small, f"{note}: {', '.join(which)}") <= right.width:
            note = f"{note}: {', '.join(which)}"
        txt.paste_text(
            figure, (right.x0 + right.width, right.y0 - 4), note, small, _UNBOUNDED_TEXT, "rd"
        )
    for k in shown:
        px = right.column(k)
        draw.line((px, right.y0 + right.height, px, right.y0 + right.height + 4), fill=_BLACK)
        txt.paste_text(
            figure,
            (px + 0.5, right.y0 + right.height + 7),
            names[k],
            small,
            _BLACK,
            "ma",
            rotate=True,
        )
    txt.paste_text(
        figure,
        (side_x + side_w + 24, right.y0 + right.height / 2),
        "condition number σ₁ / σₙ",
        label_face,
        _BLACK,
        "lm",
        rotate=True,
    )
    axes = {"spectra": left.layout(), "condition": right.layout()}
    return write_png(figure, path, {AXES_KEY: json.dumps(axes)})


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
