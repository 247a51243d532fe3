"""``activation_maximization`` in a worker (``deepscope.analysis.optimize``)."""

from __future__ import annotations

from deepscope.analyses.activation_maximization import (
    ActivationMaximizationMetrics,
    ActivationMaximizationParams,
)
from deepscope.analyses.context import RunContext, to_numpy
from deepscope.analyses.optimizing import optimization_model, optimization_progress, save_images
from deepscope.analysis.optimize import activation_maximization

__all__ = ["run"]


def run(ctx: RunContext) -> ActivationMaximizationMetrics:
    params = ctx.params
    assert isinstance(params, ActivationMaximizationParams)
    model = optimization_model(ctx, needs_layers=params.layer is not None)
    norm = ctx.loaded.normalization
    result = activation_maximization(
        model,
        input_shape=ctx.input_shape,
        targets=params.targets,
        layer=params.layer,
        normalization=(norm.mean, norm.std),
        steps=params.steps,
        lr=params.lr,
        param=params.param,
        decorrelate=params.decorrelate,
        alpha_weight=params.alpha_weight,
        tv_weight=params.tv_weight,
        batchnorm_weight=params.batchnorm_weight,
        seed=params.seed,
        progress=optimization_progress(ctx, params.steps),
    )
    ctx.warnings += result.warnings
    names = ctx.class_names(ctx.loaded.layers[-1].out_channels)

    def label(k: int) -> str:
        return names[k] if params.layer is None and k < len(names) else str(k)

    titles = [
        f"{label(int(m['target']))} → {names[int(m['predicted_class'])]}" for m in result.metrics
    ]
    what = "class logit" if params.layer is None else f"channel of {params.layer}"
    ctx.draw(
        "grid",
        "activation_maximization",
        "activation_maximization.png",
        f"one image per {what}",
        panels=list(to_numpy(result.images)),
        titles=titles,
        kind="image",
        # Pixel space, each image by its own range (printed under it): an optimized image
        # that stays dim is still legible.
        scale="panel",
        data_range=(0.0, 1.0),
        title=f"images maximizing each {what} (title: target → predicted class)",
    )
    save_images(ctx, "activation_maximization", result.images, "optimized images, target order")
    return ActivationMaximizationMetrics.model_validate(
        {"layer": params.layer, "targets": result.metrics}
    )
