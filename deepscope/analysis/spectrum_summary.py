"""A bounded summary of a spectrum: what a result keeps of millions of singular values.

The operator view of a conv on a 224×224 input has 1.8 M singular values; a result keeps the
extremes, quantiles, the top and bottom k, a log-spaced histogram and a profile (the values at
up to 256 evenly spaced indices, enough to draw the curve); the full vector goes to an ``.npz``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["PROFILE_POINTS", "QUANTILES", "spectrum_summary"]

#: Points of the profile; a spectrum with at most this many values is kept whole.
PROFILE_POINTS = 256
#: Quantiles reported (of the values, not of the index).
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def spectrum_summary(
    singular_values: np.ndarray, *, k: int = 16, bins: int = 32
) -> dict[str, object]:
    """Summary of a spectrum.

    Args:
        singular_values: ``(n,)``, n ≥ 1, any order (sorted descending here).
        k: how many of the largest and of the smallest values to keep.
        bins: histogram bins over log10 of the positive values.

    Returns:
        ``{count, max, min, profile: {indices, values}, top, bottom, quantiles, histogram:
        {log10_edges, counts, zeros}}``: ``profile`` holds the values at up to 256 evenly
        spaced 0-based indices of the descending spectrum (first and last included; all when
        n ≤ 256), ``top`` the k largest (descending), ``bottom`` the k smallest (ascending),
        ``quantiles`` {"q": value}, and the histogram counts values per log10 bin (``zeros``:
        values ≤ 0, which have no logarithm).

    Raises:
        ValueError: ``singular_values`` is empty or not 1-D.
    """
    sv = np.sort(np.asarray(singular_values, dtype=np.float64).ravel())[::-1]
    if np.asarray(singular_values).ndim != 1 or sv.size == 0:
        raise ValueError("singular_values must be a non-empty 1-D array")
    n = sv.size
    if n <= PROFILE_POINTS:
        indices = np.arange(n)
    else:
        indices = np.unique(np.round(np.linspace(0, n - 1, PROFILE_POINTS)).astype(np.int64))
    positive = sv[sv > 0]
    if positive.size:
        lo, hi = math.log10(positive.min()), math.log10(positive.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        counts, _ = np.histogram(np.log10(positive), bins=edges)
    else:
        edges, counts = np.zeros(0), np.zeros(0, dtype=np.int64)
    ascending = sv[::-1]
    return {
        "count": int(n),
        "max": float(sv[0]),
        "min": float(sv[-1]),
        "profile": {"indices": indices.tolist(), "values": sv[indices].tolist()},
        "top": sv[:k].tolist(),
        "bottom": ascending[:k].tolist(),
        "quantiles": {
            f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(sv, QUANTILES), strict=True)
        },
        "histogram": {
            "log10_edges": edges.tolist(),
            "counts": counts.astype(np.int64).tolist(),
            "zeros": int(n - positive.size),
        },
    }
