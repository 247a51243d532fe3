"""PNG artifacts, torch-free: image grids (numpy + Pillow) and axes plots (matplotlib Figure).

Grids colour each panel (or each row of comparable panels) by its own range, clip the few
values far outside the bulk and mark them, and store their layout in the PNG, so that no
panel is flattened by another's scale and a test can check it. Nothing here writes files
except :meth:`Grid.save`, :func:`spectra_figure` and :func:`curves_plot`.
"""

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
from deepscope.render.plots import SpectrumLine, curves_plot, spectra_figure

__all__ = [
    "MARKER_CLIPPED",
    "MARKER_NONFINITE",
    "PANELS_KEY",
    "Grid",
    "Kind",
    "PanelBox",
    "Scale",
    "SpectrumLine",
    "colormap_lut",
    "curves_plot",
    "image_grid",
    "panel_span",
    "read_panels",
    "spectra_figure",
]
