"""``residuals`` in a worker: projections onto each layer's row space
(``deepscope.analysis.residuals``) and the pictures of what the first layer keeps and loses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from deepscope.analyses.context import RunContext, safe_name, to_numpy
from deepscope.analyses.residuals import ResidualsMetrics, ResidualsParams
from deepscope.analysis.layers import LayerKind, WeightLayer, select_layers
from deepscope.analysis.residuals import per_row_residuals, residual_metrics, residuals
from deepscope.models.datasets import Dataset, class_averages, class_indices

__all__ = ["run"]


def _inputs(ds: Dataset, params: ResidualsParams) -> tuple[Tensor, list[int]]:
    """(B, C, H, W) images in [0, 1] and the class of each."""
    if params.inputs == "class_averages":
        avg = class_averages(ds)
        return avg, list(range(avg.shape[0]))
    picks: list[Tensor] = []
    labels: list[int] = []
    for k, idx in enumerate(class_indices(ds)):
        chosen = idx[: params.samples_per_class]
        picks.append(ds.images[chosen])
        labels += [k] * len(chosen)
    return torch.cat(picks), labels


def run(ctx: RunContext) -> ResidualsMetrics:
    params = ctx.params
    assert isinstance(params, ResidualsParams)
    ds = ctx.require_dataset("residuals")
    if ctx.loaded.hookable is None:
        raise ValueError(
            "residuals need each layer's input, which a TorchScript model cannot expose; "
            "upload its weights (safetensors) or a torch.export .pt2 instead"
        )
    layers = select_layers(ctx.loaded.layers, params.layers)
    images, labels = _inputs(ds, params)
    names = ctx.class_names(ds.num_classes)
    input_names = [names[k] for k in labels]
    ctx.progress(0.05, f"projecting {len(labels)} inputs onto {len(layers)} row spaces")
    results = residuals(
        ctx.loaded.hookable,
        layers,
        ctx.normalize(images),
        rtol=params.rtol,
        max_iter=params.max_iter,
    )
    ctx.progress(0.8, "drawing")
    metrics = ResidualsMetrics.model_validate(
        {
            "inputs": params.inputs,
            "layers": [residual_metrics(r, input_names) for r in results],
        }
    )
    first = results[0]
    assert first.inputs is not None  # residuals() keeps inputs by default
    x = first.inputs.detach().cpu().double()
    kept = first.result.projection.detach().cpu().double()
    lost = first.result.residual.detach().cpu().double()
    if x.ndim == 2 and x.shape[1] == math.prod(ctx.input_shape):  # a Linear first layer
        x, kept, lost = (t.reshape(-1, *ctx.input_shape) for t in (x, kept, lost))
    if x.ndim == 4:
        # One figure, one column per input: the input (in the model's input space, where 0 is
        # the mean), what the layer sees and what it cannot see. Each panel on its own scale,
        # printed under it: the residual is far smaller than the input, and each class's
        # structure is what matters.
        b = x.shape[0]
        ctx.draw(
            "grid",
            "residuals",
            f"residuals_{safe_name(first.name)}.png",
            f"{first.name}: input, projection onto the row space, residual",
            panels=[*to_numpy(x), *to_numpy(kept), *to_numpy(lost)],
            ncols=b,
            titles=input_names,
            row_labels=["input x", "kept P_row x", "lost x − P_row x"],
            kind="signed",
            scale="panel",
            title=f"{first.name}: what the layer sees and what it cannot see",
        )
        row = _own_row_residuals(layers[0], first.inputs, labels, ctx.input_shape, ds.num_classes)
        if row is not None:
            ctx.draw(
                "grid",
                "row_residuals",
                f"row_residuals_{safe_name(first.name)}.png",
                "the paper's per-row residual, own class row",
                panels=list(row),
                titles=[
                    f"{n} − proj. on row {k}" for n, k in zip(input_names, labels, strict=True)
                ],
                kind="signed",
                scale="panel",
                title=f"{first.name}: per-row residual of each input against its class's row",
            )
    curves: dict[str, list[float]] = {}
    for j, name in enumerate(input_names):
        curves.setdefault(name, [float(r.lost_fraction[j]) for r in results])
    ctx.draw(
        "curves",
        "lost_fraction_by_depth",
        "lost_fraction_by_depth.png",
        "lost fraction per layer and input",
        x_labels=[r.name for r in results],
        curves=curves,
        title="share of each layer's input energy in its null space",
        ylabel="lost fraction ‖r‖² / ‖x‖²",
    )
    return metrics


def _own_row_residuals(
    layer: WeightLayer,
    inputs: Tensor,
    labels: Sequence[int],
    input_shape: tuple[int, int, int],
    num_classes: int,
) -> np.ndarray | None:
    """For a Linear first layer with a row per class (fcnn1): rᵢ against row i = the input's
    class. ``inputs`` (B, in); returns (B, C, H, W) or None where the picture does not apply."""
    if (
        layer.kind is not LayerKind.LINEAR
        or inputs.shape[1] != math.prod(input_shape)
        or layer.out_channels != num_classes
    ):
        return None
    rows = per_row_residuals(layer.weight.cpu().double(), inputs.cpu().double())  # (B, out, in)
    own = rows[torch.arange(len(labels)), torch.tensor(labels)]
    return to_numpy(own.reshape(-1, *input_shape))
