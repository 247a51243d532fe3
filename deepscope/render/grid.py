"""Image grids drawn with numpy + Pillow: one canvas, one colour mapping, one PNG encode.

Matplotlib needs one axes per panel (seconds for a conv layer's hundreds of kernels) and
one colour scale per axes group; here every panel's values (float64) are mapped to colours
in one vectorised pass, with a per-panel (or per-row) linear map, and pasted into one
canvas, so each panel uses the whole colormap unless the caller says its values are
comparable.

The layout (where each panel is and which scale it got) is stored in the PNG as JSON, so a
test or a client can find every panel again: :func:`read_panels`, :func:`panel_span`.
:func:`write_png` is the PNG encoder of the grids and of the spectra figure.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from PIL import Image, ImageDraw

from deepscope.render import text as txt
from deepscope.render.colors import (
    BACKGROUND,
    FRAME,
    LUT_SIZE,
    MARKER_CLIPPED,
    MARKER_NONFINITE,
    colormap_lut,
)
from deepscope.render.scaling import group_limits, robust_limits

__all__ = [
    "PANELS_KEY",
    "Grid",
    "Kind",
    "PanelBox",
    "Scale",
    "image_grid",
    "panel_span",
    "read_panels",
    "write_png",
]

Scale = Literal["panel", "row", "shared"]
Kind = Literal["signed", "image", "magnitude"]

PANELS_KEY: Final = "deepscope:panels"
"""PNG text chunk holding the panel layout: a JSON list of :class:`PanelBox` fields."""

_CMAP: Final[dict[str, str]] = {"signed": "RdBu_r", "image": "gray", "magnitude": "viridis"}
#: Colormaps centred at 0 (symmetric limits): values of one sign use one half.
DIVERGING: Final = frozenset({_CMAP["signed"]})
_MAX_RANGE_LABELS: Final = 64
_SCALE_WORDS: Final[dict[str, str]] = {
    "panel": "per panel (range under each panel)",
    "row": "per row (range at the right of each row)",
    "shared": "shared by all panels",
    "fixed": "fixed by the caller",
}

# Layout, in pixels.
_MARGIN: Final = 8
_CELL_GAP: Final = 4  # between two panels: their 1-px frames and 2 px of white
_ROW_GAP: Final = 4
_TILE_GAP: Final = 1  # between the channel tiles of one panel (C not 1 or 3)
_TITLE_MAX: Final = 120  # a column title may widen its column up to this, then is cut
_LABEL_MAX: Final = 220
_MIN_WIDTH: Final = 340  # so the caption is not wrapped into a tall strip over tiny grids
_BAR: Final = (128, 9)  # colour key

_TEXT: Final = (0, 0, 0)
_SMALL_TEXT: Final = (70, 70, 70)
# Notes drawn in darker versions of the markers they explain (pure magenta/green on white is
# hard to read).
_CLIP_TEXT: Final = (165, 0, 165)
_NONFINITE_TEXT: Final = (0, 125, 0)
_OWN_TEXT: Final = (190, 85, 0)

_EPS: Final = 1e-9  # slack for t = a·x + b at the scale's ends (rounding, not data)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class PanelBox:
    """Where one panel is in the grid's image and how its colours were chosen.

    The box is half-open: pixels [x0, x1) × [y0, y1); ``tiles`` are the data areas inside it
    (one, or one per channel when C is neither 1 nor 3), the rest being 1-px gaps.
    """

    index: int
    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int
    tiles: tuple[Box, ...]
    cmap: str  # a matplotlib colormap name, or "rgb" for three-channel panels
    vmin: float  # the value drawn as the colormap's first entry (or RGB 0)
    vmax: float  # the value drawn as its last entry (or RGB 255)
    scale: str  # "panel", "row", "shared", "fixed", or "own" (an outlier panel of a row)
    constant: bool  # every finite value equal (False when there is none)
    nonfinite: int  # NaN / ±inf pixels, drawn in MARKER_NONFINITE
    clipped: int  # finite pixels outside [vmin, vmax], drawn in MARKER_CLIPPED
    title: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PanelBox:
        """The inverse of ``dataclasses.asdict`` after a JSON round trip (lists → tuples)."""
        return cls(**{**data, "tiles": tuple(tuple(t) for t in data["tiles"])})


@dataclass
class Grid:
    """A rendered grid: the image and where each panel is in it."""

    image: Image.Image
    panels: list[PanelBox] = field(default_factory=list)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the PNG with the layout in its ``deepscope:panels`` text chunk."""
        # Shallow field dicts: the boxes hold only numbers, strings and tuples of numbers
        # (dataclasses.asdict deep-copies every tuple, a noticeable cost over many grids).
        names = [f.name for f in fields(PanelBox)]
        layout = [{name: getattr(p, name) for name in names} for p in self.panels]
        photo = any(p.cmap == "rgb" for p in self.panels)
        return write_png(self.image, path, {PANELS_KEY: json.dumps(layout)}, photo=photo)


_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPE: Final[dict[str, int]] = {"L": 0, "RGB": 2, "RGBA": 6}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_STRIP_BYTES: Final = 1 << 16  # pixel bytes encoded per pass (small buffers, reused)


def _idat(image: Image.Image, try_up: bool) -> bytes:
    """The zlib stream of ``image``'s rows: unfiltered, or all "Up" if that is smaller.

    Deflate level 1. Colormapped panels, text and lines are flat colour, which deflate
    finds as runs (and an upscaled row as a copy of the one above) without a filter:
    smaller than Pillow's adaptive filtering, and 2-3× faster to write. Smooth photographs
    (``try_up``) are also encoded with the "Up" filter, and the smaller stream is kept.

    The rows are encoded a strip at a time, so that no full-size copy of the pixels is
    made: a freshly forked job pays for every new page it touches.
    """
    width, height = image.size
    stride = width * len(image.getbands())
    per = max(1, _STRIP_BYTES // stride)
    raw = np.empty((per, stride + 1), dtype=np.uint8)
    plain = zlib.compressobj(1)
    up = zlib.compressobj(1) if try_up else None
    plain_out: list[bytes] = []
    up_out: list[bytes] = []
    above = np.zeros(stride, dtype=np.uint8)  # "Up" of the first row: the row itself
    for y0 in range(0, height, per):
        n = min(per, height - y0)
        strip = image.crop((0, y0, width, y0 + n)).tobytes()
        rows = np.frombuffer(strip, dtype=np.uint8).reshape(n, stride)
        block = raw[:n]
        block[:, 0] = 0
        block[:, 1:] = rows
        plain_out.append(plain.compress(block.data))
        if up is not None:
            block[:, 0] = 2
            np.subtract(rows[0], above, out=block[0, 1:])
            np.subtract(rows[1:], rows[:-1], out=block[1:, 1:])
            up_out.append(up.compress(block.data))
            above = rows[-1].copy()
    plain_out.append(plain.flush())
    data = b"".join(plain_out)
    if up is not None:
        up_out.append(up.flush())
        filtered = b"".join(up_out)
        if len(filtered) < len(data):
            return filtered
    return data


def write_png(
    image: Image.Image,
    path: str | os.PathLike[str],
    texts: Mapping[str, str] | None = None,
    *,
    photo: bool = False,
) -> Path:
    """Write ``image`` (RGB, L or RGBA; others are converted to RGB) as a PNG at ``path``.

    A minimal encoder (IHDR, zTXt, IDAT, IEND) in place of Pillow's: the same pixels, and
    ``texts`` as compressed text chunks exactly as ``PngInfo.add_text(key, value, zip=True)``
    writes latin-1 text (``Image.open(path).info[key]`` reads them back). ``photo``: the
    image holds smooth pictures (RGB panels), which may compress better filtered.
    Returns ``path``.
    """
    if image.mode not in _PNG_COLOUR_TYPE:
        image = image.convert("RGB")
    width, height = image.size
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPE[image.mode], 0, 0, 0)
    parts = [_PNG_SIGNATURE, _chunk(b"IHDR", header)]
    for key, value in (texts or {}).items():
        body = key.encode("latin-1") + b"\0\0" + zlib.compress(value.encode("latin-1"))
        parts.append(_chunk(b"zTXt", body))
    parts.append(_chunk(b"IDAT", _idat(image, photo)))
    parts.append(_chunk(b"IEND", b""))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(parts))
    return out


def read_panels(path: str | os.PathLike[str]) -> list[PanelBox]:
    """The layout a :meth:`Grid.save` stored in the PNG at ``path``."""
    with Image.open(path) as image:
        raw = image.info.get(PANELS_KEY)
    if not isinstance(raw, str):
        raise ValueError(f"{path} has no {PANELS_KEY!r} text chunk: not a deepscope grid")
    return [PanelBox.from_dict(d) for d in json.loads(raw)]


def panel_span(source: Grid | str | os.PathLike[str], panel: int | PanelBox) -> float:
    """How much of its colormap a panel uses: (max − min entry index) / 255, in [0, 1].

    Each pixel of the panel's tiles is mapped back to the nearest entry of the panel's
    colormap table (for RGB panels: per channel, the widest channel counts); marker pixels
    (clipped, non-finite) are ignored. A panel flattened by someone else's scale scores ≈ 0.

    A diverging colormap is centred at 0, so values of one sign can only use the half on
    their side: such a panel is measured against that half (a panel of values in [0, M]
    scores 1, as one in [−M, M] does).
    """
    if isinstance(source, Grid):
        pixels = np.asarray(source.image.convert("RGB"))
        boxes = source.panels
    else:
        with Image.open(source) as image:
            pixels = np.asarray(image.convert("RGB"))
        boxes = read_panels(source)
    box = boxes[panel] if isinstance(panel, int) else panel
    px = np.concatenate([pixels[y0:y1, x0:x1].reshape(-1, 3) for x0, y0, x1, y1 in box.tiles])
    marker = (px == MARKER_CLIPPED).all(1) | (px == MARKER_NONFINITE).all(1)
    px = px[~marker]
    if px.size == 0:
        return 0.0
    if box.cmap == "rgb":
        return float((px.max(0).astype(np.int64) - px.min(0)).max() / (LUT_SIZE - 1))
    # Distinct colours are few (≤ 256 in a panel drawn here): match those, not every pixel.
    colours = np.unique(px, axis=0).astype(np.int64)
    lut = colormap_lut(box.cmap).astype(np.int64)
    nearest = ((colours[:, None, :] - lut[None, :, :]) ** 2).sum(-1).argmin(1)
    used = float(nearest.max() - nearest.min())
    if box.cmap in DIVERGING:
        centre = (LUT_SIZE - 1) / 2
        if nearest.min() >= centre - 1 or nearest.max() <= centre + 1:
            return min(1.0, used / centre)
    return used / (LUT_SIZE - 1)


# --- input -------------------------------------------------------------------------------


def _tiles(array: np.ndarray) -> tuple[list[np.ndarray], bool]:
    """A panel as display tiles: ([(H, W)] or [(H, W, 3)], is_rgb); C ∉ {1, 3}: C tiles."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 2 and a.size:
        return [a], False
    if a.ndim != 3 or a.size == 0:
        raise ValueError(f"a panel must be (C, H, W) or (H, W) and non-empty, got {a.shape}")
    if a.shape[0] == 1:
        return [a[0]], False
    if a.shape[0] == 3:
        return [np.moveaxis(a, 0, -1)], True
    return list(a), False


def _grid_shape(n: int, ncols: int | None, row_labels: Sequence[str] | None) -> tuple[int, int]:
    if ncols is not None and ncols < 1:
        raise ValueError(f"ncols must be ≥ 1, got {ncols}")
    if ncols is None:
        if row_labels:
            ncols = math.ceil(n / len(row_labels))
        else:  # about square, but ≥ 10 wide: a wide figure reads better on a page
            ncols = n if n <= 10 else max(10, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / ncols)
    if row_labels is not None and len(row_labels) > rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows of {ncols}")
    return ncols, rows


def _range(pair: tuple[float, float] | None, what: str) -> tuple[float, float] | None:
    if pair is None:
        return None
    lo, hi = float(pair[0]), float(pair[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"{what} must be finite with lo < hi, got {pair}")
    return lo, hi


# --- scales ------------------------------------------------------------------------------


def _limits(
    values: Sequence[np.ndarray],
    scale: Scale,
    ncols: int,
    signed: bool,
    vrange: tuple[float, float] | None,
) -> tuple[list[tuple[float, float]], list[str], dict[int, tuple[float, float]]]:
    """Each panel's (lo, hi), the scale it got, and each row's (lo, hi) for scale="row"."""
    n = len(values)
    if vrange is not None:
        return [vrange] * n, ["fixed"] * n, {}
    if scale == "panel":
        return [robust_limits(v, signed=signed) for v in values], ["panel"] * n, {}
    groups = (
        [list(range(r, min(r + ncols, n))) for r in range(0, n, ncols)]
        if scale == "row"
        else [list(range(n))]
    )
    limits: list[tuple[float, float]] = [(0.0, 0.0)] * n
    how: list[str] = [scale] * n
    rows: dict[int, tuple[float, float]] = {}
    for g, members in enumerate(groups):
        common, own = group_limits([values[k] for k in members], signed=signed)
        rows[g] = common
        for k, alone in zip(members, own, strict=True):
            if alone:
                limits[k], how[k] = robust_limits(values[k], signed=signed), "own"
            else:
                limits[k] = common
    return limits, how, rows


def _linear(lo: float, hi: float) -> tuple[float, float]:
    """(a, b) with t = a·x + b mapping lo → 0, hi → 1; a flat scale draws the middle."""
    if hi > lo:
        # b as one division: for (−m, m) it is exactly 0.5, so 0 lands on the LUT's centre.
        return 1.0 / (hi - lo), -lo / (hi - lo)
    return 0.0, 0.5


@dataclass
class _Counts:
    nan: int = 0
    inf: int = 0
    clipped: int = 0
    low: float = math.inf  # the most extreme clipped values, for the panel's note
    high: float = -math.inf


def _count(tiles: Sequence[np.ndarray], rgb: bool, a: float, b: float) -> _Counts:
    """Marker pixels of one panel, by the same rule the canvas pass draws them with."""
    c = _Counts()
    for tile in tiles:
        x = tile if rgb else tile[..., None]  # (h, w, channels)
        nan = np.isnan(x).any(-1)
        finite = np.isfinite(x).all(-1)
        c.nan += int(nan.sum())
        c.inf += int((~finite & ~nan).sum())
        t = x * a + b
        out_value = ((t < -_EPS) | (t > 1.0 + _EPS)) & np.isfinite(x)
        out = out_value.any(-1) & finite
        if out.any():
            c.clipped += int(out.sum())
            wild = x[out_value & finite[..., None]]
            c.low, c.high = min(c.low, float(wild.min())), max(c.high, float(wild.max()))
    return c


def _notes(
    counts: _Counts,
    constant: float | None,
    lo_hi: tuple[float, float],
    how: str,
    signed: bool,
    any_finite: bool,
) -> list[tuple[str, tuple[int, int, int]]]:
    """The small lines under a panel: its range when it has its own, then its markers."""
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if constant is not None:
        lines.append((f"constant {txt.number(constant)}", _SMALL_TEXT))
    elif how == "panel" and any_finite:
        lines.append((txt.span_text(*lo_hi, signed=signed), _SMALL_TEXT))
    elif how == "own":
        lines.append(("own " + txt.span_text(*lo_hi, signed=signed), _OWN_TEXT))
    if counts.clipped:
        lines.append((f"{counts.clipped} px clipped", _CLIP_TEXT))
        if signed:
            extreme = max(abs(counts.low), abs(counts.high))
            lines.append((f"max |x| {txt.number(extreme)}", _CLIP_TEXT))
        else:
            if counts.high > lo_hi[1]:
                lines.append((f"max {txt.number(counts.high)}", _CLIP_TEXT))
            if counts.low < lo_hi[0]:
                lines.append((f"min {txt.number(counts.low)}", _CLIP_TEXT))
    bad = [f"{k} {w}" for k, w in ((counts.nan, "NaN"), (counts.inf, "inf")) if k]
    if bad:
        lines.append((", ".join(bad), _NONFINITE_TEXT))
    return lines


# --- layout ------------------------------------------------------------------------------


def _factor(tiles: Sequence[Sequence[np.ndarray]]) -> int:
    """One integer upscale for all panels (relative sizes stay true): small ones visible.

    3×3 kernels become 48 px (32 px in grids of hundreds, 24 px beyond 400); images already
    that large are not blown up.
    """
    n = len(tiles)
    target = 48 if n <= 100 else 32 if n <= 400 else 24
    smallest = min(max(int(t[0].shape[0]), int(t[0].shape[1])) for t in tiles)
    return max(1, math.ceil(target / smallest))


def _wrap(face: Any, text: str, width: int) -> list[str]:
    """Greedy word wrap of ``text`` (may hold newlines) to ``width`` pixels."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and txt.text_width(face, candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(txt.fit(face, line, width))
    return lines


def _key_text(kind: Kind, rgb: bool, signed: bool) -> str:
    if rgb:
        return "RGB, mid-grey = 0" if signed else "RGB, one range for all channels"
    if signed:
        return "RdBu_r centred at 0 (blue < 0 < red)"
    return "grey, dark = low" if kind == "image" else "viridis, dark = low"


def image_grid(
    panels: Sequence[np.ndarray] | np.ndarray,
    *,
    ncols: int | None = None,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str = "",
    scale: Scale = "panel",
    kind: Kind = "signed",
    vrange: tuple[float, float] | None = None,
    data_range: tuple[float, float] | None = None,
    note: str | None = None,
) -> Grid:
    """Tile ``panels`` into one image, each coloured by the scale it is entitled to.

    Args:
        panels: N arrays (C, H, W) or (H, W) (or one (N, C, H, W) / (N, H, W) array).
            C = 1: colormap; C = 3: RGB; other C: the channels side by side, 1 px apart.
        ncols: panels per row; default ⌈N / len(row_labels)⌉, else about square (≥ 10).
        titles: up to N column titles, drawn above the panels (cut to fit).
        row_labels: up to ⌈N / ncols⌉ labels, left of each row.
        title: the heading line. ``note``: an extra caption line (may hold newlines).
        scale: "panel": each panel its own range (default: nothing flattens anything);
            "row": one range per row, for rows of comparable panels; "shared": one range
            for all. A panel whose range is > 50× its group's median gets its own anyway,
            labelled "own". The caption says which scale was used.
        kind: "signed": RdBu_r symmetric about 0 (weights, singular vectors, residuals);
            "image": grey, or RGB with one min/max across channels, from the data's range;
            "magnitude": viridis from min to max.
        vrange: a fixed (lo, hi) for every panel (overrides ``scale``), e.g. (0, 1) pixels.
        data_range: values outside it are outliers: left out of the scale and drawn clipped.

    Values far outside the bulk (see :mod:`deepscope.render.scaling`) are clipped to it and
    drawn in ``MARKER_CLIPPED``, NaN/±inf in ``MARKER_NONFINITE``; each panel says how many.
    """
    if scale not in ("panel", "row", "shared"):
        raise ValueError(f"scale must be 'panel', 'row' or 'shared', got {scale!r}")
    if kind not in _CMAP:
        raise ValueError(f"kind must be 'signed', 'image' or 'magnitude', got {kind!r}")
    fixed = _range(vrange, "vrange")
    allowed = _range(data_range, "data_range")
    items = [_tiles(p) for p in panels]
    n = len(items)
    if n == 0:
        raise ValueError("image_grid needs at least one panel")
    tiles = [t for t, _ in items]
    is_rgb = [rgb for _, rgb in items]
    cols, rows = _grid_shape(n, ncols, row_labels)
    signed = kind == "signed"
    cmap = _CMAP[kind]

    # Scales, from each panel's finite values (restricted to data_range when given).
    finite = [np.concatenate([t[np.isfinite(t)] for t in ts]) for ts in tiles]
    constant = [float(v[0]) if v.size and v.min() == v.max() else None for v in finite]
    usable = (
        finite if allowed is None else [v[(v >= allowed[0]) & (v <= allowed[1])] for v in finite]
    )
    limits, how, row_limits = _limits(usable, scale, cols, signed, fixed)
    coeffs = np.array([_linear(*lim) for lim in limits], dtype=np.float64)  # (N, 2): a, b
    counts = [_count(tiles[k], is_rgb[k], *coeffs[k]) for k in range(n)]
    # Past this many panels a range under each would be a wall of numbers (and most of the
    # drawing time): the caption says the ranges are left out.
    ranges_shown = n <= _MAX_RANGE_LABELS
    notes = [
        _notes(
            counts[k],
            constant[k],
            limits[k],
            how[k] if ranges_shown or how[k] != "panel" else "",
            signed,
            bool(finite[k].size),
        )
        for k in range(n)
    ]

    # Layout: column widths from panels and their texts, row heights likewise.
    f = _factor(tiles)
    small, title_font, label_font = txt.font(10), txt.font(11), txt.font(12)
    head_font, caption_font = txt.font(15, bold=True), txt.font(11)
    lh_small, lh_title = txt.line_height(small), txt.line_height(title_font)
    tile_h = [ts[0].shape[0] * f for ts in tiles]
    tile_w = [ts[0].shape[1] * f for ts in tiles]
    panel_w = [len(ts) * tile_w[k] + (len(ts) - 1) * _TILE_GAP for k, ts in enumerate(tiles)]
    names = [str(titles[k]) if titles is not None and k < len(titles) else "" for k in range(n)]
    row_of = [list(range(r * cols, min((r + 1) * cols, n))) for r in range(rows)]
    col_w = [0] * cols
    for k in range(n):
        need = max([panel_w[k]] + [txt.text_width(small, s) for s, _ in notes[k]])
        wanted = min(txt.text_width(title_font, names[k]), max(panel_w[k], _TITLE_MAX))
        col_w[k % cols] = max(col_w[k % cols], need, wanted)
    col_w = [max(col_w)] * cols  # one column width: a regular grid reads more easily
    top_h = [lh_title + 2 if any(names[k] for k in ks) else 0 for ks in row_of]
    body_h = [max(tile_h[k] for k in ks) for ks in row_of]
    below_h = [max(len(notes[k]) for k in ks) * lh_small for ks in row_of]
    labels = [str(row_labels[r]) if row_labels and r < len(row_labels) else "" for r in range(rows)]
    label_w = max(txt.text_width(label_font, s) for s in labels) if row_labels else 0
    label_w = min(label_w, _LABEL_MAX) + (8 if label_w else 0)
    row_text = {  # only rows where some panel is on the row's scale (not all "own")
        r: txt.span_text(*lim, signed=signed)
        for r, lim in row_limits.items()
        if any(how[k] == "row" for k in row_of[r])
    }
    right_w = (max(txt.text_width(small, s) for s in row_text.values()) + 8) if row_text else 0
    grid_w = label_w + sum(col_w) + (cols - 1) * _CELL_GAP + 2 + right_w
    # Header: title, the caller's note, then what the colours mean.
    any_mono = not all(is_rgb)
    key = " / ".join(sorted({_key_text(kind, rgb, signed) for rgb in is_rgb}))
    key_cmap = cmap if any_mono else None
    key_w = _draw_key(None, (0, 0), key_cmap, signed, key, counts)
    width = max(grid_w, _MIN_WIDTH, key_w) + 2 * _MARGIN
    inner = width - 2 * _MARGIN
    scale_used = "fixed" if fixed is not None else scale
    caption = f"colour scale: {_SCALE_WORDS[scale_used]}"
    if scale_used == "panel" and not ranges_shown:
        caption = f"colour scale: per panel ({n} panels: ranges not printed)"
    if scale_used in ("shared", "fixed"):
        caption += ", " + txt.span_text(*limits[0], signed=signed and fixed is None)
    if "own" in how:
        caption += " · “own”: an outlier panel scaled alone"
    header: list[tuple[str, Any, tuple[int, int, int]]] = []
    header += [(s, head_font, _TEXT) for s in (_wrap(head_font, title, inner) if title else [])]
    header += [(s, caption_font, _TEXT) for s in (_wrap(caption_font, note, inner) if note else [])]
    header += [(s, caption_font, _SMALL_TEXT) for s in _wrap(caption_font, caption, inner)]
    key_h = max(_BAR[1], lh_small) + 4
    header_h = sum(txt.line_height(face) + 1 for _, face, _ in header) + key_h

    grid_top = _MARGIN + header_h + 4
    col_x = [_MARGIN + label_w + 1 + sum(col_w[:c]) + c * _CELL_GAP for c in range(cols)]
    row_y = [grid_top] * rows
    for r in range(1, rows):
        prev = r - 1
        row_y[r] = row_y[prev] + top_h[prev] + body_h[prev] + 2 + below_h[prev] + _ROW_GAP
    height = row_y[-1] + top_h[-1] + body_h[-1] + 2 + below_h[-1] + _MARGIN

    boxes: list[PanelBox] = []
    tile_boxes: list[list[Box]] = []
    for k in range(n):
        r, c = divmod(k, cols)
        x0 = col_x[c] + (col_w[c] - panel_w[k]) // 2
        y0 = row_y[r] + top_h[r] + 1
        own_tiles = [
            (
                x0 + j * (tile_w[k] + _TILE_GAP),
                y0,
                x0 + j * (tile_w[k] + _TILE_GAP) + tile_w[k],
                y0 + tile_h[k],
            )
            for j in range(len(tiles[k]))
        ]
        tile_boxes.append(own_tiles)
        boxes.append(
            PanelBox(
                index=k,
                row=r,
                col=c,
                x0=x0,
                y0=y0,
                x1=x0 + panel_w[k],
                y1=y0 + tile_h[k],
                tiles=tuple(own_tiles),
                cmap="rgb" if is_rgb[k] else cmap,
                vmin=limits[k][0],
                vmax=limits[k][1],
                scale=how[k],
                constant=constant[k] is not None,
                nonfinite=counts[k].nan + counts[k].inf,
                clipped=counts[k].clipped,
                title=names[k],
            )
        )

    pixels = _colour(tiles, is_rgb, tile_boxes, coeffs, f, (height, width), colormap_lut(cmap))
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)

    # Frames and texts: a loop over panels, but each step is one Pillow call.
    for k, box in enumerate(boxes):
        draw.rectangle((box.x0 - 1, box.y0 - 1, box.x1, box.y1), outline=FRAME)
        centre = col_x[box.col] + col_w[box.col] / 2
        if names[k]:
            shown = txt.fit(title_font, names[k], col_w[box.col])
            y = row_y[box.row]
            txt.paste_text(image, (centre, y), shown, title_font, _TEXT, "ma")
        y = box.y1 + 2
        for line, colour in notes[k]:
            txt.paste_text(image, (centre, y), line, small, colour, "ma")
            y += lh_small
    for r in range(rows):
        mid = row_y[r] + top_h[r] + 1 + body_h[r] / 2
        if labels[r]:
            shown = txt.fit(label_font, labels[r], _LABEL_MAX)
            txt.paste_text(image, (_MARGIN + label_w - 8, mid), shown, label_font, _TEXT, "rm")
        if r in row_text:  # one column right of the grid, so the ranges line up
            x = col_x[-1] + col_w[-1] + 6
            txt.paste_text(image, (x, mid), row_text[r], small, _SMALL_TEXT, "lm")

    y = _MARGIN
    for line, face, colour in header:
        txt.paste_text(image, (_MARGIN, y), line, face, colour, "la")
        y += txt.line_height(face) + 1
    _draw_key(image, (_MARGIN, y + 2), key_cmap, signed, key, counts)
    return Grid(image=image, panels=boxes)


def _colour(
    tiles: Sequence[Sequence[np.ndarray]],
    is_rgb: Sequence[bool],
    tile_boxes: Sequence[Sequence[Box]],
    coeffs: np.ndarray,
    f: int,
    size: tuple[int, int],
    lut: np.ndarray,
) -> np.ndarray:
    """The (height, width, 3) uint8 canvas: every panel's pixels mapped in one pass.

    The raw values of all tiles (float64, not upscaled) are concatenated with the panel id
    of each; t = a[id]·x + b[id], the LUT lookup and the markers are one vectorised pass
    over them, and only the resulting colours are upscaled (pixel repetition) into the
    canvas, so the mapping costs the data's size, not the canvas's.
    """
    height, width = size
    channels = 3 if any(is_rgb) else 1
    parts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    for k, ts in enumerate(tiles):
        for tile in ts:
            x = tile.reshape(-1, channels if is_rgb[k] else 1)
            parts.append(
                np.broadcast_to(x, (x.shape[0], channels)) if x.shape[1] != channels else x
            )
            ids.append(np.full(x.shape[0], k, dtype=np.intp))
    x = np.concatenate(parts).astype(np.float64, copy=False)  # (M, channels)
    pid = np.concatenate(ids)
    t = x * coeffs[pid, :1] + coeffs[pid, 1:]
    finite = np.isfinite(x).all(1)
    clipped = ((t < -_EPS) | (t > 1.0 + _EPS)).any(1) & finite
    # floor(256·t) clipped to [0, 255], as matplotlib indexes its colormaps.
    index = np.clip(
        np.floor(np.nan_to_num(t, nan=0.5, posinf=1.0, neginf=0.0) * LUT_SIZE), 0, LUT_SIZE - 1
    )
    index = index.astype(np.uint8)
    colours = lut[index[:, 0]]
    if channels == 3:
        rgb = np.asarray(is_rgb, dtype=bool)[pid]
        colours = np.where(rgb[:, None], index, colours)
    colours[clipped] = MARKER_CLIPPED
    colours[~finite] = MARKER_NONFINITE
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[...] = BACKGROUND
    start = 0
    for k, ts in enumerate(tiles):
        for tile, (x0, y0, x1, y1) in zip(ts, tile_boxes[k], strict=True):
            h, w = tile.shape[:2]
            block = colours[start : start + h * w].reshape(h, w, 3)
            start += h * w
            if f > 1:
                block = np.repeat(np.repeat(block, f, axis=0), f, axis=1)
            out[y0:y1, x0:x1] = block
    return out


@lru_cache(maxsize=8)
def _key_bar(cmap: str) -> Image.Image:
    """The colour key's bar for ``cmap`` (cached: pasted, never modified)."""
    bar = np.repeat(colormap_lut(cmap)[None, :: LUT_SIZE // _BAR[0]], _BAR[1], axis=0)
    return Image.fromarray(np.ascontiguousarray(bar), mode="RGB")


def _draw_key(
    image: Image.Image | None,
    at: tuple[int, int],
    cmap: str | None,
    signed: bool,
    key: str,
    counts: Sequence[_Counts],
) -> int:
    """The colour key under the caption: the colormap bar, its meaning, the markers in use.

    With ``image`` None nothing is drawn: the layout calls it first to learn the width.
    Returns the x where the key ends.
    """
    small = txt.font(10)
    draw = ImageDraw.Draw(image) if image is not None else None
    x, y = at
    mid = y + _BAR[1] // 2
    words: list[tuple[int, str]] = []  # drawn after the bar and the swatches
    if cmap is not None:
        lo, hi = ("−", "+") if signed else ("low", "high")
        words.append((x, lo))
        x += txt.text_width(small, lo) + 3
        bar = _key_bar(cmap)
        if image is not None and draw is not None:
            image.paste(bar, (x, y))
            draw.rectangle((x - 1, y - 1, x + bar.width, y + _BAR[1]), outline=FRAME)
            if signed:  # a tick at 0
                centre = x + bar.width // 2
                draw.line((centre, y + _BAR[1], centre, y + _BAR[1] + 2), fill=_SMALL_TEXT)
        x += bar.width + 3
        words.append((x, hi))
        x += txt.text_width(small, hi) + 8
    words.append((x, key))
    x += txt.text_width(small, key) + 12
    marks = [
        (MARKER_CLIPPED, "clipped outlier", sum(c.clipped for c in counts)),
        (MARKER_NONFINITE, "NaN / inf", sum(c.nan + c.inf for c in counts)),
    ]
    for colour, label, total in marks:
        if not total:
            continue
        if draw is not None:
            draw.rectangle((x, y, x + _BAR[1], y + _BAR[1]), fill=colour)
        x += _BAR[1] + 3
        words.append((x, label))
        x += txt.text_width(small, label) + 12
    if image is not None:
        for wx, word in words:
            txt.paste_text(image, (wx, mid), word, small, _SMALL_TEXT, "lm")
    return x - 12
