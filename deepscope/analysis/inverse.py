"""Inverse maps: the ideal input image of each class (Pattichis & Pattichis 2024).

The paper asks which input drives a classifier to a prescribed output. The target output of
class ``c`` comes from the training-set range of output unit ``c``: its minimum everywhere and its
maximum at entry ``c`` (or the 25th / 75th percentiles). An input reaching that target is found
in two ways:

* **input optimization** ("+training"): start from a training-set image (the class average, the
  class image whose output is closest to the target, or the average of the closest 25%) and
  minimize ``MSE(model(x), target)`` over ``x``, all classes in one batch;
* **the exact inverse** (``pinv``) of an invertible network (Linear layers and elementwise
  invertible activations such as SELU): invert layer by layer from the output back, choosing at
  every Linear layer the solution closest to the class average's activation there (the
  minimum-change solution ``x = a + W⁺(y − b − W a)``). Targets a layer cannot reach (outside
  its range, or outside an activation's range) are reported as unreachable, never hidden.

All images here are model inputs (already normalized), shape ``(N, C, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import torch
from torch import Tensor, nn

from deepscope.analysis.hooks import eval_mode

__all__ = [
    "VALID_METHODS",
    "ExactInverseResult",
    "InverseImagesResult",
    "StartMethod",
    "TargetMode",
    "class_averages",
    "exact_inverse",
    "inverse_images",
    "invertible_chain",
    "output_targets",
    "refine",
    "start_images",
]

ProgressFn = Callable[[float, float], None]

#: A layer residual at or above this (relative) means the target is outside the layer's range.
REACHABLE_TOLERANCE = 1e-6
#: Targets within this fraction of an activation's range of its boundary are moved this far
#: inside; targets beyond the boundary by more are reported as clipped.
_RANGE_MARGIN = 1e-6
_SCORE_BATCH = 1024


class TargetMode(StrEnum):
    """How the target output is read off the training-set scores of each output unit."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"


class StartMethod(StrEnum):
    """The starting image of each class."""

    AVG = "avg"
    MIN = "min"
    AVG_MIN = "avg_min"


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


def output_targets(scores: Tensor, mode: TargetMode = TargetMode.MINMAX) -> Tensor:
    """The target output of every class, from the model's outputs on the training set.

    From the training-set score range of each output unit (DESIGN.md): row ``c`` holds every
    unit ``j`` at its own low value (training-set minimum, or 25th percentile) and unit ``c`` at
    its high value (maximum, or 75th percentile). (The authors' code uses unit ``c``'s low value
    for every entry; per-unit lows keep each target inside every unit's observed range.)

    Args:
        scores: ``(N, K)`` the model's outputs on the N training images.
        mode: min/max or 25th/75th percentiles.

    Returns:
        ``(K, K)``; row ``c`` is the target output of class ``c``.
    """
    mode = TargetMode(mode)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (N, K) with N, K >= 1, got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores hold non-finite values (NaN or Inf)")
    if mode is TargetMode.MINMAX:
        low, high = scores.min(dim=0).values, scores.max(dim=0).values
    else:
        low, high = _quantile(scores, 0.25), _quantile(scores, 0.75)
    targets = low[None, :].expand(scores.shape[1], -1).clone()
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
    steps: int = 200,
    lr: float = 0.01,
    optimizer: Literal["adam", "sgd"] = "adam",
    clamp: tuple[float, float] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Tensor, list[float]]:
    """Minimize ``MSE(model(x), target)`` over the inputs ``x``, all classes in one batch.

    Each class's loss is its own mean squared error over the outputs; their sum is minimized, so
    every image gets the gradient it would get alone. The model runs in eval mode with frozen
    parameters; its modes and ``requires_grad`` flags are restored afterwards, also on error.

    Args:
        model: the classifier.
        x0: ``(K, C, H, W)`` starting images.
        targets: ``(K, outputs)`` the target output of each image.
        steps: optimizer steps (> 0).
        lr: learning rate (> 0).
        optimizer: ``adam`` or ``sgd``.
        clamp: ``(low, high)`` bounds for the pixels (model-input units) after every step.
        progress: called after each step with (fraction done, loss before the step).

    Returns:
        ``(K, C, H, W)`` refined images (detached, ``x0``'s device and dtype) and the loss
        history: the mean target MSE over classes before each step (``steps`` values).
    """
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
# The exact inverse of invertible networks
# --------------------------------------------------------------------------------------------

_ACTIVATIONS = (nn.SELU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _leaves(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The children of ``model``, nested ``nn.Sequential``s expanded, with qualified names."""
    for name, child in model.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, qualified + ".")
        else:
            yield qualified, child


def _invertible_step(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Flatten):
        # Flattening the batch dimension would mix the classes.
        return module.start_dim >= 1
    if isinstance(module, nn.LeakyReLU):
        # A negative slope folds the line; a zero slope (ReLU) loses the negative half.
        return module.negative_slope > 0
    if isinstance(module, nn.ELU):
        return module.alpha > 0
    return isinstance(module, _ACTIVATIONS)


def _why_not_invertible(model: nn.Module) -> str | None:
    """Why :func:`invertible_chain` refuses ``model``, or None when it accepts it."""
    if not isinstance(model, nn.Sequential):
        return f"no known layer order (a {type(model).__name__}, not an nn.Sequential)"
    leaves = list(_leaves(model))
    bad = [f"{type(m).__name__} at {name!r}" for name, m in leaves if not _invertible_step(m)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return f"non-invertible layers: {shown}"
    if not any(isinstance(m, nn.Linear) for _, m in leaves):
        return "no Linear layer"
    return None


def invertible_chain(model: nn.Module) -> list[nn.Module] | None:
    """The model's layers, in order, when it can be inverted exactly; else None.

    Accepted: an ``nn.Sequential`` (nested ones expanded) of Flatten, Linear and elementwise
    invertible activations (SELU, ELU with α > 0, LeakyReLU with slope > 0, Tanh, Sigmoid,
    Identity), with at least one Linear.
    """
    if _why_not_invertible(model) is not None:
        return None
    return [m for _, m in _leaves(model)]


def _chain_names(model: nn.Module) -> list[str]:
    return [name for name, _ in _leaves(model)]


@dataclass
class ExactInverseResult:
    """The layer-by-layer inverse of each class target.

    Attributes:
        images: ``(K, C, H, W)`` the inputs (anchors' dtype).
        layer_residuals: per Linear layer (name, ``(K,)``): ``‖W x + b − y‖ / ‖y − b‖`` of the
            least-squares solution at that layer; non-zero means the target is outside the
            layer's range there.
        reachable: ``(K,)`` bool: every layer residual < 1e-6 and nothing clipped.
        clipped: ``(K,)`` bool: some target entry lay outside an activation's range (beyond
            its boundary by more than 1e-6 of the range) and was moved just inside it.
        activation_clipped: per activation with a bounded range (name, ``(K,)`` int): how many
            entries were clipped there.
        output_residual: ``(K,)`` ``‖f(x) − t‖ / ‖t‖`` with the returned image in float64.
    """

    images: Tensor
    layer_residuals: list[tuple[str, Tensor]]
    reachable: Tensor
    clipped: Tensor
    activation_clipped: list[tuple[str, Tensor]] = field(default_factory=list)
    output_residual: Tensor | None = None


def _range_of(module: nn.Module) -> tuple[float | None, float | None]:
    """The open interval of an activation's outputs (None: unbounded)."""
    if isinstance(module, nn.SELU):
        # torch's SELU constants.
        return (-1.0507009873554804934193349852946 * 1.6732632423543772848170429916717, None)
    if isinstance(module, nn.ELU):
        return (-float(module.alpha), None)
    if isinstance(module, nn.Tanh):
        return (-1.0, 1.0)
    if isinstance(module, nn.Sigmoid):
        return (0.0, 1.0)
    return (None, None)


def _clip_into_range(module: nn.Module, y: Tensor) -> tuple[Tensor, Tensor]:
    """``y`` moved just inside the activation's open range, and the mask of reported entries.

    Entries within the margin of a boundary, or on it (a float32 SELU saturates at exactly
    −λα, so the model itself outputs the boundary), move inside silently: the output changes by
    at most the margin. Entries further out lie outside the range: clipped and reported.
    """
    low, high = _range_of(module)
    if low is None and high is None:
        return y, torch.zeros_like(y, dtype=torch.bool)
    width = (high if high is not None else 0.0) - (low if low is not None else 0.0)
    margin = _RANGE_MARGIN * abs(width)
    outside = torch.zeros_like(y, dtype=torch.bool)
    if low is not None:
        outside |= y < low - margin
        y = y.clamp(min=low + margin)
    if high is not None:
        outside |= y > high + margin
        y = y.clamp(max=high - margin)
    return y, outside


def _activation_inverse(module: nn.Module, y: Tensor) -> Tensor:
    """The preimage of ``y`` (inside the range) under an elementwise invertible activation."""
    if isinstance(module, nn.SELU | nn.ELU):
        if isinstance(module, nn.SELU):
            scale, alpha = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
        else:
            scale, alpha = 1.0, float(module.alpha)
        return torch.where(y > 0, y / scale, torch.log1p((y / (scale * alpha)).clamp(max=0)))
    if isinstance(module, nn.LeakyReLU):
        return torch.where(y >= 0, y, y / module.negative_slope)
    if isinstance(module, nn.Tanh):
        return torch.atanh(y)
    if isinstance(module, nn.Sigmoid):
        return torch.logit(y)
    return y


def _forward64(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach().to(x)
        return nn.functional.linear(x, module.weight.detach().to(x), bias)
    out: Tensor = module(x)
    return out


def _per_class_norm(t: Tensor) -> Tensor:
    norms: Tensor = torch.linalg.vector_norm(t.flatten(1), dim=1)
    return norms


def exact_inverse(
    chain: Sequence[nn.Module],
    targets: Tensor,
    anchors: Tensor,
    input_shape: tuple[int, ...],
    *,
    names: Sequence[str] | None = None,
) -> ExactInverseResult:
    """Invert ``chain`` layer by layer from the output back, closest to the anchors.

    An activation is inverted analytically (a target outside its range is clipped just inside
    and reported). A Linear layer ``y = W x + b`` is inverted by the minimum-change solution
    ``x = a + W⁺ (y − b − W a)``, where ``a`` is the anchor's activation at that layer's input:
    among all solutions (or least-squares solutions, when ``y`` is outside the range of ``W``)
    it is the one closest to ``a``, so ``x − a`` lies in the row space of ``W``. Computed in
    float64 with the pseudo-inverse.

    Args:
        chain: the layers from :func:`invertible_chain`.
        targets: ``(K, outputs)`` the target output of each class.
        anchors: ``(K, *input_shape)`` the class averages.
        input_shape: the model's input shape ``(C, H, W)``.
        names: a name per layer for the report (default: the layer indices).

    Returns:
        The images ``(K, *input_shape)`` in the anchors' dtype and device, with residuals.
    """
    if names is None:
        names = [str(i) for i in range(len(chain))]
    if len(names) != len(chain):
        raise ValueError(f"{len(names)} names for {len(chain)} layers")
    bad = [
        f"{type(m).__name__} at {n!r}"
        for n, m in zip(names, chain, strict=True)
        if not _invertible_step(m)
    ]
    if bad:
        raise ValueError(f"layers that cannot be inverted: {', '.join(bad)}")
    if tuple(anchors.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"anchors must be (K, {', '.join(map(str, input_shape))}), got {tuple(anchors.shape)}"
        )
    if targets.ndim != 2 or targets.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"targets must be (K, outputs) with K = {anchors.shape[0]} anchors, "
            f"got {tuple(targets.shape)}"
        )
    num = anchors.shape[0]
    device = anchors.device
    # The anchors' activation at each layer's input.
    inputs: list[Tensor] = []
    act = anchors.detach().to(torch.float64)
    with torch.no_grad():
        for module in chain:
            inputs.append(act)
            act = _forward64(module, act)
    if act.shape != targets.shape:
        raise ValueError(
            f"the network outputs {tuple(act.shape[1:])} per image but targets are "
            f"{tuple(targets.shape[1:])}"
        )

    y = targets.detach().to(device=device, dtype=torch.float64)
    residuals: list[tuple[str, Tensor]] = []
    activation_clipped: list[tuple[str, Tensor]] = []
    clipped = torch.zeros(num, dtype=torch.bool, device=device)
    unreachable = torch.zeros(num, dtype=torch.bool, device=device)
    with torch.no_grad():
        for index in reversed(range(len(chain))):
            module, name, anchor = chain[index], names[index], inputs[index]
            if isinstance(module, nn.Linear):
                weight = module.weight.detach().to(device=device, dtype=torch.float64)
                bias = (
                    torch.zeros(weight.shape[0], dtype=torch.float64, device=device)
                    if module.bias is None
                    else module.bias.detach().to(device=device, dtype=torch.float64)
                )
                wanted = y - bias
                # Rows are the vectors the Linear acts on (its input's last dimension).
                change = (wanted - anchor @ weight.T) @ torch.linalg.pinv(weight).T
                x = anchor + change
                miss = _per_class_norm(x @ weight.T - wanted)
                scale = _per_class_norm(wanted)
                relative = torch.where(scale > 0, miss / scale.clamp(min=1e-300), miss)
                residuals.append((name, relative))
                unreachable |= relative >= REACHABLE_TOLERANCE
                y = x
            elif isinstance(module, nn.Flatten):
                y = y.reshape(anchor.shape)
            else:
                y, mask = _clip_into_range(module, y)
                if _range_of(module) != (None, None):
                    counts = mask.reshape(num, -1).sum(dim=1)
                    activation_clipped.append((name, counts))
                    clipped |= counts > 0
                y = _activation_inverse(module, y)
        # Forward check of the float64 image, before the cast to the anchors' dtype.
        out = y
        for module in chain:
            out = _forward64(module, out)
        t64 = targets.detach().to(device=device, dtype=torch.float64)
        t_norm = _per_class_norm(t64)
        miss = _per_class_norm(out - t64)
        output_residual = torch.where(t_norm > 0, miss / t_norm.clamp(min=1e-300), miss)
    residuals.reverse()
    activation_clipped.reverse()
    return ExactInverseResult(
        images=y.reshape(num, *input_shape).to(anchors.dtype),
        layer_residuals=residuals,
        reachable=~(unreachable | clipped),
        clipped=clipped,
        activation_clipped=activation_clipped,
        output_residual=output_residual,
    )


# --------------------------------------------------------------------------------------------
# The whole analysis
# --------------------------------------------------------------------------------------------

PINV = "pinv"
_TRAINING = "+training"
VALID_METHODS: tuple[str, ...] = (
    *(m.value for m in StartMethod),
    *(m.value + _TRAINING for m in StartMethod),
    PINV,
)


@dataclass
class InverseImagesResult:
    """The ideal input of each class, by method.

    Attributes:
        targets: ``(K, K)`` the target outputs (row = class).
        images: method → ``(K, C, H, W)``.
        metrics: one dict per (method, class), methods in the requested order:
            ``{class, method, predicted_class, target_mse, distance_from_average, reachable}``
            (``distance_from_average`` = ``‖x − class avg‖ / ‖class avg‖``; ``reachable`` is a
            bool for ``pinv`` and None for the other methods).
        losses: method → loss history of each "+training" method.
    """

    targets: Tensor
    images: dict[str, Tensor]
    metrics: list[dict[str, object]]
    losses: dict[str, list[float]] = field(default_factory=dict)


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
    ),
    target_mode: TargetMode = TargetMode.MINMAX,
    steps: int = 200,
    lr: float = 0.01,
    optimizer: Literal["adam", "sgd"] = "adam",
    clamp: tuple[float, float] | None = None,
    progress: ProgressFn | None = None,
    fraction: float = 0.25,
) -> InverseImagesResult:
    """The paper's ideal input images of every class.

    Scores the training images (batched, no gradients), sets the targets
    (:func:`output_targets`), then for each method: a start image (``avg``, ``min``,
    ``avg_min``), a start refined by input optimization (``X+training``), or the exact inverse
    (``pinv``, invertible networks only, anchored at the class averages).

    Args:
        model: the classifier; computation runs on its device.
        images: ``(N, C, H, W)`` training images (model inputs); labels ``(N,)`` in ``0..K-1``.
        methods: any of ``avg, min, avg_min, avg+training, min+training, avg_min+training,
            pinv``.
        target_mode, steps, lr, optimizer, clamp: see :func:`output_targets` and :func:`refine`.
        progress: called with (fraction done over all methods, current loss).
        fraction: the share of closest images ``avg_min`` averages.

    Returns:
        targets, images per method (on the model's device) and metrics per (method, class).
    """
    wanted = _parse_methods(methods)
    target_mode = TargetMode(target_mode)
    if steps <= 0 and any(m.endswith(_TRAINING) for m in wanted):
        raise ValueError(f"steps must be positive, got {steps}")
    chain = invertible_chain(model) if PINV in wanted else None
    if PINV in wanted and chain is None:
        raise ValueError(
            "method 'pinv' needs an invertible network (Linear + invertible activations); "
            f"this model has {_why_not_invertible(model)}"
        )
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")

    scores = _model_scores(model, images)
    num_classes = int(scores.shape[1])
    labels = _check_labels(images, labels, num_classes)
    targets = output_targets(scores, target_mode)
    device = _model_device(model, images.device)
    averages = class_averages(images, labels, num_classes)

    units = {m: steps if m.endswith(_TRAINING) else 1 for m in wanted}
    total, done = sum(units.values()), 0

    def report(units_done: int, loss: float) -> None:
        if progress is not None:
            progress(min(1.0, units_done / total), loss)

    starts: dict[StartMethod, Tensor] = {}
    results: dict[str, Tensor] = {}
    losses: dict[str, list[float]] = {}
    reachable: dict[int, bool] | None = None
    for method in wanted:
        if method == PINV:
            assert chain is not None
            inverse = exact_inverse(
                chain,
                targets.to(device),
                averages.to(device),
                tuple(images.shape[1:]),
                names=_chain_names(model),
            )
            results[method] = inverse.images
            reachable = {c: bool(inverse.reachable[c]) for c in range(num_classes)}
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

    metrics = _metrics(model, targets.to(device), averages.to(device), results, reachable)
    return InverseImagesResult(targets=targets, images=results, metrics=metrics, losses=losses)


def _metrics(
    model: nn.Module,
    targets: Tensor,
    averages: Tensor,
    results: dict[str, Tensor],
    reachable: dict[int, bool] | None,
) -> list[dict[str, object]]:
    avg_norm = _per_class_norm(averages)
    metrics: list[dict[str, object]] = []
    for method, found in results.items():
        out = _model_scores(model, found)
        mse = ((out - targets.to(out)) ** 2).mean(dim=1)
        predicted = out.argmax(dim=1)
        distance = _per_class_norm(found - averages.to(found)) / avg_norm.clamp(min=1e-12)
        for c in range(found.shape[0]):
            metrics.append(
                {
                    "class": c,
                    "method": method,
                    "predicted_class": int(predicted[c]),
                    "target_mse": float(mse[c]),
                    "distance_from_average": float(distance[c]),
                    "reachable": (
                        reachable[c] if method == PINV and reachable is not None else None
                    ),
                }
            )
    return metrics
