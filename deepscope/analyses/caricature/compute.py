"""``caricature`` in a worker (``deepscope.analysis.optimize.caricature``)."""

from __future__ import annotations

from deepscope.analyses.caricature import CaricatureMetrics
from deepscope.analyses.context import RunContext
from deepscope.analyses.optimizing import run_from_images
from deepscope.analysis.optimize import caricature

__all__ = ["run"]


def run(ctx: RunContext) -> CaricatureMetrics:
    metrics = run_from_images(
        ctx,
        "caricature",
        caricature,
        "caricatures: what each layer amplifies in the image (rows: layer)",
    )
    return CaricatureMetrics.model_validate(metrics)
