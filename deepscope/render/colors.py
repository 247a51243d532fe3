"""Colour lookup tables and marker colours for the image grids.

A colormap is sampled once into a (256, 3) uint8 table; every pixel of a grid is then one
table lookup, and a PNG can be read back by matching its pixels against the same table
(:func:`deepscope.render.panel_span`). Matplotlib is used for the tables only, never to draw.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

import numpy as np
from matplotlib import colormaps

__all__ = [
    "BACKGROUND",
    "FRAME",
    "LUT_SIZE",
    "MARKER_CLIPPED",
    "MARKER_NONFINITE",
    "colormap_lut",
]

LUT_SIZE: Final = 256
"""Entries per colormap table; value t in [0, 1] maps to entry min(floor(256·t), 255), as
matplotlib does, so 0 of a symmetric diverging scale lands on entry 128, the table's middle."""

# Markers must not be confused with any colormap entry: magenta and pure green are > 140
# (Euclidean, 0-255 RGB) from every entry of RdBu_r, viridis and gray.
MARKER_CLIPPED: Final = (255, 0, 255)
"""Colour of pixels outside the colour scale (outliers clipped to the bulk of the data)."""
MARKER_NONFINITE: Final = (0, 255, 0)
"""Colour of NaN / ±inf pixels."""
BACKGROUND: Final = (255, 255, 255)
# RdBu_r's centre is almost white: a grey frame keeps a near-zero panel's edge visible.
FRAME: Final = (178, 178, 178)


@lru_cache(maxsize=16)
def _lut(name: str) -> np.ndarray:
    table = colormaps[name](np.linspace(0.0, 1.0, LUT_SIZE))[:, :3]
    lut = np.round(table * 255.0).astype(np.uint8)
    lut.setflags(write=False)  # cached and shared: nobody may edit it
    return lut


def colormap_lut(name: str) -> np.ndarray:
    """The (256, 3) uint8 RGB table of matplotlib colormap ``name`` (read-only, cached)."""
    return _lut(name)
