"""Text for the Pillow-drawn pictures: fonts, cached measurements and compact number formats.

DejaVu Sans ships inside matplotlib, so every worker has it without a system font, and it
covers Greek and sub/superscripts (σᵢ·vᵢ, ‖r‖²) that Pillow's bitmap default font lacks.
Only the font file is taken from matplotlib: nothing here imports its drawing machinery.

Measurements and rendered text are cached per (face, text): a grid measures the same
titles several times (layout, fit, wrap), and the fixed labels of a figure (ticks, axis
labels) recur from one picture to the next in a worker.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import matplotlib
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "fit",
    "fit_middle",
    "font",
    "line_height",
    "number",
    "paste_text",
    "span_text",
    "stamp",
    "text_width",
]

_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"

Anchor = Literal["la", "ma", "ra", "lm", "mm", "rm", "ld", "md", "rd"]


@lru_cache(maxsize=16)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` pixels (cached: one face object per size, reused as cache key)."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(_FONT_DIR / name), size, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=64)
def line_height(face: ImageFont.FreeTypeFont) -> int:
    """Pixels from one line's top to the next: ascent + descent of the face."""
    ascent, descent = face.getmetrics()
    return int(ascent + descent)


@lru_cache(maxsize=4096)
def text_width(face: ImageFont.FreeTypeFont, text: str) -> int:
    """Advance width of ``text`` in pixels (0 for the empty string)."""
    return math.ceil(face.getlength(text)) if text else 0


@lru_cache(maxsize=1024)
def fit(face: ImageFont.FreeTypeFont, text: str, width: int) -> str:
    """``text`` cut with an ellipsis so that it is at most ``width`` pixels wide."""
    if text_width(face, text) <= width:
        return text
    lo, hi = 0, len(text)  # longest prefix that fits with "…": binary search, titles are short
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(face, text[:mid] + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…" if lo else ""


@lru_cache(maxsize=1024)
def fit_middle(face: ImageFont.FreeTypeFont, text: str, width: int) -> str:
    """``text`` at most ``width`` pixels wide, cut in the middle: "feat…block14.layer3.conv".

    For layer names, whose start and (more so) end tell them apart: a third of the kept
    characters come from the start, the rest from the end.
    """
    if text_width(face, text) <= width:
        return text
    lo, hi = 0, len(text) - 1  # characters kept around the "…"
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(face, _cut(text, mid)) <= width:
            lo = mid
        else:
            hi = mid - 1
    return _cut(text, lo) if lo else ""


def _cut(text: str, keep: int) -> str:
    head = keep // 3
    tail = keep - head
    return text[:head] + "…" + (text[len(text) - tail :] if tail else "")


@lru_cache(maxsize=1024)
def stamp(face: ImageFont.FreeTypeFont, text: str, rotate: bool = False) -> Image.Image:
    """``text`` rendered once as an "L" mask one line high (cached; do not modify it).

    ``rotate``: turned 90° counter-clockwise (reading upwards), for vertical labels.
    """
    mask = Image.new("L", (max(1, text_width(face, text)), line_height(face)), 0)
    if text:
        ImageDraw.Draw(mask).text((0, 0), text, font=face, fill=255, anchor="la")
    return mask.transpose(Image.Transpose.ROTATE_90) if rotate else mask


def paste_text(
    image: Image.Image,
    xy: tuple[float, float],
    text: str,
    face: ImageFont.FreeTypeFont,
    fill: tuple[int, int, int],
    anchor: Anchor = "la",
    *,
    rotate: bool = False,
) -> tuple[int, int, int, int]:
    """Draw ``text`` (a cached :func:`stamp`) on ``image``; returns the box it covers.

    ``anchor``: horizontal l/m/r (left, middle, right of the text's advance box), vertical
    a/m/d (top, middle, bottom of the line box), at ``xy``. Rotated text is anchored by its
    rotated box the same way (l = its left side).
    """
    mask = stamp(face, text, rotate)
    w, h = mask.size
    x = xy[0] - {"l": 0.0, "m": w / 2, "r": float(w)}[anchor[0]]
    y = xy[1] - {"a": 0.0, "m": h / 2, "d": float(h)}[anchor[1]]
    x0, y0 = round(x), round(y)
    image.paste(fill, (x0, y0, x0 + w, y0 + h), mask)
    return x0, y0, x0 + w, y0 + h


_EXPONENT = re.compile(r"e([+-])0*(\d+)")


def number(value: float, digits: int = 2) -> str:
    """A compact label: 2 significant digits, "1.5e4" not "1.5e+04", "−" not "-"."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    text = f"{value:.{digits}g}"
    text = _EXPONENT.sub(lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)
    return text.replace("-", "−")


def span_text(lo: float, hi: float, *, signed: bool) -> str:
    """A colour-scale range: "±0.31" for a symmetric signed scale, else "[0.02, 0.97]"."""
    if signed:
        return "±" + number(max(abs(lo), abs(hi)))
    return f"[{number(lo)}, {number(hi)}]"
