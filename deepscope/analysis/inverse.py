"""Inverse maps: the ideal input image of each class (Pattichis & Pattichis 2024).

The paper asks which input drives a classifier to a prescribed output. The target output of
class ``c`` comes from the training-set range of the output units (:func:`output_targets`): by
default every unit at its own minimum and unit ``c`` at its maximum (or the 25th / 75th
percentiles); ``paper`` targets follow the authors' code instead. An input reaching that target
is found in three ways:

* **input optimization** (``X+training``): start from a training-set image (the class average,
  the class image whose output is closest to the target, or the average of the closest 25%) and
  minimize ``MSE(model(x), target)`` over ``x``, all classes in one batch (:func:`refine`, with
  deepscope's or the paper's recipe);
* **the exact inverse** (``pinv``) of an invertible network (Linear layers and elementwise
  invertible activations such as SELU): the layer-by-layer minimum-change solution where it
  reproduces the target, else a Gauss–Newton search over the input of the whole network; each
  class is reported ``reached``, ``not_found`` or ``unreachable`` (proved), never guessed
  (:mod:`deepscope.analysis.network_inverse`);
* **the nearest reachable output in the data range** (``pinv_box``): the same search restricted
  to inputs whose pixels lie in the data range (e.g. [0, 1]), since the exact inverse of a deep
  network typically lies far outside it.

All images here are model inputs (already normalized), shape ``(N, C, H, W)``; the data range is
given in pixel units and mapped through the caller's normalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from deepscope.analysis.hooks import eval_mode
from deepscope.analysis.network_inverse import (
    REACH_TOLERANCE,
    BoxInverseResult,
    ExactInverseResult,
    InverseStatus,
    LayerwiseInverseResult,
    box_inverse,
    chain_names,
    exact_inverse,
    invertible_chain,
    layerwise_inverse,
    why_not_invertible,
)

__all__ = [
    "EXACT_METHODS",
    "PINV",
    "PINV_BOX",
    "REACH_TOLERANCE",
    "RECIPES",
    "VALID_METHODS",
    "BoxInverseResult",
    "ExactInverseResult",
    "InverseImagesResult",
    "InverseStatus",
    "LayerwiseInverseResult",
    "MeanStd",
    "Normalization",
    "RefineRecipe",
    "RefineSettings",
    "StartMethod",
    "TargetMode",
    "box_inverse",
    "class_averages",
    "exact_inverse",
    "inverse_images",
    "invertible_chain",
    "layerwise_inverse",
    "output_targets",
    "refine",
    "start_images",
    "why_not_invertible",
]

ProgressFn = Callable[[float, float], None]
Optimizer = Literal["adam", "sgd"]

_SCORE_BATCH = 1024


class TargetMode(StrEnum):
    """How the target output of each class is read off the training-set scores.

    ``minmax`` (default): row ``c`` holds every unit ``j`` at unit ``j``'s own training minimum
    and unit ``c`` at its maximum. ``percentile``: the same with the 25th / 75th percentiles.
    ``paper``: the authors' construction: row ``c`` holds unit ``c``'s minimum in *every*
    entry and unit ``c``'s maximum at entry ``c``. ``paper_percentile``: the same with unit
    ``c``'s 25th / 75th percentiles.
    """

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    PAPER = "paper"
    PAPER_PERCENTILE = "paper_percentile"


class StartMethod(StrEnum):
    """The starting image of each class."""

    AVG = "avg"
    MIN = "min"
    AVG_MIN = "avg_min"


class RefineRecipe(StrEnum):
    """Default optimizer, learning rate and steps of the ``+training`` refinement.

    ``deepscope`` (default): Adam, lr 0.01, 200 steps. ``paper``: the authors' settings: plain
    SGD (no momentum, no weight decay), lr 1e-4, 100 steps, no pixel clamping. Both minimize
    each class's own ``MSE(model(x), t)`` (the mean over the M outputs, as ``nn.MSELoss``).
    """

    DEEPSCOPE = "deepscope"
    PAPER = "paper"


@dataclass(frozen=True)
class RefineSettings:
    """What a :class:`RefineRecipe` sets."""

    optimizer: Optimizer
    lr: float
    steps: int


#: The settings of each refinement recipe.
RECIPES: dict[RefineRecipe, RefineSettings] = {
    RefineRecipe.DEEPSCOPE: RefineSettings(optimizer="adam", lr=0.01, steps=200),
    RefineRecipe.PAPER: RefineSettings(optimizer="sgd", lr=1e-4, steps=100),
}


def _recipe(recipe: RefineRecipe | str) -> RefineRecipe:
    try:
        return RefineRecipe(recipe)
    except ValueError:
        choices = ", ".join(r.value for r in RefineRecipe)
        raise ValueError(f"unknown recipe {recipe!r}; valid recipes are: {choices}") from None


# --------------------------------------------------------------------------------------------
# Targets and start images
# --------------------------------------------------------------------------------------------


def _quantile(values: Tensor, q: float) -> Tensor:
    """Column quantiles of ``values`` ``(N, K)`` → ``(K,)``, linear interpolation (numpy's).

    ``torch.quantile`` refuses inputs over 2**24 elements; sorting has no such limit.
    """
    ordered = values.sort(dim=0).values
    pos = q * (values.shape[0] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def output_targets(scores: Tensor, mode: TargetMode | str = TargetMode.MINMAX) -> Tensor:
    """The target output of every class, from the model's outputs on the training set.

    With ``low_j`` / ``high_j`` the training-set minimum / maximum of output unit ``j`` (or its
    25th / 75th percentile, linear interpolation as numpy's default):

    * ``minmax`` / ``percentile`` (deepscope's default): ``T[c, j] = low_j`` for ``j ≠ c`` and
      ``T[c, c] = high_c``: every unit at its own low value, so each target entry lies inside
      the range that unit was seen to produce;
    * ``paper`` / ``paper_percentile`` (the authors' code): ``T[c, j] = low_c`` for ``j ≠ c`` and
      ``T[c, c] = high_c``: unit ``c``'s low value in every entry. Entries ``j ≠ c`` may then lie
      outside anything unit ``j`` produced on the training set.

    Example: unit minima ``(0, 0, -2)`` and maxima ``(3, 5, 4)`` give ``minmax`` rows
    ``[3, 0, -2], [0, 5, -2], [0, 0, 4]`` and ``paper`` rows ``[3, 0, 0], [0, 5, 0],
    [-2, -2, 4]``.

    Args:
        scores: ``(N, K)`` the model's outputs on the N training images.
        mode: a :class:`TargetMode`.

    Returns:
        ``(K, K)``; row ``c`` is the target output of class ``c``.
    """
    try:
        mode = TargetMode(mode)
    except ValueError:
        choices = ", ".join(m.value for m in TargetMode)
        raise ValueError(f"unknown target mode {mode!r}; valid modes are: {choices}") from None
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (N, K) with N, K >= 1, got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores hold non-finite values (NaN or Inf)")
    if mode in (TargetMode.MINMAX, TargetMode.PAPER):
        low, high = scores.min(dim=0).values, scores.max(dim=0).values
    else:
        low, high = _quantile(scores, 0.25), _quantile(scores, 0.75)
    num = scores.shape[1]
    if mode in (TargetMode.MINMAX, TargetMode.PERCENTILE):
        targets = low[None, :].expand(num, -1).clone()
    else:
        targets = low[:, None].expand(-1, num).clone()
    targets.diagonal().copy_(high)
    return targets


def _check_labels(images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``labels`` as int64 on ``images.device``, validated against ``images`` and K classes."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {images.shape[0]} images, got {tuple(labels.shape)}"
        )
    labels = labels.to(device=images.device, dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1} (the model has {num_classes} outputs), "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    counts = torch.bincount(labels, minlength=num_classes)
    empty = [c for c in range(num_classes) if int(counts[c]) == 0]
    if empty:
        raise ValueError(
            f"class(es) {', '.join(map(str, empty))} have no training images; every output "
            "class needs at least one"
        )
    return labels


def class_averages(images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The average image of each class: ``(N, C, H, W)``, ``(N,)`` → ``(K, C, H, W)``."""
    labels = _check_labels(images, labels, num_classes)
    flat = images.flatten(1)
    sums = torch.zeros(num_classes, flat.shape[1], dtype=flat.dtype, device=flat.device)
    sums.index_add_(0, labels, flat)
    counts = torch.bincount(labels, minlength=num_classes).to(flat.dtype)
    return (sums / counts[:, None]).reshape(num_classes, *images.shape[1:])


def _model_device(model: nn.Module, default: torch.device) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return default


def _model_scores(model: nn.Module, images: Tensor) -> Tensor:
    """``model(images)`` in eval mode, batched, without gradients; on ``images.device``."""
    device = _model_device(model, images.device)
    outputs = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, images.shape[0], _SCORE_BATCH):
            batch = images[start : start + _SCORE_BATCH]
            outputs.append(model(batch.to(device)).to(images.device))
    scores = torch.cat(outputs)
    if scores.ndim != 2:
        raise ValueError(f"the model must output (N, K) scores, got {tuple(scores.shape)}")
    return scores


def start_images(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    targets: Tensor,
    method: StartMethod,
    *,
    fraction: float = 0.25,
) -> Tensor:
    """The starting image of each class.

    Args:
        model: the classifier; used only to compute ``scores`` when they are None.
        images: ``(N, C, H, W)`` training images (model inputs).
        labels: ``(N,)`` their classes in ``0..K-1``.
        scores: ``(N, K)`` the model's outputs on ``images`` (None: computed here).
        targets: ``(K, K)`` from :func:`output_targets`.
        method: ``avg`` the class average; ``min`` the class's training image whose output is
            closest (MSE) to the class target; ``avg_min`` the average of the ``fraction`` of
            the class's images closest to the target (at least one image).
        fraction: for ``avg_min``, in (0, 1].

    Returns:
        ``(K, C, H, W)`` on ``images.device``.
    """
    method = StartMethod(method)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if targets.ndim != 2 or targets.shape[0] != targets.shape[1]:
        raise ValueError(f"targets must be (K, K), got {tuple(targets.shape)}")
    num_classes = int(targets.shape[0])
    labels = _check_labels(images, labels, num_classes)
    if method is StartMethod.AVG:
        return class_averages(images, labels, num_classes)
    if scores is None:
        scores = _model_scores(model, images)
    if scores.shape != (images.shape[0], num_classes):
        raise ValueError(
            f"scores must be (N, K) = ({images.shape[0]}, {num_classes}), got {tuple(scores.shape)}"
        )
    scores = scores.to(images.device)
    targets = targets.to(device=images.device, dtype=scores.dtype)
    # Each image is compared with its own class's target only.
    errors = ((scores - targets[labels]) ** 2).mean(dim=1)
    starts = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        order = errors[members].argsort(stable=True)
        keep = 1 if method is StartMethod.MIN else max(1, int(members.numel() * fraction))
        starts.append(images[members[order[:keep]]].mean(dim=0))
    return torch.stack(starts)


# --------------------------------------------------------------------------------------------
# Input optimization
# --------------------------------------------------------------------------------------------


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters ``requires_grad_(False)`` inside, each one's flag restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_targets(x: Tensor, targets: Tensor) -> None:
    if targets.ndim != 2 or targets.shape[0] != x.shape[0]:
        raise ValueError(
            f"targets must be (K, outputs) with K = {x.shape[0]} images, got {tuple(targets.shape)}"
        )


def refine(
    model: nn.Module,
    x0: Tensor,
    targets: Tensor,
    *,
    steps: int | None = None,
    lr: float | None = None,
    optimizer: Optimizer | None = None,
    recipe: RefineRecipe | str = RefineRecipe.DEEPSCOPE,
    clamp: tuple[float, float] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Tensor, list[float]]:
    """Minimize ``MSE(model(x), target)`` over the inputs ``x``, all classes in one batch.

    Each class's loss is its own mean squared error over the outputs; their sum is minimized, so
    every image gets the gradient it would get alone (as the authors' per-class loop does). The
    model runs in eval mode with frozen parameters; its modes and ``requires_grad`` flags are
    restored afterwards, also on error.

    Args:
        model: the classifier.
        x0: ``(K, C, H, W)`` starting images.
        targets: ``(K, outputs)`` the target output of each image.
        steps: optimizer steps (> 0); None: the recipe's.
        lr: learning rate (> 0); None: the recipe's.
        optimizer: ``adam`` or ``sgd`` (no momentum); None: the recipe's.
        recipe: the defaults (:data:`RECIPES`): ``deepscope`` Adam, lr 0.01, 200 steps;
            ``paper`` SGD, lr 1e-4, 100 steps.
        clamp: ``(low, high)`` bounds for the pixels (model-input units) after every step.
        progress: called after each step with (fraction done, loss before the step).

    Returns:
        ``(K, C, H, W)`` refined images (detached, ``x0``'s device and dtype) and the loss
        history: the mean target MSE over classes before each step (``steps`` values).
    """
    settings = RECIPES[_recipe(recipe)]
    steps = settings.steps if steps is None else steps
    lr = settings.lr if lr is None else lr
    optimizer = settings.optimizer if optimizer is None else optimizer
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers are: adam, sgd")
    if clamp is not None and not clamp[0] < clamp[1]:
        raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")
    _check_targets(x0, targets)
    x = x0.detach().clone().requires_grad_(True)
    target = targets.detach().to(device=x.device, dtype=x.dtype)
    opt: torch.optim.Optimizer = (
        torch.optim.Adam([x], lr=lr) if optimizer == "adam" else torch.optim.SGD([x], lr=lr)
    )
    history: list[float] = []
    with eval_mode(model), _frozen(model), torch.enable_grad():
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            if out.shape != target.shape:
                raise ValueError(
                    f"the model outputs {tuple(out.shape)} but targets are {tuple(target.shape)}"
                )
            per_class = ((out - target) ** 2).mean(dim=1)
            per_class.sum().backward()
            opt.step()
            if clamp is not None:
                with torch.no_grad():
                    x.clamp_(clamp[0], clamp[1])
            loss = float(per_class.detach().mean())
            history.append(loss)
            if progress is not None:
                progress((step + 1) / steps, loss)
    return x.detach(), history


# --------------------------------------------------------------------------------------------
# The whole analysis
# --------------------------------------------------------------------------------------------

PINV = "pinv"
PINV_BOX = "pinv_box"
#: The methods that need an invertible network (:func:`invertible_chain`).
EXACT_METHODS: tuple[str, ...] = (PINV, PINV_BOX)
_TRAINING = "+training"
VALID_METHODS: tuple[str, ...] = (
    *(m.value for m in StartMethod),
    *(m.value + _TRAINING for m in StartMethod),
    *EXACT_METHODS,
)
#: Pixels this far (fraction of the data range's width) outside it still count as inside:
#: float rounding of the normalization.
_RANGE_SLACK = 1e-6


@dataclass
class InverseImagesResult:
    """The ideal input of each class, by method.

    Attributes:
        targets: ``(K, K)`` the target outputs (row = class).
        images: method → ``(K, C, H, W)`` model inputs.
        metrics: one dict per (method, class), methods in the requested order. Every dict has:

            * ``class``, ``method``;
            * ``predicted_class``: the argmax of the model's output on the image;
            * ``target_mse``: ``mean_j (f(x)_j − t_j)²``, the model run as given (its dtype);
            * ``output_error``: ``‖f(x) − t‖ / ‖t‖``, the same evaluation (relative);
            * ``distance_from_average``: ``‖x − class avg‖ / ‖class avg‖`` (model inputs);
            * ``pixel_min``, ``pixel_max``: the image's extremes in pixel units (normalization
              undone);
            * ``in_data_range``: every pixel within ``data_range`` (to 1e-6 of its width);
            * ``reachable``: for ``pinv`` / ``pinv_box`` an :class:`InverseStatus` value:
              ``"reached"`` (an input, in the data range for ``pinv_box``, reproduces the target
              to the tolerance, judged in float64 before rounding to the model's dtype),
              ``"not_found"`` (the search failed: nothing is claimed) or ``"unreachable"``
              (proved); None for the other methods;
            * ``solver``: ``pinv``: ``"layerwise"`` or ``"gauss_newton"``; ``pinv_box``:
              ``"projected_lm"``; None for the other methods.

        losses: method → loss history of each ``+training`` method.
        exact: the exact inverse's details (``pinv`` or ``pinv_box`` requested), else None.
        box: the box search's details (``pinv_box`` requested), else None.
    """

    targets: Tensor
    images: dict[str, Tensor]
    metrics: list[dict[str, object]]
    losses: dict[str, list[float]] = field(default_factory=dict)
    exact: ExactInverseResult | None = None
    box: BoxInverseResult | None = None


def _parse_methods(methods: Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in VALID_METHODS]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(map(repr, unknown))}; "
            f"valid methods are: {', '.join(VALID_METHODS)}"
        )
    if not methods:
        raise ValueError(f"no methods given; valid methods are: {', '.join(VALID_METHODS)}")
    return list(dict.fromkeys(methods))


class MeanStd(Protocol):
    """Anything with per-channel ``mean`` and ``std`` (e.g. a ``ChannelNormalization``)."""

    @property
    def mean(self) -> Sequence[float]: ...

    @property
    def std(self) -> Sequence[float]: ...


#: How pixels became model inputs, ``x = (pixel − mean) / std``: an object with ``mean`` and
#: ``std``, or a ``(mean, std)`` pair; one value per channel, or one for all.
Normalization = MeanStd | tuple[Sequence[float], Sequence[float]]


def _pixel_affine(
    normalization: Normalization | None, channels: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` float64 ``(C, 1, 1)``: pixels = model input · std + mean."""
    if normalization is None:
        mean, std = [0.0], [1.0]
    elif isinstance(normalization, tuple):
        mean, std = [float(v) for v in normalization[0]], [float(v) for v in normalization[1]]
    else:
        mean, std = [float(v) for v in normalization.mean], [float(v) for v in normalization.std]
    if len(mean) != len(std) or len(mean) not in (1, channels):
        raise ValueError(
            f"normalization needs 1 or {channels} means and as many stds, "
            f"got {len(mean)} and {len(std)}"
        )
    if any(not math.isfinite(v) for v in (*mean, *std)) or any(v == 0 for v in std):
        raise ValueError(f"normalization must be finite with non-zero stds, got {normalization}")
    shape = (len(mean), 1, 1)
    return (
        torch.tensor(mean, dtype=torch.float64, device=device).reshape(shape),
        torch.tensor(std, dtype=torch.float64, device=device).reshape(shape),
    )


def _input_box(
    normalization: Normalization | None,
    data_range: tuple[float, float],
    channels: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The data range in model-input units: ``(low, high)``, each float64 ``(C, 1, 1)``."""
    mean, std = _pixel_affine(normalization, channels, device)
    a, b = (data_range[0] - mean) / std, (data_range[1] - mean) / std
    # A negative std flips the interval.
    return torch.minimum(a, b), torch.maximum(a, b)


def inverse_images(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    methods: Sequence[str] = (
        "avg",
        "min",
        "avg_min",
        "avg+training",
        "min+training",
        "avg_min+training",
        "pinv",
        "pinv_box",
    ),
    target_mode: TargetMode | str = TargetMode.MINMAX,
    recipe: RefineRecipe | str = RefineRecipe.DEEPSCOPE,
    steps: int | None = None,
    lr: float | None = None,
    optimizer: Optimizer | None = None,
    clamp: tuple[float, float] | None = None,
    progress: ProgressFn | None = None,
    fraction: float = 0.25,
    normalization: Normalization | None = None,
    data_range: tuple[float, float] = (0.0, 1.0),
    tolerance: float = REACH_TOLERANCE,
    pinv_iterations: int = 1000,
    box_iterations: int = 200,
) -> InverseImagesResult:
    """The paper's ideal input images of every class.

    Scores the training images (batched, no gradients), sets the targets
    (:func:`output_targets`), then for each method: a start image (``avg``, ``min``,
    ``avg_min``), a start refined by input optimization (``X+training``), the exact inverse
    (``pinv``) or the nearest reachable output within the data range (``pinv_box``); the last
    two need an invertible network (Linear + invertible activations) and start from the class
    averages.

    Args:
        model: the classifier; computation runs on its device.
        images: ``(N, C, H, W)`` training images (model inputs); labels ``(N,)`` in ``0..K-1``.
        methods: any of :data:`VALID_METHODS`.
        target_mode: see :func:`output_targets` (``minmax``, ``percentile``, ``paper``,
            ``paper_percentile``).
        recipe: the ``+training`` defaults (:data:`RECIPES`): ``deepscope`` Adam, lr 0.01, 200
            steps; ``paper`` SGD, lr 1e-4, 100 steps. ``steps``, ``lr``, ``optimizer`` override
            the recipe's when given.
        clamp: see :func:`refine` (model-input units).
        progress: called with (fraction done over all methods, current loss).
        fraction: the share of closest images ``avg_min`` averages.
        normalization: how pixels became model inputs, ``x = (pixel − mean) / std``: an object
            with per-channel ``mean`` and ``std`` (e.g. the loaded model's
            ``ChannelNormalization``) or a ``(mean, std)`` pair; None: the model takes pixels.
        data_range: the pixel range of the data, ``(low, high)``: the box of ``pinv_box`` and
            the ``in_data_range`` metric.
        tolerance: relative output error at which ``pinv`` / ``pinv_box`` count as reached.
        pinv_iterations: search steps per class of ``pinv`` (:func:`exact_inverse`).
        box_iterations: search steps per class and start of ``pinv_box`` (:func:`box_inverse`).

    Returns:
        targets, images per method (on the model's device) and metrics per (method, class).
    """
    wanted = _parse_methods(methods)
    target_mode = TargetMode(target_mode)
    settings = RECIPES[_recipe(recipe)]
    steps = settings.steps if steps is None else steps
    lr = settings.lr if lr is None else lr
    optimizer = settings.optimizer if optimizer is None else optimizer
    if steps <= 0 and any(m.endswith(_TRAINING) for m in wanted):
        raise ValueError(f"steps must be positive, got {steps}")
    if not data_range[0] < data_range[1]:
        raise ValueError(f"data_range must be (low, high) with low < high, got {data_range}")
    exact_wanted = [m for m in wanted if m in EXACT_METHODS]
    chain = invertible_chain(model) if exact_wanted else None
    if exact_wanted and chain is None:
        raise ValueError(
            f"method {exact_wanted[0]!r} needs an invertible network (Linear + invertible "
            f"activations); this model has {why_not_invertible(model)}"
        )
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")

    scores = _model_scores(model, images)
    num_classes = int(scores.shape[1])
    labels = _check_labels(images, labels, num_classes)
    targets = output_targets(scores, target_mode)
    device = _model_device(model, images.device)
    averages = class_averages(images, labels, num_classes).to(device)
    input_shape = tuple(images.shape[1:])
    box_low, box_high = _input_box(normalization, data_range, input_shape[0], device)

    units = {m: steps if m.endswith(_TRAINING) else 1 for m in wanted}
    total, done = sum(units.values()), 0

    def report(units_done: int, loss: float) -> None:
        if progress is not None:
            progress(min(1.0, units_done / total), loss)

    starts: dict[StartMethod, Tensor] = {}
    results: dict[str, Tensor] = {}
    losses: dict[str, list[float]] = {}
    status: dict[str, list[InverseStatus]] = {}
    solvers: dict[str, list[str]] = {}
    exact: ExactInverseResult | None = None
    box: BoxInverseResult | None = None
    for method in wanted:
        if method in EXACT_METHODS:
            assert chain is not None
            if exact is None:
                exact = exact_inverse(
                    chain,
                    targets.to(device),
                    averages,
                    input_shape,
                    names=chain_names(model),
                    tolerance=tolerance,
                    max_iterations=pinv_iterations,
                )
            if method == PINV:
                results[method] = exact.images
                status[method], solvers[method] = exact.status, exact.solver
            else:
                box = box_inverse(
                    chain,
                    targets.to(device),
                    [averages, exact.images64],
                    input_shape,
                    box_low,
                    box_high,
                    tolerance=tolerance,
                    max_iterations=box_iterations,
                    unreachable=[s is InverseStatus.UNREACHABLE for s in exact.status],
                )
                results[method] = box.images.to(averages.dtype)
                status[method] = box.status
                solvers[method] = ["projected_lm"] * num_classes
        else:
            start = StartMethod(method.removesuffix(_TRAINING))
            if start not in starts:
                starts[start] = start_images(
                    model, images, labels, scores, targets, start, fraction=fraction
                ).to(device)
            if method.endswith(_TRAINING):
                base = done

                def step_progress(frac: float, loss: float, base: int = base) -> None:
                    report(base + round(frac * steps), loss)

                refined, history = refine(
                    model,
                    starts[start],
                    targets.to(device),
                    steps=steps,
                    lr=lr,
                    optimizer=optimizer,
                    clamp=clamp,
                    progress=step_progress if progress is not None else None,
                )
                results[method], losses[method] = refined, history
            else:
                results[method] = starts[start]
        done += units[method]
        if not method.endswith(_TRAINING):
            out = _model_scores(model, results[method])
            report(done, float(((out - targets.to(out)) ** 2).mean()))

    metrics = _metrics(
        model,
        targets.to(device),
        averages,
        results,
        status,
        solvers,
        _pixel_affine(normalization, input_shape[0], device),
        data_range,
    )
    return InverseImagesResult(
        targets=targets, images=results, metrics=metrics, losses=losses, exact=exact, box=box
    )


def _metrics(
    model: nn.Module,
    targets: Tensor,
    averages: Tensor,
    results: dict[str, Tensor],
    status: dict[str, list[InverseStatus]],
    solvers: dict[str, list[str]],
    pixel: tuple[Tensor, Tensor],
    data_range: tuple[float, float],
) -> list[dict[str, object]]:
    avg_norm = torch.linalg.vector_norm(averages.flatten(1), dim=1)
    mean, std = pixel
    slack = _RANGE_SLACK * (data_range[1] - data_range[0])
    metrics: list[dict[str, object]] = []
    for method, found in results.items():
        out = _model_scores(model, found)
        target = targets.to(out)
        mse = ((out - target) ** 2).mean(dim=1)
        miss = torch.linalg.vector_norm(out - target, dim=1)
        t_norm = torch.linalg.vector_norm(target, dim=1)
        relative = torch.where(t_norm > 0, miss / t_norm.clamp(min=1e-30), miss)
        predicted = out.argmax(dim=1)
        distance = torch.linalg.vector_norm(
            (found - averages.to(found)).flatten(1), dim=1
        ) / avg_norm.clamp(min=1e-12)
        pixels = (found.to(torch.float64) * std + mean).flatten(1)
        low, high = pixels.min(dim=1).values, pixels.max(dim=1).values
        for c in range(found.shape[0]):
            metrics.append(
                {
                    "class": c,
                    "method": method,
                    "predicted_class": int(predicted[c]),
                    "target_mse": float(mse[c]),
                    "output_error": float(relative[c]),
                    "distance_from_average": float(distance[c]),
                    "pixel_min": float(low[c]),
                    "pixel_max": float(high[c]),
                    "in_data_range": bool(
                        float(low[c]) >= data_range[0] - slack
                        and float(high[c]) <= data_range[1] + slack
                    ),
                    "reachable": status[method][c].value if method in status else None,
                    "solver": solvers[method][c] if method in solvers else None,
                }
            )
    return metrics
