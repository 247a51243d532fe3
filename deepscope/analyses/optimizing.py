"""Worker-side pieces the input-optimization analyses share (torch)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from deepscope.analyses.context import RunContext, to_numpy
from deepscope.analyses.params import FromImagesParams

__all__ = [
    "by_dataset_index",
    "optimization_model",
    "optimization_progress",
    "rows_by_layer",
    "run_from_images",
    "save_images",
    "source_images",
]


def optimization_model(ctx: RunContext, needs_layers: bool) -> torch.nn.Module:
    """The model to optimize against, on the run's device; hookable when layers are named."""
    model = ctx.loaded.hookable if needs_layers else ctx.loaded.module
    if model is None:
        raise ValueError(
            "objectives on named layers need per-layer activations, which a TorchScript model "
            "cannot expose; upload its weights (safetensors) or a torch.export .pt2 instead"
        )
    return model.to(ctx.device)


def optimization_progress(ctx: RunContext, steps: int) -> Callable[[float, float], None]:
    """``progress(fraction, objective)`` of the optimizers → the job's progress and message:
    ``optimizing: step k/steps, objective x`` (without the objective before the first step,
    which the optimizers report as NaN)."""

    def report(fraction: float, objective: float) -> None:
        step = min(steps, round(fraction * steps))
        value = f", objective {objective:.4g}" if math.isfinite(objective) else ""
        ctx.progress(0.9 * fraction, f"optimizing: step {step}/{steps}{value}")

    return report


def source_images(ctx: RunContext, analysis: str, indices: Sequence[int]) -> Tensor:
    """(B, C, H, W) dataset images in [0, 1] at ``indices``; ValueError when out of range."""
    ds = ctx.require_dataset(analysis)
    bad = [i for i in indices if i >= len(ds)]
    if bad:
        raise ValueError(
            f"image index {bad[0]} is out of range: dataset {ds.name!r} has {len(ds)} images"
        )
    return ds.images[list(indices)].to(ctx.device)


def save_images(ctx: RunContext, stem: str, images: Tensor, description: str) -> None:
    """The optimized images as an .npz in [0, 1] pixel space, for clients and predictions."""
    ctx.add_arrays(f"{stem}_npz", f"{stem}.npz", {"images": to_numpy(images)}, description)


def rows_by_layer(
    ctx: RunContext, stem: str, source: Tensor, images: Tensor, layers: Sequence[str], title: str
) -> None:
    """A grid: the source images, then one row per layer (the analyses are layer-major)."""
    b = source.shape[0]
    panels = torch.cat([source.detach().cpu(), images.detach().cpu()])
    ctx.draw(
        "grid",
        stem,
        f"{stem}.png",
        title,
        panels=list(to_numpy(panels)),
        ncols=b,
        row_labels=["original", *layers],
        kind="image",
        # Pixel space, each image by its own range (printed under it): an optimized image
        # that stays dim is still legible.
        scale="panel",
        data_range=(0.0, 1.0),
        title=title,
    )
    save_images(ctx, stem, images, "layer-major: all images of the first layer first")


def by_dataset_index(metrics: list[dict[str, Any]], indices: Sequence[int]) -> list[dict[str, Any]]:
    """The analyses number images by batch position; users know them by dataset index."""
    return [{**m, "image": indices[int(m["image"])]} for m in metrics]


def run_from_images(
    ctx: RunContext, analysis: str, function: Callable[..., Any], title: str
) -> dict[str, Any]:
    """caricature / inversion: optimize from dataset images at named layers.

    Their params' fields are the analysis functions' keyword arguments, by design.
    """
    params = ctx.params
    assert isinstance(params, FromImagesParams)
    model = optimization_model(ctx, needs_layers=True)
    source = source_images(ctx, analysis, params.images)
    norm = ctx.loaded.normalization
    # Caricature optimizes each octave in turn.
    total = params.steps * int(getattr(params, "octaves", 1))
    result = function(
        model,
        source,
        normalization=(norm.mean, norm.std),
        progress=optimization_progress(ctx, total),
        **params.model_dump(exclude={"analysis", "images"}),
    )
    ctx.warnings += result.warnings
    rows_by_layer(ctx, analysis, source, result.images, params.layers, title)
    return {"images": params.images, "targets": by_dataset_index(result.metrics, params.images)}
