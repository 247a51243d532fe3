"""``inverse_images`` in a worker: the inverse maps (``deepscope.analysis.inverse``) and the
paper's Figure 3, one row per method, each row on its own scale."""

from __future__ import annotations

import torch
from torch import Tensor

from deepscope.analyses.context import RunContext, to_numpy
from deepscope.analyses.inverse_images import InverseImagesMetrics, InverseImagesParams
from deepscope.analysis.inverse import (
    EXACT_METHODS,
    VALID_METHODS,
    RefineRecipe,
    TargetMode,
    inverse_images,
    invertible_chain,
)
from deepscope.models.datasets import Dataset

__all__ = ["run"]


def _subset(ds: Dataset, max_samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """At most ``max_samples`` training images and labels, a seeded random subset."""
    if len(ds) <= max_samples:
        return ds.images, ds.labels
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:max_samples]
    return ds.images[idx], ds.labels[idx]


def run(ctx: RunContext) -> InverseImagesMetrics:
    params = ctx.params
    assert isinstance(params, InverseImagesParams)
    ds = ctx.require_dataset("inverse_images")
    model = ctx.loaded.module
    methods: list[str] = list(params.methods or [])
    if not methods:
        # Every method that applies: the exact ones only where the network is invertible.
        invertible = invertible_chain(model) is not None
        methods = [m for m in VALID_METHODS if m not in EXACT_METHODS or invertible]
    images, labels = _subset(ds, params.max_samples, params.seed)
    ctx.progress(0.0, f"scoring {len(images)} training images, then {', '.join(methods)}")
    torch.manual_seed(params.seed)
    result = inverse_images(
        model,
        ctx.normalize(images),
        labels,
        methods=methods,
        target_mode=TargetMode(params.target_mode),
        recipe=RefineRecipe(params.recipe),
        steps=params.steps,
        lr=params.lr,
        optimizer=params.optimizer,
        fraction=params.fraction,
        normalization=ctx.loaded.normalization,
        tolerance=params.tolerance,
        pinv_iterations=params.pinv_iterations,
        box_iterations=params.box_iterations,
        progress=lambda f, loss: ctx.progress(0.9 * f, f"optimizing: loss {loss:.4g}"),
    )
    names = ctx.class_names(ds.num_classes)
    pixels = {m: ctx.denormalize(x).detach().cpu() for m, x in result.images.items()}
    stacked = to_numpy(torch.cat([pixels[m] for m in methods]).double())
    # Each row (method) on its own range: an exact inverse far outside the pixel range must not
    # flatten the rows that stay inside it, and must not be drawn as if it were clipped noise.
    outside = [
        m for m in methods if float(pixels[m].min()) < -1e-6 or float(pixels[m].max()) > 1 + 1e-6
    ]
    ctx.draw(
        "grid",
        "inverse_images",
        "inverse_images.png",
        "ideal inputs per class and method (the paper's Figure 3)",
        panels=list(stacked),
        ncols=len(names),
        titles=names,
        row_labels=[f"{m} *" if m in outside else m for m in methods],
        kind="image",
        scale="row",
        title="ideal input of each class (rows: method, columns: class)",
        note="* leaves the pixel range [0, 1]: shown on its own range" if outside else None,
    )
    ctx.add_arrays(
        "inverse_images_npz",
        "inverse_images.npz",
        {m.replace("+", "_"): to_numpy(x) for m, x in pixels.items()},
        "the images as arrays in [0, 1] pixel space, key = method ('+' as '_')",
    )
    targets = [{**m, "class_name": names[int(m["class"])]} for m in result.metrics]  # type: ignore[call-overload]
    return InverseImagesMetrics.model_validate(
        {
            "methods": methods,
            "target_mode": params.target_mode,
            "recipe": params.recipe,
            "targets_matrix": result.targets.tolist(),
            "targets": targets,
        }
    )
