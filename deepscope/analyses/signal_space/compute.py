"""``signal_space`` in a worker: the SVDs (``deepscope.analysis.signal_space``), a bounded
summary per layer, every singular value in ``singular_values.npz``, and the pictures: one
figure with every layer's spectrum, and per layer its top singular directions and weights.

Operator view with a non-circular boundary: a layer whose operator is over the dense limit
gets a partial spectrum (its largest and smallest values by Lanczos, in
``extreme_singular_values.npz``), a null rank, no quantiles nor histogram, and a warning."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from deepscope import render
from deepscope.analyses.context import RunContext, safe_name, to_numpy
from deepscope.analyses.signal_space import LayerSpectrum, SignalSpaceMetrics, SignalSpaceParams
from deepscope.analysis.layers import LayerKind, WeightLayer, select_layers
from deepscope.analysis.operator_spectrum import OperatorSpectrum
from deepscope.analysis.signal_space import (
    DEFAULT_MAX_DENSE,
    ConvView,
    layer_matrix,
    layer_spectrum_metrics,
    signal_space,
    top_singular_directions,
)
from deepscope.analysis.spectrum_summary import spectrum_summary
from deepscope.models.loading import layer_input_shapes

__all__ = ["run"]

#: Output (rows) and input (columns) channels of a conv's weight grid: more is unreadable at a
#: glance (every weight is in the model file).
_MAX_WEIGHT_ROWS = 16
_MAX_WEIGHT_COLS = 8


def run(ctx: RunContext) -> SignalSpaceMetrics:
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
    try:
        spectra = signal_space(
            layers,
            view,
            input_hw,
            operator_padding=None if params.padding == "layer" else params.padding,
            k=params.extremes,
        )
    except ValueError as exc:
        if "too large even for its extreme" not in str(exc):
            raise
        # The analysis layer names its own keyword; a job is steered by its params.
        layer = str(exc).split("'")[1] if "'" in str(exc) else "a layer"
        raise ValueError(
            f"layer {layer!r}: its operator with a {params.padding} boundary is too large even "
            "for a Lanczos estimate of its extreme singular values; use params "
            '{"padding": "circular"} (exact by FFT at any size), a smaller input, or `layers` '
            "to leave it out"
        ) from None
    ctx.warnings += [f"{s.name}: {s.note}" for s in spectra if s.note]
    values = {s.name: to_numpy(s.stats.singular_values) for s in spectra if s.stats is not None}
    extremes = {s.name: s.extremes for s in spectra if s.extremes is not None}
    entries = []
    for s in spectra:
        entry = layer_spectrum_metrics(s)
        entry.pop("singular_values", None)
        if s.extremes is not None:
            entry["spectrum"] = _partial_summary(s.extremes)
            ctx.warnings.append(_partial_warning(s.extremes))
        else:
            entry["spectrum"] = spectrum_summary(values[s.name])
        entries.append(LayerSpectrum.model_validate(entry))
    if values:
        ctx.add_arrays(
            "singular_values",
            "singular_values.npz",
            values,
            "every singular value of every layer with a complete spectrum, descending; "
            "key = layer name",
        )
    if extremes:
        ctx.add_arrays(
            "extreme_singular_values",
            "extreme_singular_values.npz",
            {name: _extremes_array(spec) for name, spec in extremes.items()},
            "layers with a partial spectrum (Lanczos): key = layer name, a (4, k) array of rows "
            "largest (descending), smallest (ascending), and the error bound of each",
        )
    if params.images:
        ctx.progress(0.5, "drawing")
        _draw(ctx, params, view, layers, entries)
    return SignalSpaceMetrics(view=view.value, layers=entries)


def _partial_summary(spec: OperatorSpectrum) -> dict[str, object]:
    """The ``spectrum`` entry of a partial spectrum: what the extremes give, nothing invented.

    The profile holds the known values at their true 0-based indices in the descending
    spectrum of ``count = min(m, n)``: the top at ``0..k−1``, the bottom at ``count−k..count−1``.
    """
    count = min(spec.matrix_shape)
    top = spec.largest.tolist()
    bottom = spec.smallest.tolist()
    # A dict by index: top and bottom overlap only when 2k exceeds the count.
    known = {i: v for i, v in enumerate(top)}
    known.update({count - 1 - i: v for i, v in enumerate(bottom)})
    indices = sorted(known)
    return {
        "count": count,
        "complete": False,
        "max": spec.sigma_max,
        "min": spec.sigma_min,
        "profile": {"indices": indices, "values": [known[i] for i in indices]},
        "top": top,
        "bottom": bottom,
        "quantiles": None,
        "histogram": None,
    }


def _partial_warning(spec: OperatorSpectrum) -> str:
    m, n = spec.matrix_shape
    h, w = spec.input_hw
    k = int(spec.largest.numel())
    text = (
        f"{spec.name}: partial spectrum: its {spec.padding.value}-padded operator on {h}×{w} "
        f"({m}×{n}, {min(m, n)} singular values) is over the dense limit of "
        f"{DEFAULT_MAX_DENSE}; only the {k} largest and {k} smallest were computed "
        f"(Lanczos with the conv and its adjoint), so rank, quantiles and histogram are null"
    )
    if not spec.converged:
        text += (
            f"; Lanczos did not converge: σ_min = {spec.sigma_min:.4g} is an estimate, within "
            f"{float(spec.smallest_error[0]):.2g} of some singular value"
        )
    return text


def _extremes_array(spec: OperatorSpectrum) -> np.ndarray:
    """``(4, k)``: largest, smallest, largest_error, smallest_error."""
    rows = (spec.largest, spec.smallest, spec.largest_error, spec.smallest_error)
    width = max(int(r.numel()) for r in rows)
    out = np.full((4, width), np.nan)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = to_numpy(row)
    return out


def _kernel_is_image(layer: WeightLayer) -> bool:
    # A 1×1 kernel (most convs of a bottleneck ResNet) is a single pixel: as a picture it
    # shows nothing a table does not.
    return layer.kind is LayerKind.CONV2D and math.prod(layer.kernel_size) > 1


def _vector_images(
    layer: WeightLayer, view: ConvView, k: int, input_shape: tuple[int, int, int], first: bool
) -> np.ndarray | None:
    """σᵢ·vᵢ ``(k, *shape)`` reshaped to the input (first Linear layer) or to the kernel; None
    where no shape fits."""
    if view is ConvView.OPERATOR or k == 0:
        return None
    if layer.kind is LayerKind.CONV2D and not _kernel_is_image(layer):
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
    return to_numpy((sigma[:, None] * vh).reshape(-1, *shape))


def _weight_images(
    layer: WeightLayer, input_shape: tuple[int, int, int], first: bool
) -> tuple[np.ndarray, int] | None:
    """The raw weights as images ``(N, ...)`` and the grid's columns, or None.

    Only the first layer's: its rows (or kernels) act on the pixels, so they are pictures of
    what it looks for. Deeper layers' weights act on feature maps; their singular directions
    are drawn instead.
    """
    if not first:
        return None
    w = layer.weight.detach().cpu().double()
    if layer.kind is LayerKind.LINEAR:
        if layer.in_channels != math.prod(input_shape):
            return None
        rows = to_numpy(w[:_MAX_WEIGHT_ROWS].reshape(-1, *input_shape))
        return rows, min(len(rows), 8)
    if not _kernel_is_image(layer):
        return None
    out_c, in_c = min(w.shape[0], _MAX_WEIGHT_ROWS), min(w.shape[1], _MAX_WEIGHT_COLS)
    kernels = to_numpy(w[:out_c, :in_c].reshape(out_c * in_c, *layer.kernel_size))
    return kernels, in_c


def _draw(
    ctx: RunContext,
    params: SignalSpaceParams,
    view: ConvView,
    layers: Sequence[WeightLayer],
    entries: Sequence[LayerSpectrum],
) -> None:
    lines = [
        render.SpectrumLine(
            name=e.name,
            indices=np.asarray(e.spectrum.profile.indices),
            values=np.asarray(e.spectrum.profile.values),
            count=e.spectrum.count,
            condition_number=e.condition_number,
            partial=not e.spectrum.complete,
        )
        for e in entries
    ]
    partial = any(not e.spectrum.complete for e in entries)
    ctx.draw(
        "spectra",
        "spectra",
        "spectra.png",
        "every layer's normalized spectrum and condition number",
        layers=lines,
        title=f"signal spaces ({view.value} view)"
        + (" — partial spectra: largest and smallest only" if partial else ""),
    )
    first_name = ctx.loaded.layers[0].name
    num_classes = ctx.loaded.layers[-1].out_channels
    names = ctx.class_names(num_classes)
    for i, layer in enumerate(layers):
        stem = safe_name(layer.name)
        first = layer.name == first_name
        vectors = _vector_images(layer, view, params.vectors, ctx.input_shape, first)
        if vectors is not None:
            ctx.draw(
                "grid",
                f"singular_vectors_{stem}",
                f"singular_vectors_{stem}.png",
                f"σᵢ·vᵢ of {layer.name}",
                panels=list(vectors),
                ncols=min(len(vectors), 8),
                titles=[f"σ{_sub(j + 1)}·v{_sub(j + 1)}" for j in range(len(vectors))],
                kind="signed",
                scale="panel",
                title=f"{layer.name}: top {len(vectors)} singular directions σᵢ·vᵢ "
                f"({view.value} view)",
            )
        weights = _weight_images(layer, ctx.input_shape, first)
        if weights is not None:
            images, ncols = weights
            linear = layer.kind is LayerKind.LINEAR
            titles = names[: len(images)] if linear and layer.out_channels == num_classes else None
            ctx.draw(
                "grid",
                f"weights_{stem}",
                f"weights_{stem}.png",
                f"weights of {layer.name}",
                panels=list(images),
                ncols=ncols,
                titles=titles,
                kind="signed",
                scale="panel",
                title=f"{layer.name}: weights"
                + ("" if linear else " (rows: output channel, columns: input channel)"),
            )
        ctx.progress(0.5 + 0.45 * (i + 1) / len(layers), f"drawing: {layer.name}")


_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _sub(n: int) -> str:
    return str(n).translate(_SUBSCRIPTS)
