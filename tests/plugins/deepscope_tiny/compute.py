"""The worker side of ``weight_norms``."""

from __future__ import annotations

import time

import torch

from deepscope.analyses.context import RunContext, to_numpy
from deepscope_tiny import WeightNormsMetrics, WeightNormsParams


def run(ctx: RunContext) -> WeightNormsMetrics:
    params = ctx.params
    assert isinstance(params, WeightNormsParams)
    start = time.monotonic()
    while (held := time.monotonic() - start) < params.hold_s:
        ctx.progress(0.9 * held / params.hold_s, "holding")
        time.sleep(0.1)
    layers = [
        {
            "name": layer.name,
            "frobenius_norm": params.scale * float(torch.linalg.norm(layer.weight)),
        }
        for layer in ctx.loaded.layers
    ]
    first = ctx.loaded.layers[0].weight.detach().double()
    if (
        first.ndim == 2
        and first.shape[1] == first[0].numel() == torch.Size(ctx.input_shape).numel()
    ):
        ctx.draw(
            "grid",
            "first_rows",
            "first_rows.png",
            "the first layer's first rows",
            panels=list(to_numpy(first[:4].reshape(-1, *ctx.input_shape))),
            kind="signed",
            title="first rows of the first layer",
        )
    ctx.progress(1.0, "done")
    return WeightNormsMetrics.model_validate({"layers": layers})
