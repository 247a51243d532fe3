"""Text for the Pillow-drawn grids: fonts and compact number formats.

DejaVu Sans ships inside matplotlib, so every worker has it without a system font, and it
covers Greek and sub/superscripts (σᵢ·vᵢ, ‖r‖²) that Pillow's bitmap default font lacks.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import matplotlib
from PIL import ImageFont

__all__ = ["fit", "font", "line_height", "number", "span_text", "text_width"]

_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=16)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` pixels (cached: loading a TrueType face costs ~1 ms)."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(_FONT_DIR / name), size)


def line_height(face: ImageFont.FreeTypeFont) -> int:
    """Pixels from one line's top to the next: ascent + descent of the face."""
    ascent, descent = face.getmetrics()
    return int(ascent + descent)


def text_width(face: ImageFont.FreeTypeFont, text: str) -> int:
    """Advance width of ``text`` in pixels (0 for the empty string)."""
    return math.ceil(face.getlength(text)) if text else 0


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
