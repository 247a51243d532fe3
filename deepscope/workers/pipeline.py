"""One analysis, start to finish: model + data in, ``result.json`` + PNG artifacts out.

``deepscope analyze`` calls :func:`run_analysis` in-process; the RQ job functions will call the
same function, so a job's result and the command line's are the same object.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor

from deepscope import __version__
from deepscope.analysis.inverse import (
    PINV,
    VALID_METHODS,
    TargetMode,
    inverse_images,
    invertible_chain,
)
from deepscope.analysis.layers import LayerKind, WeightLayer, select_layers
from deepscope.analysis.optimize import activation_maximization, caricature, inversion
from deepscope.analysis.residuals import per_row_residuals, residual_metrics, residuals
from deepscope.analysis.signal_space import (
    ConvView,
    LayerSpectrum,
    layer_matrix,
    layer_spectrum_metrics,
    signal_space,
    top_singular_directions,
)
from deepscope.models.datasets import Dataset, class_averages, class_indices, load_dataset
from deepscope.models.loading import LoadedModel, layer_input_shapes
from deepscope.params import (
    ActivationMaximizationParams,
    AnalysisKind,
    CaricatureParams,
    InverseImagesParams,
    InversionParams,
    ResidualsParams,
    SignalSpaceParams,
)
from deepscope.workers import render

__all__ = ["Artifact", "Progress", "resolve_device", "run_analysis"]

#: ``progress(fraction in [0, 1], message)``; the worker turns it into job progress.
Progress = Callable[[float, str], None]

_MAX_WEIGHT_ROWS = 16  # rows / channels of a weight grid: more is unreadable at a glance


@dataclass(frozen=True)
class Artifact:
    """A file an analysis wrote, relative to its output directory."""

    name: str
    path: str
    media_type: str = "image/png"
    description: str = ""

    def as_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "url": self.path,
            "media_type": self.media_type,
            "description": self.description,
        }


@dataclass
class _Context:
    loaded: LoadedModel
    params: BaseModel
    out_dir: Path
    device: torch.device
    progress: Progress
    dataset: Dataset | None
    artifacts: list[Artifact] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.loaded.input_shape

    def class_names(self, num_classes: int) -> list[str]:
        names = self.loaded.manifest.class_names
        if names is None and self.dataset is not None:
            names = list(self.dataset.class_names)
        if names is None or len(names) != num_classes:
            return [str(k) for k in range(num_classes)]
        return list(names)

    def require_dataset(self, analysis: str) -> Dataset:
        if self.dataset is None:
            raise ValueError(
                f"analysis {analysis!r} needs a dataset: give --dataset (digits, fashion-mnist, "
                "an idx directory or an .npz file)"
            )
        return self.dataset

    def normalize(self, images: Tensor) -> Tensor:
        """(N, C, H, W) images in [0, 1] → the model's input space."""
        norm = self.loaded.manifest.normalization
        mean = torch.tensor(norm.mean, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(norm.std, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """The model's input space → [0, 1] pixel space (the inverse of :meth:`normalize`)."""
        norm = self.loaded.manifest.normalization
        mean = torch.tensor(norm.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(norm.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def add_array(
        self, name: str, filename: str, arrays: dict[str, np.ndarray], description: str
    ) -> None:
        """Save arrays as an ``.npz`` artifact (for clients that want the numbers)."""
        payload: dict[str, Any] = dict(arrays)  # numpy's stubs type **kwds as allow_pickle
        np.savez_compressed(self.out_dir / filename, **payload)
        self.artifacts.append(Artifact(name, filename, "application/x-npz", description))

    def add(self, name: str, path: Path, description: str = "") -> None:
        rel = path.relative_to(self.out_dir).as_posix()
        self.artifacts.append(Artifact(name, rel, "image/png", description))


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` / None → CUDA when present, else CPU. Called at run time, never at import."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return device


def _np(t: Tensor) -> np.ndarray:
    """A tensor on any device as a numpy array (for rendering and .npz files)."""
    return t.detach().cpu().numpy()


def _safe(name: str) -> str:
    """A layer name as a file-name part (``layer1.0.conv1`` stays readable)."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "input"


def _json_float(value: float) -> float | None:
    # JSON has no inf/nan: an unbounded condition number is reported as null.
    return None if math.isnan(value) or math.isinf(value) else value


# --- signal_space -------------------------------------------------------------------------


def _vector_images(
    layer: WeightLayer, view: ConvView, k: int, input_shape: tuple[int, int, int], first: bool
) -> np.ndarray | None:
    """σᵢ·vᵢ reshaped to the input (first Linear layer) or to the kernel; None if no shape fits."""
    if view is ConvView.OPERATOR or k == 0:
        return None
    if layer.kind is LayerKind.LINEAR:
        if not first or layer.in_channels != math.prod(input_shape):
            return None
        shape: tuple[int, ...] = input_shape
    elif view is ConvView.KERNELS:
        shape = layer.kernel_size
    else:
        shape = (layer.weight.shape[1], *layer.kernel_size)
    sigma, vh = top_singular_directions(layer_matrix(layer, view), k)
    return _np((sigma[:, None] * vh).reshape(-1, *shape))


def _weight_images(
    layer: WeightLayer, input_shape: tuple[int, int, int], first: bool
) -> tuple[np.ndarray, list[str] | None, int] | None:
    """The raw weights as images: (images, titles, ncols), or None when there is no picture."""
    w = layer.weight.detach().cpu().double()
    if layer.kind is LayerKind.LINEAR:
        if not first or layer.in_channels != math.prod(input_shape):
            return None
        rows = _np(w[:_MAX_WEIGHT_ROWS].reshape(-1, *input_shape))
        return rows, None, min(len(rows), 8)
    out_c, in_c = min(w.shape[0], _MAX_WEIGHT_ROWS), min(w.shape[1], _MAX_WEIGHT_ROWS)
    kernels = _np(w[:out_c, :in_c].reshape(out_c * in_c, *layer.kernel_size))
    return kernels, None, in_c


def _run_signal_space(ctx: _Context) -> dict[str, Any]:
    params = ctx.params
    assert isinstance(params, SignalSpaceParams)
    view = ConvView(params.view)
    layers = select_layers(ctx.loaded.layers, params.layers)
    input_hw: dict[str, tuple[int, int]] | None = None
    if view is ConvView.OPERATOR:
        shapes = layer_input_shapes(ctx.loaded)
        input_hw = {
            layer.name: (int(shapes[layer.name][-2]), int(shapes[layer.name][-1]))
            for layer in layers
            if layer.kind is LayerKind.CONV2D
        }
    ctx.progress(0.05, f"SVD of {len(layers)} layers")
    spectra = signal_space(layers, view, input_hw)
    metrics_layers = [layer_spectrum_metrics(s) for s in spectra]
    ctx.progress(0.5, "rendering")
    if params.images:
        _render_signal_space(ctx, params, view, layers, spectra)
    return {"view": view.value, "layers": metrics_layers}


def _render_signal_space(
    ctx: _Context,
    params: SignalSpaceParams,
    view: ConvView,
    layers: Sequence[WeightLayer],
    spectra: Sequence[LayerSpectrum],
) -> None:
    out = ctx.out_dir
    first_name = ctx.loaded.layers[0].name
    num_classes = ctx.loaded.layers[-1].out_channels
    names = ctx.class_names(num_classes)
    for i, (layer, spec) in enumerate(zip(layers, spectra, strict=True)):
        stem = _safe(layer.name)
        stats = spec.stats
        cond = _json_float(stats.condition_number)
        cond_text = "∞" if cond is None else f"{cond:.3g}"
        path = render.spectrum_plot(
            _np(stats.singular_values),
            out / f"spectrum_{stem}.png",
            title=f"{layer.name} ({view.value}, {spec.matrix_shape[0]}×{spec.matrix_shape[1]}): "
            f"rank {stats.rank}, cond {cond_text}",
        )
        ctx.add(f"spectrum_{stem}", path, f"singular values of {layer.name}")
        first = layer.name == first_name
        vectors = _vector_images(layer, view, params.vectors, ctx.input_shape, first)
        if vectors is not None:
            path = render.image_grid(
                list(vectors),
                out / f"singular_vectors_{stem}.png",
                ncols=min(len(vectors), 8),
                signed=True,
                title=f"{layer.name}: σᵢ·vᵢ, i = 1…{len(vectors)} left to right, top to bottom "
                f"({view.value} view)",
            )
            ctx.add(f"singular_vectors_{stem}", path, f"σᵢ·vᵢ of {layer.name}")
        weights = _weight_images(layer, ctx.input_shape, first)
        if weights is not None:
            images, _, ncols = weights
            titles = None
            if layer.kind is LayerKind.LINEAR and layer.out_channels == num_classes:
                titles = names[: len(images)]
            path = render.image_grid(
                list(images),
                out / f"weights_{stem}.png",
                titles=titles,
                ncols=ncols,
                signed=True,
                title=f"{layer.name}: weights"
                + ("" if layer.kind is LayerKind.LINEAR else " (rows: output, cols: input ch.)"),
            )
            ctx.add(f"weights_{stem}", path, f"weights of {layer.name} as images")
        ctx.progress(0.5 + 0.45 * (i + 1) / len(layers), f"rendered {layer.name}")
    path = render.spectra_overview(
        [s.name for s in spectra],
        [_np(s.stats.singular_values) for s in spectra],
        [_json_float(s.stats.condition_number) for s in spectra],
        out / "spectra_overview.png",
        title=f"signal spaces ({view.value} view)",
    )
    ctx.add("spectra_overview", path, "normalized spectra and condition number by depth")


# --- residuals ----------------------------------------------------------------------------


def _residual_inputs(ds: Dataset, params: ResidualsParams) -> tuple[Tensor, list[int]]:
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


def _run_residuals(ctx: _Context) -> dict[str, Any]:
    params = ctx.params
    assert isinstance(params, ResidualsParams)
    ds = ctx.require_dataset("residuals")
    if ctx.loaded.hookable is None:
        raise ValueError(
            "residuals need each layer's input, which a TorchScript model cannot expose; "
            "upload its weights (safetensors) or a torch.export .pt2 instead"
        )
    layers = select_layers(ctx.loaded.layers, params.layers)
    images, labels = _residual_inputs(ds, params)
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
    ctx.progress(0.8, "rendering")
    metrics_layers = [residual_metrics(r, input_names) for r in results]
    out = ctx.out_dir
    first = results[0]
    assert first.inputs is not None  # residuals() keeps inputs by default
    x = first.inputs.detach().cpu().double()
    kept = first.result.projection.detach().cpu().double()
    lost = first.result.residual.detach().cpu().double()
    if x.ndim == 2 and x.shape[1] == math.prod(ctx.input_shape):  # a Linear first layer
        x, kept, lost = (t.reshape(-1, *ctx.input_shape) for t in (x, kept, lost))
    if x.ndim == 4:
        for key, tensor, what in (
            ("input", x, "the input the first layer sees"),
            ("kept", kept, "its projection onto the row space: what the layer sees"),
            ("lost", lost, "the row-space residual: what the layer cannot see"),
        ):
            signed = key == "lost" or bool((tensor < 0).any())
            path = render.image_grid(
                list(_np(tensor)),
                out / f"residuals_{_safe(first.name)}_{key}.png",
                titles=input_names,
                signed=signed,
                title=f"{first.name}: {what}",
            )
            ctx.add(f"residuals_{key}", path, f"{first.name}: {what}")
        row = _own_row_residuals(layers[0], first.inputs, labels, ctx.input_shape)
        if row is not None:
            path = render.image_grid(
                list(row),
                out / f"row_residuals_{_safe(first.name)}.png",
                titles=[
                    f"{n} − proj. on row {k}" for n, k in zip(input_names, labels, strict=True)
                ],
                signed=True,
                title=f"{first.name}: per-row residual of each input against its class's row",
            )
            ctx.add("row_residuals", path, "the paper's per-row residual, own class row")
    curves: dict[str, list[float]] = {}
    for j, name in enumerate(input_names):
        curves.setdefault(name, [float(r.lost_fraction[j]) for r in results])
    path = render.curves_plot(
        [r.name for r in results],
        curves,
        out / "lost_fraction_by_depth.png",
        title="share of each layer's input energy in its null space",
        ylabel="lost fraction ‖r‖² / ‖x‖²",
    )
    ctx.add("lost_fraction_by_depth", path, "lost fraction per layer and input")
    return {"inputs": params.inputs, "layers": metrics_layers}


def _own_row_residuals(
    layer: WeightLayer, inputs: Tensor, labels: Sequence[int], input_shape: tuple[int, int, int]
) -> np.ndarray | None:
    """For a Linear first layer with a row per class (fcnn1): rᵢ against row i = the input's class.

    ``inputs`` (B, in); returns (B, C, H, W) or None where the picture does not apply.
    """
    if (
        layer.kind is not LayerKind.LINEAR
        or inputs.shape[1] != math.prod(input_shape)
        or max(labels) >= layer.out_channels
    ):
        return None
    rows = per_row_residuals(layer.weight.cpu().double(), inputs.cpu().double())  # (B, out, in)
    own = rows[torch.arange(len(labels)), torch.tensor(labels)]
    return _np(own.reshape(-1, *input_shape))


# --- inverse_images -----------------------------------------------------------------------


def _subset(ds: Dataset, max_samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """At most ``max_samples`` training images and labels, a seeded random subset."""
    if len(ds) <= max_samples:
        return ds.images, ds.labels
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:max_samples]
    return ds.images[idx], ds.labels[idx]


def _run_inverse_images(ctx: _Context) -> dict[str, Any]:
    params = ctx.params
    assert isinstance(params, InverseImagesParams)
    ds = ctx.require_dataset("inverse_images")
    model = ctx.loaded.module
    methods: list[str] = list(params.methods or [])
    if not methods:
        # Every method that applies: pinv only where the network is invertible.
        methods = [m for m in VALID_METHODS if m != PINV or invertible_chain(model) is not None]
    images, labels = _subset(ds, params.max_samples, params.seed)
    torch.manual_seed(params.seed)
    result = inverse_images(
        model,
        ctx.normalize(images),
        labels,
        methods=methods,
        target_mode=TargetMode(params.target_mode),
        steps=params.steps,
        lr=params.lr,
        optimizer=params.optimizer,
        fraction=params.fraction,
        progress=lambda f, loss: ctx.progress(0.9 * f, f"loss {loss:.4g}"),
    )
    names = ctx.class_names(ds.num_classes)
    pixels = {m: ctx.denormalize(x).detach().cpu() for m, x in result.images.items()}
    rows = [pixels[m] for m in methods]
    stacked = _np(torch.cat(rows).double())
    lo, hi = np.percentile(stacked, [0.5, 99.5])
    path = render.image_grid(
        list(stacked),
        ctx.out_dir / "inverse_images.png",
        titles=names,
        row_labels=methods,
        ncols=len(names),
        vrange=(float(min(lo, 0.0)), float(max(hi, 1.0))),
        title="ideal input of each class (rows: method, columns: class)",
    )
    ctx.add("inverse_images", path, "ideal inputs per class and method (paper's Figure 3)")
    ctx.add_array(
        "inverse_images_npz",
        "inverse_images.npz",
        {m.replace("+", "_"): _np(x) for m, x in pixels.items()},
        "the images as arrays in [0, 1] pixel space, key = method ('+' as '_')",
    )
    metrics = [
        {**m, "class_name": names[int(m["class"])]}  # type: ignore[call-overload]
        for m in result.metrics
    ]
    return {
        "methods": methods,
        "target_mode": params.target_mode,
        "targets_matrix": result.targets.tolist(),
        "targets": metrics,
    }


# --- input optimization -------------------------------------------------------------------


def _optimization_model(ctx: _Context, needs_layers: bool) -> torch.nn.Module:
    """The model to optimize against, on the run's device; hookable when layers are named."""
    model = ctx.loaded.hookable if needs_layers else ctx.loaded.module
    if model is None:
        raise ValueError(
            "objectives on named layers need per-layer activations, which a TorchScript model "
            "cannot expose; upload its weights (safetensors) or a torch.export .pt2 instead"
        )
    return model.to(ctx.device)


def _normalization(ctx: _Context) -> tuple[list[float], list[float]]:
    norm = ctx.loaded.manifest.normalization
    return list(norm.mean), list(norm.std)


def _source_images(ctx: _Context, analysis: str, indices: Sequence[int]) -> Tensor:
    """(B, C, H, W) dataset images in [0, 1] at ``indices``; ValueError when out of range."""
    ds = ctx.require_dataset(analysis)
    bad = [i for i in indices if i >= len(ds)]
    if bad:
        raise ValueError(
            f"image index {bad[0]} is out of range: dataset {ds.name!r} has {len(ds)} images"
        )
    return ds.images[list(indices)].to(ctx.device)


def _progress(ctx: _Context) -> Callable[[float, float], None]:
    return lambda f, objective: ctx.progress(0.9 * f, f"objective {objective:.4g}")


def _save_images(ctx: _Context, stem: str, images: Tensor, description: str) -> None:
    """The optimized images as an .npz in [0, 1] pixel space, for clients and predictions."""
    ctx.add_array(f"{stem}_npz", f"{stem}.npz", {"images": _np(images)}, description)


def _run_activation_maximization(ctx: _Context) -> dict[str, Any]:
    params = ctx.params
    assert isinstance(params, ActivationMaximizationParams)
    model = _optimization_model(ctx, needs_layers=params.layer is not None)
    result = activation_maximization(
        model,
        input_shape=ctx.input_shape,
        targets=params.targets,
        layer=params.layer,
        normalization=_normalization(ctx),
        steps=params.steps,
        lr=params.lr,
        param=params.param,
        decorrelate=params.decorrelate,
        alpha_weight=params.alpha_weight,
        tv_weight=params.tv_weight,
        batchnorm_weight=params.batchnorm_weight,
        seed=params.seed,
        progress=_progress(ctx),
    )
    ctx.warnings += result.warnings
    num_classes = ctx.loaded.layers[-1].out_channels
    names = ctx.class_names(num_classes)

    def label(k: int) -> str:
        return names[k] if params.layer is None and k < len(names) else str(k)

    titles = [
        f"{label(int(m['target']))} → {names[int(m['predicted_class'])]}" for m in result.metrics
    ]
    what = "class logit" if params.layer is None else f"channel of {params.layer}"
    path = render.image_grid(
        list(_np(result.images)),
        ctx.out_dir / "activation_maximization.png",
        titles=titles,
        vrange=(0.0, 1.0),
        colorbar=False,
        title=f"images maximizing each {what} (title: target → predicted class)",
    )
    ctx.add("activation_maximization", path, f"one image per {what}")
    _save_images(ctx, "activation_maximization", result.images, "optimized images, target order")
    return {"layer": params.layer, "targets": result.metrics}


def _rows_by_layer(
    ctx: _Context, stem: str, source: Tensor, result: Any, layers: Sequence[str], title: str
) -> None:
    """A grid: the source images, then one row per layer (the analyses are layer-major)."""
    b = source.shape[0]
    images = torch.cat([source.detach().cpu(), result.images.detach().cpu()])
    path = render.image_grid(
        list(_np(images)),
        ctx.out_dir / f"{stem}.png",
        row_labels=["original", *layers],
        ncols=b,
        vrange=(0.0, 1.0),
        colorbar=False,
        title=title,
    )
    ctx.add(stem, path, title)
    _save_images(ctx, stem, result.images, "layer-major: all images of the first layer first")


def _by_dataset_index(
    metrics: list[dict[str, Any]], indices: Sequence[int]
) -> list[dict[str, Any]]:
    """The analyses number images by batch position; users know them by dataset index."""
    return [{**m, "image": indices[int(m["image"])]} for m in metrics]


_FROM_IMAGES: dict[AnalysisKind, tuple[Callable[..., Any], str]] = {
    AnalysisKind.CARICATURE: (
        caricature,
        "caricatures: what each layer amplifies in the image (rows: layer)",
    ),
    AnalysisKind.INVERSION: (
        inversion,
        "inversions: the image rebuilt from each layer's representation (rows: layer)",
    ),
}


def _run_from_images(ctx: _Context) -> dict[str, Any]:
    """caricature / inversion: optimize from dataset images at named layers.

    Their params' fields are the analysis functions' keyword arguments, by design.
    """
    params = ctx.params
    assert isinstance(params, CaricatureParams | InversionParams)
    function, title = _FROM_IMAGES[params.analysis]
    model = _optimization_model(ctx, needs_layers=True)
    source = _source_images(ctx, params.analysis.value, params.images)
    result = function(
        model,
        source,
        normalization=_normalization(ctx),
        progress=_progress(ctx),
        **params.model_dump(exclude={"analysis", "images"}),
    )
    ctx.warnings += result.warnings
    _rows_by_layer(ctx, params.analysis.value, source, result, params.layers, title)
    return {"images": params.images, "targets": _by_dataset_index(result.metrics, params.images)}


_RUNNERS: dict[AnalysisKind, Callable[[_Context], dict[str, Any]]] = {
    AnalysisKind.SIGNAL_SPACE: _run_signal_space,
    AnalysisKind.RESIDUALS: _run_residuals,
    AnalysisKind.INVERSE_IMAGES: _run_inverse_images,
    AnalysisKind.ACTIVATION_MAXIMIZATION: _run_activation_maximization,
    AnalysisKind.CARICATURE: _run_from_images,
    AnalysisKind.INVERSION: _run_from_images,
}


def run_analysis(
    loaded: LoadedModel,
    analysis: AnalysisKind,
    params: BaseModel,
    out_dir: Path,
    *,
    dataset: str | Dataset | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run one analysis and write ``out_dir/result.json`` and its artifacts.

    Returns the result object: ``{analysis, params, model, dataset, deepscope_version,
    metrics, artifacts: [{name, url, media_type, description}], warnings, duration_s}``.

    Raises:
        ValueError: bad parameters for this model (unknown layer, missing dataset, a dataset
            whose images do not fit the model).
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = _resolve_dataset(loaded, dataset)
    ctx = _Context(
        loaded=loaded,
        params=params,
        out_dir=out_dir,
        device=resolve_device(device),
        progress=progress or (lambda _f, _m: None),
        dataset=ds,
    )
    metrics = _RUNNERS[analysis](ctx)
    result: dict[str, Any] = {
        "analysis": analysis.value,
        "params": params.model_dump(mode="json", exclude={"analysis"}),
        "model": {
            "sha256": loaded.sha256,
            "format": loaded.format.value,
            "arch": loaded.manifest.arch,
            "input_shape": list(loaded.input_shape),
            "num_parameters": loaded.num_parameters,
        },
        "dataset": None if ds is None else ds.name,
        "deepscope_version": __version__,
        "metrics": metrics,
        "artifacts": [a.as_json() for a in ctx.artifacts],
        "warnings": ctx.warnings,
        "duration_s": round(time.perf_counter() - started, 3),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    ctx.progress(1.0, "done")
    return result


def _resolve_dataset(loaded: LoadedModel, dataset: str | Dataset | None) -> Dataset | None:
    if dataset is None and loaded.manifest.training is not None:
        dataset = loaded.manifest.training.dataset
    if dataset is None:
        return None
    ds = load_dataset(dataset, "train") if isinstance(dataset, str) else dataset
    if ds.input_shape != loaded.input_shape:
        shape = "×".join(map(str, ds.input_shape))
        want = "×".join(map(str, loaded.input_shape))
        raise ValueError(f"dataset {ds.name!r} has {shape} images but the model takes {want}")
    return ds
