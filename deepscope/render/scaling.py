"""Colour-scale limits that follow the bulk of the data, not its few wild values.

Pure numpy, no drawing. A handful of blown-up values (a NaN-adjacent 1.5e4 among values of
0.5) must not flatten everything else: values far outside the bulk are left out of the scale
and drawn as markers by the grid, which says how many there were and how large.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np

__all__ = ["OUTLIER_FACTOR", "group_limits", "robust_limits"]

OUTLIER_FACTOR: Final = 50.0
"""A value is an outlier when its distance from the centre (0 when signed, the median
otherwise) exceeds this many times the bulk's, where the bulk ignores the top 5 %."""

# Below this many values a "bulk" is not defined: a 3×3 delta kernel (one 0.5 among eight
# 1e-5) is data, not an outlier.
_MIN_VALUES: Final = 32
_TAIL: Final = 0.05  # share of largest deviations the bulk reference skips (at least 2 values)


def _outliers(values: np.ndarray, *, signed: bool) -> np.ndarray | None:
    """Boolean mask of the outliers among ``values`` (1-D, finite); None when there are none."""
    n = values.size
    if n < _MIN_VALUES:
        return None
    centre = 0.0 if signed else float(np.median(values))
    deviation = np.abs(values - centre)
    k = max(2, math.ceil(_TAIL * n))
    reference = float(np.partition(deviation, n - 1 - k)[n - 1 - k])
    if reference <= 0.0:  # mostly exact zeros (or one value): no bulk to compare with
        return None
    outside = deviation > OUTLIER_FACTOR * reference
    return outside if outside.any() else None


def _extent(values: np.ndarray, *, signed: bool) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 0.0
    if signed:
        m = float(np.abs(values).max())
        return -m, m
    return float(values.min()), float(values.max())


def robust_limits(values: np.ndarray, *, signed: bool) -> tuple[float, float]:
    """(lo, hi) covering every value but the outliers of ``values``, a 1-D finite array.

    Signed data get a symmetric (−m, m) with m = max |x| over the kept values, so 0 is the
    colormap's centre. Empty input gives (0, 0); equal values give lo == hi.
    """
    outside = _outliers(values, signed=signed)
    return _extent(values if outside is None else values[~outside], signed=signed)


def group_limits(
    members: Sequence[np.ndarray], *, signed: bool
) -> tuple[tuple[float, float], list[bool]]:
    """One scale for panels the caller calls comparable, and which panels must leave it.

    ``members`` holds each panel's finite values (1-D). A panel whose own robust extent is
    more than :data:`OUTLIER_FACTOR` times the group's lower median would leave the others
    a few colormap entries wide (the old ±1.5e4-row bug), so it is flagged to get a scale of
    its own (and the figure says so); the group's scale comes from the remaining panels,
    pooled, where stray values are again left out.

    Returns ((lo, hi), own) with own[k] True for the flagged panels.
    """
    own = [False] * len(members)
    with_data = [k for k, v in enumerate(members) if v.size]
    if len(with_data) >= 2:
        pooled = np.concatenate([members[k] for k in with_data])
        centre = 0.0 if signed else float(np.median(pooled))
        extent = np.empty(len(with_data))
        for i, k in enumerate(with_data):
            # Each panel's own robust extent: a few spikes in a panel do not make it an
            # outlier panel (the pooled pass below clips them), a whole blown-up panel does.
            lo, hi = robust_limits(members[k], signed=signed)
            extent[i] = max(abs(lo - centre), abs(hi - centre))
        # Lower median: with two panels, the smaller one is the reference.
        reference = float(np.sort(extent)[(len(extent) - 1) // 2])
        if reference > 0.0:
            for i, k in enumerate(with_data):
                own[k] = bool(extent[i] > OUTLIER_FACTOR * reference)
    rest = [v for k, v in enumerate(members) if v.size and not own[k]]
    pooled_rest = np.concatenate(rest) if rest else np.empty(0)
    return robust_limits(pooled_rest, signed=signed), own
