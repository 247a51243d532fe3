"""``inversion`` in a worker (``deepscope.analysis.optimize.inversion``)."""

from __future__ import annotations

from deepscope.analyses.context import RunContext
from deepscope.analyses.inversion import InversionMetrics
from deepscope.analyses.optimizing import run_from_images
from deepscope.analysis.optimize import inversion

__all__ = ["run"]


def run(ctx: RunContext) -> InversionMetrics:
    metrics = run_from_images(
        ctx,
        "inversion",
        inversion,
        "inversions: the image rebuilt from each layer's representation (rows: layer)",
    )
    return InversionMetrics.model_validate(metrics)
