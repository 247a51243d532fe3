"""PNG artifacts, torch-free: grids and the spectra figure (numpy + Pillow), curves (matplotlib).

:func:`draw` names each kind of picture, so that an analysis describes a drawing as data
(:meth:`deepscope.analyses.context.RunContext.draw`).

Grids colour each panel (or each row of comparable panels) by its own range, clip the few
values far outside the bulk and mark them, and store their layout in the PNG, so that no
panel is flattened by another's scale and a test can check it. Nothing here writes files
except :meth:`Grid.save`, :func:`spectra_figure` and :func:`curves_plot`.
"""

import os
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from deepscope.render.colors import MARKER_CLIPPED, MARKER_NONFINITE, colormap_lut
from deepscope.render.grid import (
    PANELS_KEY,
    Grid,
    Kind,
    PanelBox,
    Scale,
    image_grid,
    panel_span,
    read_panels,
)
from deepscope.render.plots import AXES_KEY, SpectrumLine, curves_plot, spectra_figure

__all__ = [
    "AXES_KEY",
    "DRAWINGS",
    "MARKER_CLIPPED",
    "MARKER_NONFINITE",
    "PANELS_KEY",
    "Drawing",
    "Grid",
    "Kind",
    "PanelBox",
    "Scale",
    "SpectrumLine",
    "colormap_lut",
    "curves_plot",
    "draw",
    "image_grid",
    "panel_span",
    "read_panels",
    "spectra_figure",
    "warm_up",
]


Drawing = Literal["grid", "spectra", "curves"]
#: The kinds of picture :func:`draw` makes.
DRAWINGS: tuple[str, ...] = get_args(Drawing)


def draw(drawing: str, path: str | os.PathLike[str], /, **kwargs: Any) -> Path:
    """Draw one picture to the PNG ``path``; → ``path``.

    ``drawing``: "grid" (:func:`image_grid` with ``kwargs``, saved), "spectra"
    (:func:`spectra_figure`) or "curves" (:func:`curves_plot`).
    """
    if drawing == "grid":
        return image_grid(**kwargs).save(path)
    if drawing == "spectra":
        return spectra_figure(path=path, **kwargs)
    if drawing == "curves":
        return curves_plot(path=path, **kwargs)
    raise ValueError(f"unknown drawing {drawing!r}; valid: {', '.join(DRAWINGS)}")


def warm_up() -> None:
    """Draw and save a tiny grid of each kind, a spectra figure and a curves plot.

    Fonts, colour tables, the colour keys and the measurements of the fixed captions are
    cached on first use: a worker that forks a process per job calls this before forking,
    so that every job inherits them instead of paying for them.
    """
    panels = [np.zeros((2, 2)), np.ones((2, 2)), np.full((2, 2), np.nan)]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("signed", "image", "magnitude"):
            for scale in ("panel", "row", "shared"):
                grid = image_grid(
                    panels, titles=["a", "b", "c"], title="warm-up", kind=kind, scale=scale
                )
            grid.save(Path(tmp) / f"{kind}.png")
        line = SpectrumLine("warm", np.arange(2), np.array([1.0, 0.0]), 2, None)
        spectra_figure([line, line], Path(tmp) / "spectra.png", title="warm-up")
        # Matplotlib's Agg backend and font cache load on the first drawing.
        curves = {"warm": [1.0, 0.5]}
        curves_plot(["a", "b"], curves, Path(tmp) / "c.png", title="w", ylabel="y", logy=True)
