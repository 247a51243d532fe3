"""The three input-optimization analyses the service runs.

* :func:`activation_maximization` — an image per target: a class logit (``layer=None``) or a
  channel of a named layer; all targets in one batch (or chunks of ``batch_size``).
* :func:`caricature` — DeepDream from given images on each named layer, coarse to fine octaves.
* :func:`inversion` — Mahendran & Vedaldi: reconstruct images from their representation at
  each named layer, all layers in one batch.

Each returns an :class:`AnalysisResult`: images ``(N, C, H, W)`` in [0, 1] and a JSON-ready
metrics list with one entry per image, each with ``target``, ``final_objective`` and
``predicted_class`` (the contract's ``metrics.targets[]``) plus analysis-specific fields.

Every target gets its own generator seeded from ``(seed, target)``, so an image does not depend
on which other targets share its batch: a batched run of K targets gives the same images as K
separate runs with the same seed (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepscope.analysis.hooks import Where, capture_activations, eval_mode, resolve_modules
from deepscope.analysis.optimize.engine import (
    MAX_STEPS,
    Normalize,
    OptimizationResult,
    Progress,
    Schedule,
    make_normalizer,
    model_device,
    optimize,
    score_images,
)
from deepscope.analysis.optimize.objectives import (
    Objective,
    channel,
    class_logit,
    layer_l2,
    per_image,
    representation_match,
)
from deepscope.analysis.optimize.param import (
    ImageParam,
    LowResParam,
    ParamKind,
    PixelParam,
    Squash,
    image_param,
)
from deepscope.analysis.optimize.regularizers import (
    AlphaNorm,
    BlurPenalty,
    Regularizer,
    TotalVariation,
    batchnorm_layers,
    batchnorm_prior,
)
from deepscope.analysis.optimize.rng import target_generators
from deepscope.analysis.optimize.transforms import Jitter, Transform

__all__ = [
    "DEFAULT_BATCHNORM_WEIGHT",
    "AnalysisResult",
    "activation_maximization",
    "caricature",
    "inversion",
]

DEFAULT_BATCHNORM_WEIGHT = 0.05
"""Weight of the batch-norm prior when it is switched on automatically."""

# Noise images used to measure each target's natural scale.
_PROBE_IMAGES = 8
# Dead ReLUs mostly stall channel/neuron objectives at the start (Lucid uses the redirect early).
_REDIRECT_STEPS = 16


@dataclass(frozen=True)
class AnalysisResult:
    """Images and JSON-ready metrics of one analysis.

    Attributes:
        images: ``(N, C, H, W)`` in [0, 1], CPU float32, in the order of ``metrics``.
        metrics: one dict per image, ``{target, final_objective, predicted_class, ...}``.
        warnings: messages for the user (in-place overwrites, early stops).
        history: ``(steps, N)`` objective per step (octaves of a caricature concatenated).
    """

    images: Tensor
    metrics: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    history: Tensor = field(default_factory=lambda: torch.zeros(0, 0))


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be positive (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def _check_images(image: Tensor, name: str = "image") -> Tensor:
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"{name} must be (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return image.detach().float().cpu()


def _target_scales(
    model: nn.Module,
    layer: str | None,
    shape: tuple[int, int, int],
    normalize: Normalize,
    seed: int,
) -> Tensor:
    """``(K,)``: each target's natural unit, the std of its activation over noise images.

    Dividing the objective by it makes the regularizer weights mean the same for a logit and
    for a channel of any layer (their raw magnitudes differ by orders of magnitude). Also
    checks the layer name (ValueError listing the valid ones).
    """
    device, dtype = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((_PROBE_IMAGES, *shape), generator=generator).to(device=device, dtype=dtype)
    norm = make_normalizer(normalize, shape[0])
    names = [] if layer is None else [layer]
    with (
        eval_mode(model),
        torch.no_grad(),
        capture_activations(model, names, Where.OUTPUT, clone=True) as cap,
    ):
        out = model(norm(x))
        act = cap[layer] if layer is not None else out
    if isinstance(act, tuple | list):
        act = act[0]
    if not isinstance(act, Tensor):
        raise ValueError(f"the model returned {type(act).__name__}, not a tensor")
    where = "the model output" if layer is None else f"layer {layer!r}"
    if act.dim() == 2:
        per_channel = act.T
    elif act.dim() == 3 and layer is not None:
        per_channel = act.permute(2, 0, 1).flatten(1)  # tokens (B, N, D): channels on D
    elif act.dim() == 4 and layer is not None:
        per_channel = act.transpose(0, 1).flatten(1)
    else:
        expected = "(B, classes)" if layer is None else "(B, F), (B, N, D) or (B, C, H, W)"
        raise ValueError(f"{where} has shape {tuple(act.shape)}, expected {expected}")
    std = per_channel.float().std(dim=1).cpu()
    floor = max(0.1 * float(std.median()), 1e-6)
    return std.clamp_min(floor)


def _weighted(objective: Objective, weights: Tensor) -> Objective:
    """``objective`` with image ``k``'s score multiplied by ``weights[k]``."""

    def fn(acts: Mapping[str, Tensor]) -> Tensor:
        score = objective(acts)
        return score * weights.to(device=score.device, dtype=score.dtype)

    return Objective(fn, objective.layers, objective.uses_output, objective.name)


def _chunks(n: int, batch_size: int | None) -> list[range]:
    size = n if batch_size is None else batch_size
    if size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _scaled(progress: Progress | None, start: float, span: float) -> Progress | None:
    if progress is None:
        return None
    report = progress
    return lambda fraction, objective: report(start + span * fraction, objective)


def _regularizers(
    model: nn.Module,
    *,
    alpha: float,
    alpha_weight: float,
    tv_weight: float,
    beta: float,
    blur_weight: float,
    batchnorm_weight: float | None,
) -> list[Regularizer]:
    regs: list[Regularizer] = []
    if alpha_weight > 0:
        regs.append(AlphaNorm(alpha_weight, alpha=alpha))
    if tv_weight > 0:
        regs.append(TotalVariation(tv_weight, beta=beta))
    if blur_weight > 0:
        regs.append(BlurPenalty(blur_weight))
    if batchnorm_weight is None:
        batchnorm_weight = DEFAULT_BATCHNORM_WEIGHT if batchnorm_layers(model) else 0.0
    if batchnorm_weight > 0:
        regs.append(batchnorm_prior(model, batchnorm_weight))
    return regs


def activation_maximization(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    targets: Sequence[int] | None = None,
    layer: str | None = None,
    normalization: Normalize = None,
    steps: int = 512,
    lr: float = 0.05,
    param: ParamKind | str = ParamKind.FFT,
    decorrelate: bool = True,
    transforms: Sequence[Transform] | None = None,
    alpha: float = 2.0,
    alpha_weight: float = 4.0,
    tv_weight: float = 0.02,
    blur_weight: float = 0.0,
    batchnorm_weight: float | None = None,
    redirect_relu_steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    max_steps: int = MAX_STEPS,
) -> AnalysisResult:
    """An image per target that maximizes a class logit or a channel.

    Args:
        model: the classifier; it runs on its own device.
        input_shape: ``(C, H, W)`` of the model's input.
        targets: class indices (``layer=None``) or channel indices; None: all of them.
        layer: None for the model's output logits; else a module name whose channels
            (``(B, C, H, W)``: mean of the map; ``(B, F)``: the feature) are the targets.
        normalization: the model's ``(mean, std)`` (or a function), applied to [0, 1] images.
        steps, lr: Adam steps and learning rate (Lucent: 512, 0.05).
        param: ``"fft"`` (decorrelated Fourier, Olah et al.) or ``"pixel"``.
        decorrelate: color decorrelation (FFT, 3 channels).
        transforms: None: :func:`default_transforms` for the size; ``()``: none.
        alpha, alpha_weight: the α-norm prior; tv_weight: total variation (β = 2);
            blur_weight: high-frequency penalty.
        batchnorm_weight: the DeepInversion prior; None: :data:`DEFAULT_BATCHNORM_WEIGHT` when
            the model has BatchNorm2d layers, else off.
        redirect_relu_steps: redirected ReLU gradients for the first steps; None: 16 for
            channel targets, 0 for logits.
        batch_size: targets per forward pass; None: all at once.
        seed: seeds every target's generator (initial image and transform draws).
        progress: ``progress(fraction_done, mean_objective)``.

    Returns:
        images ``(N, C, H, W)``; metrics ``[{target, layer, initial_objective, final_objective,
        predicted_class}]``.

    Raises:
        ValueError: unknown layer (lists the valid ones), target out of range, bad shapes or
            steps.
    """
    shape = _check_shape(input_shape)
    scales = _target_scales(model, layer, shape, normalization, seed)
    count = int(scales.shape[0])
    what = "classes" if layer is None else f"channels in {layer!r}"
    chosen = list(range(count)) if targets is None else [int(t) for t in targets]
    if not chosen:
        raise ValueError("targets is empty")
    bad = [t for t in chosen if not 0 <= t < count]
    if bad:
        raise ValueError(f"target {bad[0]} out of range: {count} {what} (0..{count - 1})")
    redirect = (
        (0 if layer is None else _REDIRECT_STEPS)
        if redirect_relu_steps is None
        else (redirect_relu_steps)
    )
    regs = _regularizers(
        model,
        alpha=alpha,
        alpha_weight=alpha_weight,
        tv_weight=tv_weight,
        beta=2.0,
        blur_weight=blur_weight,
        batchnorm_weight=batchnorm_weight,
    )
    device, _ = model_device(model)
    results: list[OptimizationResult] = []
    spans = _chunks(len(chosen), batch_size)
    for span in spans:
        chunk = [chosen[i] for i in span]
        generators = target_generators(seed, chunk)
        objective: Objective = class_logit(chunk) if layer is None else channel(layer, chunk)
        objective = _weighted(objective, 1.0 / scales[chunk])
        image = image_param(
            param,
            (len(chunk), *shape),
            decorrelate=decorrelate,
            generator=generators,
            device=device,
        )
        results.append(
            optimize(
                model,
                objective,
                image,
                steps=steps,
                lr=lr,
                transforms=transforms,
                regularizers=regs,
                normalize=normalization,
                generator=generators,
                progress=_scaled(progress, span.start / len(chosen), len(span) / len(chosen)),
                redirect_relu_steps=redirect,
                max_steps=max_steps,
            )
        )
    merged = _merge(results)
    unit = scales[chosen]
    initial = merged.initial_objective * unit
    final = merged.final_objective * unit
    metrics = [
        {
            "target": target,
            "layer": layer,
            "initial_objective": _json_float(float(initial[k])),
            "final_objective": _json_float(float(final[k])),
            "objective_scale": float(unit[k]),
            "predicted_class": int(merged.predicted_class[k]),
        }
        for k, target in enumerate(chosen)
    ]
    return AnalysisResult(merged.images, metrics, merged.warnings, merged.history * unit)


def _merge(results: Sequence[OptimizationResult]) -> OptimizationResult:
    """Concatenate chunked results along the batch."""
    warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
    steps = min(r.history.shape[0] for r in results)
    return OptimizationResult(
        images=torch.cat([r.images for r in results]),
        history=torch.cat([r.history[:steps] for r in results], dim=1),
        penalty_history=torch.cat([r.penalty_history[:steps] for r in results], dim=1),
        initial_objective=torch.cat([r.initial_objective for r in results]),
        final_objective=torch.cat([r.final_objective for r in results]),
        predicted_class=torch.cat([r.predicted_class for r in results]),
        warnings=warnings,
    )


def _octave_sizes(height: int, width: int, octaves: int, scale: float) -> list[tuple[int, int]]:
    sizes = []
    for o in range(octaves):
        f = scale ** (octaves - 1 - o)
        sizes.append((max(1, round(height / f)), max(1, round(width / f))))
    return sizes


def caricature(
    model: nn.Module,
    image: Tensor,
    *,
    layers: Sequence[str],
    normalization: Normalize = None,
    octaves: int = 3,
    octave_scale: float = 1.4,
    steps: int = 64,
    lr: float = 0.002,
    transforms: Sequence[Transform] | None = None,
    tv_weight: float = 0.05,
    seed: int = 0,
    progress: Progress | None = None,
    max_steps: int = MAX_STEPS,
) -> AnalysisResult:
    """DeepDream: amplify what each named layer sees in the given images.

    For every layer and image, maximizes the layer's mean squared activation starting from the
    image, coarse to fine: octave ``o`` optimizes a ``1 / octave_scale^(octaves-1-o)`` resolution
    image (upsampled to the input size, plus the finer detail of the previous octave), so any
    model, including fixed-size MLPs, takes it.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` in [0, 1] (before normalization).
        layers: module names; one caricature per (layer, image).
        steps: Adam steps PER OCTAVE; lr: Adam learning rate on pixel values.
        transforms: None: a jitter of 3 % of the size; ``()``: none.

    Returns:
        images ``(L·B, C, H, W)``, layer-major (all images of ``layers[0]`` first); metrics
        ``[{target (the layer), image, initial_objective, final_objective (the layer's mean
        squared activation), amplification (final / initial), predicted_class,
        original_class}]``.

    Raises:
        ValueError: no layers or an unknown one (lists the valid ones), bad octaves, steps.
    """
    images = _check_images(image)
    names = list(dict.fromkeys(layers))
    if not names:
        raise ValueError("caricature needs at least one layer")
    resolve_modules(model, names)
    if octaves < 1:
        raise ValueError(f"octaves must be >= 1, got {octaves}")
    if not octave_scale >= 1.0:
        raise ValueError(f"octave_scale must be >= 1, got {octave_scale}")
    if steps * octaves > max_steps:
        raise ValueError(f"steps={steps} × octaves={octaves} is above the maximum of {max_steps}")
    b, c, h, w = images.shape
    pairs = [(layer, i) for layer in names for i in range(b)]
    raw = per_image([layer_l2(layer) for layer, _ in pairs])
    generators = target_generators(seed, [f"{layer}:{i}" for layer, i in pairs])
    current = images.repeat(len(names), 1, 1, 1)
    initial, original, warnings = score_images(model, raw, current, normalize=normalization)
    # Optimize the amplification relative to the source image, so that the TV weight means
    # the same for every layer and model (raw mean squares differ by orders of magnitude).
    unit = initial.clamp_min(max(float(initial.max()) * 1e-3, 1e-12))
    objective = _weighted(raw, 1.0 / unit)
    chain = [Jitter(max(1.0, 0.03 * min(h, w)))] if transforms is None else list(transforms)
    regs: list[Regularizer] = [TotalVariation(tv_weight)] if tv_weight > 0 else []
    device, _ = model_device(model)
    histories: list[Tensor] = []
    result: OptimizationResult | None = None
    sizes = _octave_sizes(h, w, octaves, octave_scale)
    for o, size in enumerate(sizes):
        param: ImageParam
        if size == (h, w):
            param = PixelParam(
                (len(pairs), c, h, w), init=current, squash=Squash.CLAMP, device=device
            )
        else:
            small = F.interpolate(current, size=size, mode="area")
            detail = current - F.interpolate(small, size=(h, w), mode="bilinear")
            low = PixelParam((len(pairs), c, *size), init=small, squash=Squash.CLAMP, device=device)
            param = LowResParam(low, (h, w), detail.to(device))
        result = optimize(
            model,
            objective,
            param,
            steps=steps,
            lr=lr,
            transforms=chain,
            regularizers=regs,
            normalize=normalization,
            generator=generators,
            progress=_scaled(progress, o / octaves, 1 / octaves),
            max_steps=max_steps,
        )
        histories.append(result.history)
        warnings += result.warnings
        current = result.images
    assert result is not None
    metrics = [
        {
            "target": layer,
            "image": i,
            "initial_objective": _json_float(float(initial[k])),
            "final_objective": _json_float(float(result.final_objective[k] * unit[k])),
            "amplification": _json_float(float(result.final_objective[k])),
            "predicted_class": int(result.predicted_class[k]),
            "original_class": int(original[k]),
        }
        for k, (layer, i) in enumerate(pairs)
    ]
    history = torch.cat(histories) * unit
    return AnalysisResult(result.images, metrics, list(dict.fromkeys(warnings)), history)


def inversion(
    model: nn.Module,
    image: Tensor,
    *,
    layers: Sequence[str],
    normalization: Normalize = None,
    steps: int = 400,
    lr: float = 0.05,
    param: ParamKind | str = ParamKind.PIXEL,
    squash: Squash | str = Squash.CLAMP,
    schedule: Schedule | str = Schedule.COSINE,
    alpha: float = 6.0,
    alpha_weight: float = 1e-3,
    beta: float = 2.0,
    tv_weight: float = 5e-3,
    transforms: Sequence[Transform] | None = (),
    seed: int = 0,
    progress: Progress | None = None,
    max_steps: int = MAX_STEPS,
) -> AnalysisResult:
    """Reconstruct images from their representation at each named layer (Mahendran & Vedaldi).

    Minimizes ``‖Φ(x) − Φ₀‖² / ‖Φ₀‖² + λ_α R_α(x) + λ_TV R_TV(x)`` from a random start, every
    (layer, image) pair in one batch.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` in [0, 1] (before normalization).
        layers: module names; one reconstruction per (layer, image).
        alpha, alpha_weight: the α-norm prior (α = 6); beta, tv_weight: total variation (β = 2).
        transforms: ``()`` (default): none; None: :func:`default_transforms`.

    Returns:
        images ``(L·B, C, H, W)``, layer-major; metrics ``[{target (the layer), image,
        final_objective, predicted_class, original_class, representation_error (‖Φ(x*) − Φ₀‖ /
        ‖Φ₀‖), image_error (‖x* − x₀‖ / ‖x₀‖)}]``.

    Raises:
        ValueError: no layers or an unknown one (lists the valid ones), bad image or steps.
    """
    images = _check_images(image)
    names = list(dict.fromkeys(layers))
    if not names:
        raise ValueError("inversion needs at least one layer")
    resolve_modules(model, names)
    b = images.shape[0]
    device, dtype = model_device(model)
    norm = make_normalizer(normalization, images.shape[1])
    with (
        eval_mode(model),
        torch.no_grad(),
        capture_activations(model, names, Where.OUTPUT, clone=True) as cap,
    ):
        out = model(norm(images.to(device=device, dtype=dtype)))
        targets = {n: cap[n].detach() for n in names}
    if isinstance(out, tuple | list):
        out = out[0]
    original = out.detach().flatten(1).argmax(dim=1).cpu()
    pairs = [(layer, i) for layer in names for i in range(b)]
    objective = per_image(
        [representation_match(layer, targets[layer][i : i + 1]) for layer, i in pairs]
    )
    generators = target_generators(seed, [f"{layer}:{i}" for layer, i in pairs])
    start = image_param(
        param, (len(pairs), *images.shape[1:]), squash=squash, generator=generators, device=device
    )
    regs = _regularizers(
        model,
        alpha=alpha,
        alpha_weight=alpha_weight,
        tv_weight=tv_weight,
        beta=beta,
        blur_weight=0.0,
        batchnorm_weight=0.0,
    )
    result = optimize(
        model,
        objective,
        start,
        steps=steps,
        lr=lr,
        schedule=schedule,
        transforms=transforms,
        regularizers=regs,
        normalize=normalization,
        generator=generators,
        progress=progress,
        max_steps=max_steps,
    )
    reference = images.repeat(len(names), 1, 1, 1)
    image_error = (result.images - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(
        dim=1
    ).clamp_min(1e-12)
    metrics = [
        {
            "target": layer,
            "image": i,
            "final_objective": _json_float(float(result.final_objective[k])),
            "predicted_class": int(result.predicted_class[k]),
            "original_class": int(original[i]),
            "representation_error": _json_float(
                math.sqrt(max(0.0, -float(result.final_objective[k])))
            ),
            "image_error": _json_float(float(image_error[k])),
        }
        for k, (layer, i) in enumerate(pairs)
    ]
    return AnalysisResult(result.images, metrics, result.warnings, result.history)
