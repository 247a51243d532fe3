"""PNG artifacts: image grids with labels and a shared color scale, spectra, curves.

Matplotlib's object-oriented ``Figure`` API, no pyplot: no global figure registry to leak in a
long-lived worker, no display backend to pick. Arrays here are numpy: the pipeline converts
tensors once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

__all__ = ["curves_plot", "image_grid", "spectra_overview", "spectrum_plot", "to_display"]

_DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def to_display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) → (H, W) for one channel, (H, W, 3) for three; other C tile side by side."""
    if image.ndim == 2:
        return image
    channels = image.shape[0]
    if channels == 1:
        return np.asarray(image[0])
    if channels == 3:
        return np.moveaxis(image, 0, -1)
    # Several channels: a horizontal strip with a one-pixel gap, so each stays readable.
    pad = np.full((image.shape[1], 1), np.nan)
    parts: list[np.ndarray] = []
    for c in range(channels):
        parts += [image[c], pad]
    return np.concatenate(parts[:-1], axis=1)


def image_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    path: Path,
    *,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    ncols: int | None = None,
    signed: bool = False,
    title: str = "",
    vrange: tuple[float, float] | None = None,
    colorbar: bool = True,
) -> Path:
    """A grid of images sharing one color scale.

    Args:
        images: N arrays of shape (C, H, W) or (H, W); N = rows × ncols when ``row_labels``.
        signed: values around zero: diverging colormap symmetric about 0 (RGB images are
            mapped to [0, 1] with 0.5 as zero instead).
        vrange: the color scale; default from the data (symmetric when signed).
    """
    shown = [to_display(np.asarray(im, dtype=np.float64)) for im in images]
    n = len(shown)
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    cols = ncols or min(n, 10)
    rows = (n + cols - 1) // cols
    finite = np.concatenate([s[np.isfinite(s)].ravel() for s in shown])
    if vrange is None:
        if signed:
            m = float(np.abs(finite).max()) if finite.size else 1.0
            vrange = (-m or -1.0, m or 1.0)
        else:
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            vrange = (lo, hi if hi > lo else lo + 1.0)
    if titles is None and len({s.shape for s in shown}) == 1:
        return _mosaic(shown, path, rows, cols, row_labels, signed, title, vrange, colorbar)
    cell = 1.6 if max(s.shape[0] for s in shown) <= 64 else 2.4
    fig = Figure(figsize=(cell * cols + (1.2 if colorbar else 0.2), cell * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = "RdBu_r" if signed else "gray"
    mappable = None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        im = shown[i]
        if im.ndim == 3:  # RGB: scale into [0, 1] with the shared range
            ax.imshow(_rgb(im, vrange), interpolation="nearest")
        else:
            mappable = ax.imshow(
                im, cmap=cmap, vmin=vrange[0], vmax=vrange[1], interpolation="nearest"
            )
        if titles is not None and i < len(titles):
            ax.set_title(titles[i], fontsize=8)
        if row_labels is not None and i % cols == 0 and i // cols < len(row_labels):
            ax.set_ylabel(row_labels[i // cols], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    if colorbar and mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
    return _save(fig, path)


def _rgb(image: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    return np.clip((image - vrange[0]) / (vrange[1] - vrange[0]), 0.0, 1.0)


def _mosaic(
    shown: Sequence[np.ndarray],
    path: Path,
    rows: int,
    cols: int,
    row_labels: Sequence[str] | None,
    signed: bool,
    title: str,
    vrange: tuple[float, float],
    colorbar: bool,
) -> Path:
    """Untitled grids of equal-shaped images as ONE image with 1-pixel gutters.

    A conv layer's weights are hundreds of kernels; one axes each costs seconds in
    matplotlib, one tiled array costs milliseconds.
    """
    h, w = shown[0].shape[:2]
    rgb = shown[0].ndim == 3
    canvas = np.full(((h + 1) * rows - 1, (w + 1) * cols - 1, *((3,) if rgb else ())), np.nan)
    for i, im in enumerate(shown):
        r, c = divmod(i, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = (
            _rgb(im, vrange) if rgb else im
        )
    tile = float(np.clip(w / 12, 0.3, 1.6))  # inches per image: small kernels stay visible
    fig = Figure(figsize=(tile * cols + (1.2 if colorbar else 0.3), tile * h / w * rows + 0.7))
    ax = fig.subplots()
    ax.set_xticks([])
    ax.set_yticks([])
    if rgb:
        ax.imshow(np.nan_to_num(canvas, nan=1.0), interpolation="nearest")
        mappable = None
    else:
        cmap = colormaps["RdBu_r" if signed else "gray"].with_extremes(bad="white")
        mappable = ax.imshow(
            canvas, cmap=cmap, vmin=vrange[0], vmax=vrange[1], interpolation="nearest"
        )
    if row_labels is not None:
        ax.set_yticks([r * (h + 1) + h / 2 for r in range(min(rows, len(row_labels)))])
        ax.set_yticklabels(row_labels[:rows], fontsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar and mappable is not None:
        fig.colorbar(mappable, ax=ax, shrink=0.8, pad=0.02)
    return _save(fig, path)


def spectrum_plot(singular_values: np.ndarray, path: Path, *, title: str) -> Path:
    """Singular values in descending order on a log scale."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    sv = np.asarray(singular_values, dtype=np.float64)
    positive = sv[sv > 0]
    ax.semilogy(np.arange(1, positive.size + 1), positive, marker="." if sv.size <= 64 else None)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σᵢ")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def spectra_overview(
    names: Sequence[str],
    spectra: Sequence[np.ndarray],
    condition_numbers: Sequence[float | None],
    path: Path,
    *,
    title: str,
) -> Path:
    """Left: every layer's σᵢ/σ₁ against i/n; right: condition number by depth."""
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    for k, (name, sv) in enumerate(zip(names, spectra, strict=True)):
        sv = np.asarray(sv, dtype=np.float64)
        if sv.size == 0 or sv[0] <= 0:
            continue
        x = np.arange(1, sv.size + 1) / sv.size
        left.semilogy(
            x,
            np.maximum(sv / sv[0], 1e-12),
            color=cmap(k / max(len(names) - 1, 1)),
            label=name if len(names) <= 12 else None,
        )
    left.set_xlabel("relative index i / n")
    left.set_ylabel("σᵢ / σ₁")
    left.grid(True, which="both", alpha=0.3)
    if len(names) <= 12:
        left.legend(fontsize=7)
    depth = np.arange(len(names))
    cond = np.array([np.nan if c is None else c for c in condition_numbers], dtype=np.float64)
    right.semilogy(depth, cond, marker="o")
    right.set_xticks(depth)
    right.set_xticklabels(names, rotation=70, fontsize=7, ha="right")
    right.set_ylabel("condition number σ₁/σₙ")
    right.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def curves_plot(
    x_labels: Sequence[str],
    curves: Mapping[str, Sequence[float]],
    path: Path,
    *,
    title: str,
    ylabel: str,
) -> Path:
    """One line per key of ``curves`` over the named x positions (e.g. layers by depth)."""
    fig = Figure(figsize=(max(5.0, 0.45 * len(x_labels) + 3), 3.6))
    ax = fig.subplots()
    x = np.arange(len(x_labels))
    for label, values in curves.items():
        ax.plot(x, values, marker="o", label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(x_labels, rotation=60, fontsize=7, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 5 else 1)
    return _save(fig, path)
