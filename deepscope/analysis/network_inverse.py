"""The exact inverse of invertible networks, and the nearest reachable output in the data box.

An *invertible network* here is an ``nn.Sequential`` of Flatten, Linear and elementwise
bijective activations (SELU, ELU with α > 0, LeakyReLU with slope > 0, Tanh, Sigmoid, Identity).
For such a network ``f`` and a target output ``t`` the pre-image ``{x : f(x) = t}`` is described
layer by layer: each activation has exactly one pre-image (when ``t`` lies in its range) and each
Linear layer an affine set of them, so "exact inverse" has a definite meaning, and a target can
be proved unreachable. Layers that discard information are refused (ReLU sends every negative
input to 0, MaxPool keeps one value per window): their pre-images are not determined by their
outputs, and where a ReLU is off its Jacobian is zero, so neither the layer-by-layer inverse
nor the search below can work through them. A whole-network search could still run on any
differentiable model, but it would then be input optimization, which ``+training`` already is.

Three solvers, all in float64:

* :func:`layerwise_inverse`: invert from the output back, one layer at a time, choosing at every
  Linear layer the solution closest to the anchor's (class average's) activation there. Exact
  and cheap, and for a single Linear layer followed by activations (the paper's ``fcnn1``) the
  input closest to the anchor. For deeper networks the minimum-change choice at one layer can ask
  the activation below it for an output outside its range (a SELU output ≤ −λα), even when other
  pre-images at that layer are fine: then it fails although the target is reachable.
* :func:`exact_inverse`: the layer-by-layer solution where it reproduces the target; elsewhere a
  Levenberg–Marquardt (damped Gauss–Newton) search over the input of the whole network, started
  at the anchor and following the path of targets from the anchor's output when plain
  Gauss–Newton stalls. Searching over the input never leaves any activation's range, so it finds
  the pre-images the layer-by-layer construction misses. Every class gets a status
  (:class:`InverseStatus`): ``reached``, ``not_found`` (the search failed; nothing is claimed
  about existence) or ``unreachable`` (proved: e.g. a target entry outside the final
  activation's range, or outside the affine range of the last Linear layer).
* :func:`box_inverse`: the same search restricted to a box of inputs (the data range, e.g.
  pixels in [0, 1]): projected Levenberg–Marquardt from several starts, keeping the best. It
  returns a local minimizer of the output error inside the box (the nearest reachable output
  found there) and never increases the error of its best start.

Tensors: inputs ``(K, *input_shape)`` (K = number of classes/targets), targets ``(K, M)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor, nn

__all__ = [
    "REACH_TOLERANCE",
    "BoxInverseResult",
    "ExactInverseResult",
    "InverseStatus",
    "LayerwiseInverseResult",
    "box_inverse",
    "chain_names",
    "exact_inverse",
    "invertible_chain",
    "layerwise_inverse",
    "why_not_invertible",
]

#: A target counts as reached when ``‖f(x) − t‖ ≤ REACH_TOLERANCE · ‖t‖`` (float64 evaluation).
REACH_TOLERANCE = 1e-6
#: Target entries beyond an activation's range boundary by at most this fraction of the range's
#: scale are float rounding (a float32 SELU saturates at −λα, and float32's −λα differs from
#: float64's), not a request for an impossible output: they move just inside, unreported.
_BOUNDARY_MARGIN = 1e-6
#: How far inside the open range (fraction of its scale) boundary entries are moved: small enough
#: to change the output negligibly, large enough for a finite pre-image (SELU: log(1e-9) ≈ −21).
_INSIDE = 1e-9
#: The search stops once the relative output error is this small (float64 round-off level).
_SOLVE_TOLERANCE = 1e-13
#: ... or once an accepted step lowers the error by less than this fraction (a stationary point).
_MIN_GAIN = 1e-10
#: Levenberg–Marquardt damping, relative to the mean diagonal of ``J Jᵀ``: start, bounds, and the
#: factors applied after an accepted / rejected step.
_MU_START, _MU_MIN, _MU_MAX = 1e-3, 1e-15, 1e12
_MU_DOWN, _MU_UP = 4.0, 8.0
#: Jacobian entries per chunk of classes (float64): bounds the memory of ``(K, M, N)``.
_CHUNK_ELEMENTS = 1 << 24

# torch's SELU constants.
_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717


class InverseStatus(StrEnum):
    """Whether an input reaching a class's target was found.

    ``reached``: an input was found whose output equals the target to the tolerance
    (``‖f(x) − t‖ ≤ tol · ‖t‖``, evaluated in float64). ``not_found``: the search ended without
    reaching it; the target may or may not be reachable. ``unreachable``: proved unreachable (an
    entry outside the final activation's range, or outside the last Linear layer's range, or
    such a violation forced through injective Linear layers).
    """

    REACHED = "reached"
    NOT_FOUND = "not_found"
    UNREACHABLE = "unreachable"


# --------------------------------------------------------------------------------------------
# Which networks are invertible
# --------------------------------------------------------------------------------------------

_ACTIVATIONS = (nn.SELU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity)

#: Why common layers are refused (shown in the error message).
_REFUSED: dict[type[nn.Module], str] = {
    nn.ReLU: "maps every negative input to 0",
    nn.ReLU6: "clips its input to [0, 6]",
    nn.Hardtanh: "clips its input",
    nn.GELU: "is not monotone",
    nn.SiLU: "is not monotone",
    nn.MaxPool1d: "keeps one value per window",
    nn.MaxPool2d: "keeps one value per window",
    nn.AvgPool2d: "averages each window",
    nn.AdaptiveAvgPool2d: "averages each window",
    nn.Dropout: "is random in training mode (drop it for the inverse)",
    nn.BatchNorm1d: "depends on the mode and batch (fold it into the Linear layer)",
    nn.BatchNorm2d: "depends on the mode and batch",
    nn.Conv2d: "is a linear map this solver does not handle (only Linear layers are)",
}


def _leaves(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The children of ``model``, nested ``nn.Sequential``s expanded, with qualified names."""
    for name, child in model.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, qualified + ".")
        else:
            yield qualified, child


def _blocker(module: nn.Module) -> str | None:
    """Why ``module`` cannot be inverted exactly, or None when it can."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Flatten):
        # Flattening the batch dimension would mix the classes.
        return None if module.start_dim >= 1 else "flattens the batch dimension"
    if isinstance(module, nn.LeakyReLU):
        if module.negative_slope > 0:
            return None
        # A zero slope loses the negative half; a negative one folds the line.
        return "maps every negative input to 0" if module.negative_slope == 0 else "folds the line"
    if isinstance(module, nn.ELU):
        return None if module.alpha > 0 else "is not one-to-one with alpha <= 0"
    if isinstance(module, _ACTIVATIONS):
        return None
    for kind, reason in _REFUSED.items():
        if isinstance(module, kind):
            return reason
    return "is not a Linear layer or an elementwise invertible activation"


def why_not_invertible(model: nn.Module) -> str | None:
    """Why :func:`invertible_chain` refuses ``model`` (naming the blocking modules), or None."""
    if not isinstance(model, nn.Sequential):
        return f"no known layer order (a {type(model).__name__}, not an nn.Sequential)"
    leaves = list(_leaves(model))
    bad = [
        f"{type(m).__name__} at {name!r} ({reason})"
        for name, m in leaves
        if (reason := _blocker(m)) is not None
    ]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        return f"non-invertible layers: {shown}"
    if not any(isinstance(m, nn.Linear) for _, m in leaves):
        return "no Linear layer"
    return None


def invertible_chain(model: nn.Module) -> list[nn.Module] | None:
    """The model's layers, in order, when it can be inverted exactly; else None.

    Accepted: an ``nn.Sequential`` (nested ones expanded) of Flatten (not of the batch
    dimension), Linear and elementwise invertible activations (SELU, ELU with α > 0, LeakyReLU
    with slope > 0, Tanh, Sigmoid, Identity), with at least one Linear. :func:`why_not_invertible`
    says why a model is refused.
    """
    if why_not_invertible(model) is not None:
        return None
    return [m for _, m in _leaves(model)]


def chain_names(model: nn.Module) -> list[str]:
    """The qualified names of the layers :func:`invertible_chain` returns, in the same order."""
    return [name for name, _ in _leaves(model)]


def _check_chain(chain: Sequence[nn.Module], names: Sequence[str] | None) -> list[str]:
    if names is None:
        names = [str(i) for i in range(len(chain))]
    if len(names) != len(chain):
        raise ValueError(f"{len(names)} names for {len(chain)} layers")
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    bad = [
        f"{type(m).__name__} at {n!r} ({reason})"
        for n, m in zip(names, chain, strict=True)
        if (reason := _blocker(m)) is not None
    ]
    if bad:
        raise ValueError(f"layers that cannot be inverted: {'; '.join(bad)}")
    if not any(isinstance(m, nn.Linear) for m in chain):
        raise ValueError("the chain has no Linear layer")
    return list(names)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def _range_of(module: nn.Module) -> tuple[float | None, float | None]:
    """The open interval of an activation's outputs (None: unbounded)."""
    if isinstance(module, nn.SELU):
        return (-_SELU_SCALE * _SELU_ALPHA, None)
    if isinstance(module, nn.ELU):
        return (-float(module.alpha), None)
    if isinstance(module, nn.Tanh):
        return (-1.0, 1.0)
    if isinstance(module, nn.Sigmoid):
        return (0.0, 1.0)
    return (None, None)


def _into_range(module: nn.Module, y: Tensor) -> tuple[Tensor, Tensor]:
    """``y`` moved strictly inside the activation's open range, and the mask of entries that lay
    outside it by more than the rounding margin (requests for outputs it never produces)."""
    low, high = _range_of(module)
    if low is None and high is None:
        return y, torch.zeros_like(y, dtype=torch.bool)
    if low is not None and high is not None:
        scale = high - low
    else:
        scale = abs(low if low is not None else high or 0.0) or 1.0
    margin, inside = _BOUNDARY_MARGIN * scale, _INSIDE * scale
    outside = torch.zeros_like(y, dtype=torch.bool)
    if low is not None:
        outside |= y < low - margin
        y = y.clamp(min=low + inside)
    if high is not None:
        outside |= y > high + margin
        y = y.clamp(max=high - inside)
    return y, outside


def _activation_inverse(module: nn.Module, y: Tensor) -> Tensor:
    """The pre-image of ``y`` (inside the range) under an elementwise invertible activation."""
    if isinstance(module, nn.SELU | nn.ELU):
        if isinstance(module, nn.SELU):
            scale, alpha = _SELU_SCALE, _SELU_ALPHA
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


def _linear64(module: nn.Linear, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(W, b)`` of a Linear layer, detached, float64, on ``device`` (b = 0 without bias)."""
    weight = module.weight.detach().to(device=device, dtype=torch.float64)
    if module.bias is None:
        return weight, torch.zeros(weight.shape[0], dtype=torch.float64, device=device)
    return weight, module.bias.detach().to(device=device, dtype=torch.float64)


class _Float64Net:
    """The chain in float64 on one device, as a function of flattened inputs ``(K, N)``."""

    def __init__(
        self, chain: Sequence[nn.Module], input_shape: tuple[int, ...], device: torch.device
    ) -> None:
        self.input_shape = tuple(input_shape)
        self.layers: list[Callable[[Tensor], Tensor]] = []
        for module in chain:
            if isinstance(module, nn.Linear):
                weight, bias = _linear64(module, device)
                self.layers.append(
                    lambda x, w=weight, b=bias: nn.functional.linear(x, w, b)  # type: ignore[misc]
                )
            elif getattr(module, "inplace", False):
                # An in-place activation would overwrite its input, which the layer-by-layer
                # inverse keeps (the anchor's activations); run a copy that is not in place.
                functional = copy.copy(module)
                setattr(functional, "inplace", False)  # noqa: B010 (mypy: Module attrs are Tensors)
                self.layers.append(functional)
            else:
                # Flatten and the accepted activations have no parameters: any dtype works.
                self.layers.append(module)

    def __call__(self, x: Tensor) -> Tensor:
        """``(K, N)`` flattened inputs → ``(K, M)`` outputs."""
        out = x.reshape(x.shape[0], *self.input_shape)
        for layer in self.layers:
            out = layer(out)
        return out

    def jacobian(self, x: Tensor) -> Tensor:
        """``(K, N)`` → ``(K, M, N)``: the Jacobian of each class's output at its own input."""

        # Classes are independent (no layer mixes the batch), so the Jacobian of the outputs
        # summed over the batch holds every class's own Jacobian: M backward passes, not K·M.
        def summed(z: Tensor) -> Tensor:
            return self(z).sum(dim=0)

        with torch.enable_grad():
            jac: Tensor = torch.func.jacrev(summed)(x)  # (M, K, N)
        return jac.transpose(0, 1).detach()


def _relative(error: Tensor, targets: Tensor) -> Tensor:
    """``‖error_k‖ / ‖t_k‖`` per row (the absolute norm where ``t_k = 0``)."""
    miss = torch.linalg.vector_norm(error.flatten(1), dim=1)
    scale = torch.linalg.vector_norm(targets.flatten(1), dim=1)
    return torch.where(scale > 0, miss / scale.clamp(min=1e-300), miss)


# --------------------------------------------------------------------------------------------
# Layer by layer
# --------------------------------------------------------------------------------------------


@dataclass
class LayerwiseInverseResult:
    """The layer-by-layer inverse of each class target.

    Attributes:
        images: ``(K, *input_shape)`` the inputs (anchors' dtype).
        images64: the same in float64, before rounding to the anchors' dtype.
        layer_residuals: per Linear layer (name, ``(K,)``): ``‖W x + b − y‖ / ‖y − b‖`` of the
            least-squares solution at that layer; non-zero means the target asked of that layer
            is outside its range.
        exact: ``(K,)`` bool: the float64 image reproduces the target
            (``output_residual ≤ 1e-6``).
        clipped: ``(K,)`` bool: some target entry asked of an activation lay outside its range
            and was moved inside it.
        activation_clipped: per activation with a bounded range (name, ``(K,)`` int): how many
            entries were moved there.
        output_residual: ``(K,)`` ``‖f(x) − t‖ / ‖t‖`` of the float64 image.
    """

    images: Tensor
    images64: Tensor
    layer_residuals: list[tuple[str, Tensor]]
    exact: Tensor
    clipped: Tensor
    activation_clipped: list[tuple[str, Tensor]]
    output_residual: Tensor


def _check_inputs(targets: Tensor, anchors: Tensor, input_shape: tuple[int, ...]) -> None:
    if tuple(anchors.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"anchors must be (K, {', '.join(map(str, input_shape))}), got {tuple(anchors.shape)}"
        )
    if targets.ndim != 2 or targets.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"targets must be (K, outputs) with K = {anchors.shape[0]} anchors, "
            f"got {tuple(targets.shape)}"
        )
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("targets hold non-finite values (NaN or Inf)")


def layerwise_inverse(
    chain: Sequence[nn.Module],
    targets: Tensor,
    anchors: Tensor,
    input_shape: tuple[int, ...],
    *,
    names: Sequence[str] | None = None,
) -> LayerwiseInverseResult:
    """Invert ``chain`` layer by layer from the output back, closest to the anchors.

    An activation is inverted analytically (a target entry outside its range is moved just
    inside and reported). A Linear layer ``y = W x + b`` is inverted by the minimum-change
    solution ``x = a + W⁺ (y − b − W a)``, where ``a`` is the anchor's activation at that layer's
    input: among all solutions (or least-squares solutions, when ``y`` is outside the range of
    ``W``) it is the one closest to ``a``, so ``x − a`` lies in the row space of ``W``. Computed
    in float64 with the pseudo-inverse.

    With one Linear layer and activations after it only, the result is the input closest to the
    anchor among all that reach the target, and the target is reachable exactly when nothing is
    clipped and the layer residual is zero. With more Linear layers a failure here proves
    nothing: :func:`exact_inverse` then searches the whole network.

    Args:
        chain: the layers from :func:`invertible_chain`.
        targets: ``(K, M)`` the target output of each class.
        anchors: ``(K, *input_shape)`` the class averages.
        input_shape: the model's input shape, e.g. ``(C, H, W)``.
        names: a name per layer for the report (default: the layer indices).
    """
    names = _check_chain(chain, names)
    _check_inputs(targets, anchors, input_shape)
    num = anchors.shape[0]
    device = anchors.device
    net = _Float64Net(chain, input_shape, device)
    # The anchors' activation at each layer's input.
    inputs: list[Tensor] = []
    act = anchors.detach().to(torch.float64)
    with torch.no_grad():
        for layer in net.layers:
            inputs.append(act)
            act = layer(act)
    if act.shape != targets.shape:
        raise ValueError(
            f"the network outputs {tuple(act.shape[1:])} per image but targets are "
            f"{tuple(targets.shape[1:])}"
        )

    y = targets.detach().to(device=device, dtype=torch.float64)
    residuals: list[tuple[str, Tensor]] = []
    activation_clipped: list[tuple[str, Tensor]] = []
    clipped = torch.zeros(num, dtype=torch.bool, device=device)
    with torch.no_grad():
        for index in reversed(range(len(chain))):
            module, name, anchor = chain[index], names[index], inputs[index]
            if isinstance(module, nn.Linear):
                weight, bias = _linear64(module, device)
                wanted = y - bias
                # Rows are the vectors the Linear acts on (its input's last dimension).
                x = anchor + (wanted - anchor @ weight.T) @ torch.linalg.pinv(weight).T
                residuals.append((name, _relative(x @ weight.T - wanted, wanted)))
                y = x
            elif isinstance(module, nn.Flatten):
                y = y.reshape(anchor.shape)
            else:
                y, mask = _into_range(module, y)
                if _range_of(module) != (None, None):
                    counts = mask.reshape(num, -1).sum(dim=1)
                    activation_clipped.append((name, counts))
                    clipped |= counts > 0
                y = _activation_inverse(module, y)
        # Forward check of the float64 image, before the cast to the anchors' dtype.
        t64 = targets.detach().to(device=device, dtype=torch.float64)
        output_residual = _relative(net(y.reshape(num, -1)) - t64, t64)
    output_residual = torch.where(
        torch.isfinite(output_residual), output_residual, torch.full_like(output_residual, math.inf)
    )
    residuals.reverse()
    activation_clipped.reverse()
    return LayerwiseInverseResult(
        images=y.reshape(num, *input_shape).to(anchors.dtype),
        images64=y.reshape(num, *input_shape),
        layer_residuals=residuals,
        exact=output_residual <= REACH_TOLERANCE,
        clipped=clipped,
        activation_clipped=activation_clipped,
        output_residual=output_residual,
    )


#: A Linear layer counts as injective for proofs only when ``σ_min / σ_max`` exceeds this: the
#: forced pre-image of a worse-conditioned one is too inaccurate to prove anything with.
_INJECTIVE_RCOND = 1e-6


def _injective(module: nn.Linear) -> bool:
    """Whether ``x ↦ W x + b`` is one-to-one (full column rank), with a safe condition number."""
    if module.in_features > module.out_features:
        return False
    sv = torch.linalg.svdvals(module.weight.detach().to(torch.float64))
    return bool(sv[-1] > _INJECTIVE_RCOND * sv[0])


def _unreachable(
    chain: Sequence[nn.Module],
    names: Sequence[str],
    layerwise: LayerwiseInverseResult,
    tolerance: float,
) -> list[str | None]:
    """Per class, why the target is provably unreachable (None: no proof).

    Walking back from the output, the target asked of each layer is forced (the same for every
    input reaching the output target) as long as the layers after it are elementwise bijections
    or injective Linear layers. In that forced suffix an entry outside an activation's range, or
    a Linear layer's residual (the target's distance from its affine range), proves that no
    input reaches the target. The suffix ends at the first Linear layer that is not injective
    (its own residual still proves, its input is no longer forced); the layer-by-layer solution
    before it depends on the anchor's choices and proves nothing.
    """
    clipped = dict(layerwise.activation_clipped)
    residuals = dict(layerwise.layer_residuals)
    reasons: list[str | None] = [None] * int(layerwise.exact.shape[0])
    # From the output back, so that the first reason recorded is the root cause (the targets
    # asked of earlier layers were computed from already-clipped values).
    for index in reversed(range(len(chain))):
        module, name = chain[index], names[index]
        if name in clipped:
            counts = clipped[name]
            for k in (counts > 0).nonzero().flatten().tolist():
                many = int(counts[k]) > 1
                reasons[k] = reasons[k] or (
                    f"{int(counts[k])} target entr{'ies lie' if many else 'y lies'} outside the "
                    f"range of activation {name!r}, whose output every input reaching the "
                    "target would have to produce"
                )
        if isinstance(module, nn.Linear):
            residual = residuals[name]
            for k in (residual > tolerance).nonzero().flatten().tolist():
                reasons[k] = reasons[k] or (
                    f"the target asked of Linear layer {name!r} is outside its range "
                    f"(relative distance {float(residual[k]):.3g})"
                )
            if not _injective(module):
                break
    return reasons


# --------------------------------------------------------------------------------------------
# Levenberg–Marquardt over the input
# --------------------------------------------------------------------------------------------


def _levenberg_marquardt(
    net: _Float64Net,
    x0: Tensor,
    targets: Tensor,
    *,
    max_iterations: int | Tensor,
    stop_at: float | Tensor = _SOLVE_TOLERANCE,
    low: Tensor | None = None,
    high: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Minimize ``‖f(x) − t‖`` per row over ``x`` (projected onto ``[low, high]`` when given).

    Each trial step is the minimum-norm damped Gauss–Newton step ``δ = Jᵀ (J Jᵀ + λ I)⁻¹ r``
    (``r = t − f(x)``; an ``M × M`` solve, as M ≪ N): it lies in the row space of ``J``, so from
    the anchor the input changes only in directions that move the output. With bounds, inputs at
    a bound whose gradient pushes outward are frozen for the step and the trial is projected
    onto the box. A trial is kept only when it lowers the error, so the error never rises.

    Args:
        net: the float64 network.
        x0: ``(K, N)`` float64 starts (clamped into the box when bounded).
        targets: ``(K, M)`` float64.
        max_iterations: trial steps per row (each costs one forward pass; accepted ones also a
            Jacobian): one for all rows, or ``(K,)``.
        stop_at: a row stops once its relative error is this small: one for all, or ``(K,)``.
        low, high: ``(N,)`` float64 bounds, or None for an unconstrained search.

    Returns:
        ``x`` ``(K, N)``, the relative errors ``‖f(x) − t‖ / ‖t‖`` ``(K,)`` and the trial steps
        taken ``(K,)`` (int64).
    """
    bounded = low is not None and high is not None
    x = x0.clone()
    if bounded:
        assert low is not None and high is not None
        x = torch.maximum(torch.minimum(x, high), low)
    num = x.shape[0]
    device = x.device
    tnorm = torch.linalg.vector_norm(targets, dim=1)
    scale = torch.where(tnorm > 0, tnorm, torch.ones_like(tnorm))
    with torch.no_grad():
        r = targets - net(x)
    rnorm = torch.linalg.vector_norm(r, dim=1)
    rnorm = torch.where(torch.isfinite(rnorm), rnorm, torch.full_like(rnorm, math.inf))
    mu = torch.full((num,), _MU_START, dtype=torch.float64, device=device)
    budget = torch.as_tensor(max_iterations, dtype=torch.int64, device=device).expand(num)
    stop = torch.as_tensor(stop_at, dtype=torch.float64, device=device).expand(num)
    iterations = torch.zeros(num, dtype=torch.int64, device=device)
    active = (rnorm / scale > stop) & torch.isfinite(rnorm) & (budget > 0)
    jac = net.jacobian(x) if bool(active.any()) else None
    for _ in range(int(budget.max()) if num else 0):
        if jac is None or not bool(active.any()):
            break
        idx = active.nonzero().flatten()
        J, res, xa = jac[idx], r[idx], x[idx]
        if bounded:
            assert low is not None and high is not None
            grad = -(J.transpose(1, 2) @ res.unsqueeze(2)).squeeze(2)  # of ½‖r‖²
            frozen = ((xa <= low) & (grad > 0)) | ((xa >= high) & (grad < 0))
            J = J * (~frozen).unsqueeze(1)
        gram = J @ J.transpose(1, 2)
        level = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-300)
        eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=device)
        damped = gram + (mu[idx] * level)[:, None, None] * eye
        # A singular system (underflowing damping) just makes the trial fail: reject it.
        solved, info = torch.linalg.solve_ex(damped, res.unsqueeze(2))
        solved = torch.where((info == 0)[:, None, None], solved, math.nan)
        step = (J.transpose(1, 2) @ solved).squeeze(2)
        trial = xa + step
        if bounded:
            assert low is not None and high is not None
            trial = torch.maximum(torch.minimum(trial, high), low)
        with torch.no_grad():
            trial_r = targets[idx] - net(trial)
        trial_norm = torch.linalg.vector_norm(trial_r, dim=1)
        better = torch.isfinite(trial_norm) & (trial_norm < rnorm[idx])
        iterations[idx] += 1
        accepted, rejected = idx[better], idx[~better]
        gain = (rnorm[accepted] - trial_norm[better]) / rnorm[accepted]
        x[accepted], r[accepted], rnorm[accepted] = (
            trial[better],
            trial_r[better],
            trial_norm[better],
        )
        mu[accepted] = (mu[accepted] / _MU_DOWN).clamp(min=_MU_MIN)
        mu[rejected] = mu[rejected] * _MU_UP
        if accepted.numel():
            jac[accepted] = net.jacobian(x[accepted])
        done = torch.zeros(num, dtype=torch.bool, device=device)
        done[accepted] = gain < _MIN_GAIN
        done |= (rnorm / scale <= stop) | (mu > _MU_MAX) | (iterations >= budget)
        active &= ~done
    return x, rnorm / scale, iterations


#: Path following: LM steps per stage, the relative error at which an intermediate stage
#: counts as reached (the path is followed closely; only the last stage must meet the
#: caller's tolerance), and the smallest step along the path before giving up.
_STAGE_ITERATIONS = 60
_STAGE_TOLERANCE = 1e-8
_MIN_PATH_STEP = 2.0**-12


def _path_search(
    net: _Float64Net,
    x0: Tensor,
    targets: Tensor,
    *,
    max_iterations: int,
    tolerance: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Find ``x`` with ``f(x) = t`` per row: Levenberg–Marquardt along the path from ``f(x0)``.

    The stage targets are ``t_s = f(x0) + s (t − f(x0))``. The first stage jumps to ``s = 1``
    (plain LM from ``x0``). A stage that fails (LM stalls at a non-zero error, typically with
    many SELUs saturated, where the Jacobian has lost the directions it needs) is retried from
    the last point on the path with a quarter of the step; a stage that succeeds doubles it.
    Following the path keeps the input where the network is responsive, so targets that plain
    Gauss–Newton misses are reached; it is still a local method and can fail.

    Args:
        net: the float64 network.
        x0: ``(K, N)`` float64 starts.
        targets: ``(K, M)`` float64.
        max_iterations: LM steps per row over all stages.
        tolerance: the relative error at which the final target counts as reached.

    Returns:
        The input with the smallest error on the final target ``(K, N)``, that error ``(K,)``
        (relative) and the LM steps used ``(K,)`` (int64).
    """
    num, device = x0.shape[0], x0.device
    with torch.no_grad():
        base = net(x0)
    best = x0.clone()
    best_rel = _relative(base - targets, targets)
    on_path = x0.clone()
    s = torch.zeros(num, dtype=torch.float64, device=device)
    ds = torch.ones(num, dtype=torch.float64, device=device)
    used = torch.zeros(num, dtype=torch.int64, device=device)
    while True:
        open_ = (used < max_iterations) & (ds >= _MIN_PATH_STEP) & (best_rel > tolerance)
        if not bool(open_.any()):
            break
        idx = open_.nonzero().flatten()
        s_try = (s[idx] + ds[idx]).clamp(max=1.0)
        final = s_try >= 1.0
        stage = base[idx] + s_try[:, None] * (targets[idx] - base[idx])
        x, rel, steps = _levenberg_marquardt(
            net,
            on_path[idx],
            stage,
            max_iterations=(max_iterations - used[idx]).clamp(max=_STAGE_ITERATIONS),
            stop_at=torch.where(final, _SOLVE_TOLERANCE, _STAGE_TOLERANCE),
        )
        used[idx] += steps
        with torch.no_grad():
            final_rel = _relative(net(x) - targets[idx], targets[idx])
        improved = final_rel < best_rel[idx]
        best[idx[improved]], best_rel[idx[improved]] = x[improved], final_rel[improved]
        ok = rel <= torch.where(final, tolerance, _STAGE_TOLERANCE)
        on_path[idx[ok]], s[idx[ok]] = x[ok], s_try[ok]
        ds[idx[ok]] *= 2.0
        ds[idx[~ok]] /= 4.0
    return best, best_rel, used


def _chunks(num: int, outputs: int, inputs: int) -> Iterator[slice]:
    """Slices of the classes small enough for their ``(k, M, N)`` Jacobians."""
    size = max(1, _CHUNK_ELEMENTS // max(1, outputs * inputs))
    for start in range(0, num, size):
        yield slice(start, min(num, start + size))


# --------------------------------------------------------------------------------------------
# The exact inverse
# --------------------------------------------------------------------------------------------


@dataclass
class ExactInverseResult:
    """An input reaching each class target, when one was found.

    Attributes:
        images: ``(K, *input_shape)`` the inputs, in the anchors' dtype. For classes not reached
            the input with the smallest output error found.
        images64: the same in float64 (what ``status`` and ``output_residual`` describe).
        status: per class, ``reached`` / ``not_found`` / ``unreachable``
            (:class:`InverseStatus`).
        solver: per class, ``layerwise`` (the layer-by-layer solution reproduced the target) or
            ``gauss_newton`` (the whole-network search).
        output_residual: ``(K,)`` ``‖f(x) − t‖ / ‖t‖`` of the float64 input.
        iterations: ``(K,)`` Levenberg–Marquardt steps taken over all path stages (0 where the
            layer-by-layer solution was used without a search).
        unreachable_reason: per class, the proof of unreachability, or None.
        layerwise: the layer-by-layer attempt (residuals per layer, clipped activations).
    """

    images: Tensor
    images64: Tensor
    status: list[InverseStatus]
    solver: list[str]
    output_residual: Tensor
    iterations: Tensor
    unreachable_reason: list[str | None]
    layerwise: LayerwiseInverseResult


def _status(residual: float, tolerance: float, reason: str | None) -> InverseStatus:
    if residual <= tolerance:
        return InverseStatus.REACHED
    return InverseStatus.UNREACHABLE if reason is not None else InverseStatus.NOT_FOUND


def _check_solver_args(tolerance: float, max_iterations: int) -> None:
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")


def exact_inverse(
    chain: Sequence[nn.Module],
    targets: Tensor,
    anchors: Tensor,
    input_shape: tuple[int, ...],
    *,
    names: Sequence[str] | None = None,
    tolerance: float = REACH_TOLERANCE,
    max_iterations: int = 1000,
    layerwise_first: bool = True,
) -> ExactInverseResult:
    """An input ``x`` with ``f(x) = t`` for each class target, searched over the whole network.

    1. The layer-by-layer minimum-change solution (:func:`layerwise_inverse`). Where it
       reproduces the target (float64, relative ``tolerance``) it is kept: for a single Linear
       layer followed by activations (``fcnn1``) it is the input closest to the anchor.
    2. Elsewhere, Levenberg–Marquardt over the input of the whole network in float64, started
       at the anchor, with minimum-norm steps (each in the row space of the current Jacobian,
       so the input changes only where that moves the output). Every activation is evaluated,
       never inverted, so no activation is ever asked for an output outside its range. The
       first attempt aims at the target directly (plain Gauss–Newton); where it stalls, the
       search follows the path of targets from the anchor's output to ``t`` in adaptive steps
       (saturated SELUs leave plain Gauss–Newton at non-zero-error stationary points). The
       result is *a* pre-image near the anchor, not necessarily the closest one.
    3. Status per class: ``reached`` when ``‖f(x) − t‖ ≤ tolerance · ‖t‖``; ``unreachable`` when
       proved: walking back from the output through activations and injective Linear layers
       (where every pre-image is forced), an entry outside an activation's range or a target
       outside a Linear layer's affine range, up to and including the first non-injective
       Linear layer; ``not_found`` otherwise (the search failed: more iterations or another
       start might succeed). Unreached classes get the input with the smallest output error
       found (layer by layer or searched).

    The inputs reached can lie far outside the data range: see :func:`box_inverse` for the
    nearest reachable output within it.

    Args:
        chain: the layers from :func:`invertible_chain`.
        targets: ``(K, M)`` the target output of each class.
        anchors: ``(K, *input_shape)`` the class averages (starts and minimum-change anchors).
        input_shape: the model's input shape, e.g. ``(C, H, W)``.
        names: a name per layer for the report (default: the layer indices).
        tolerance: relative output error that counts as reached, in (0, 1).
        max_iterations: Levenberg–Marquardt steps per class over all path stages (0: the
            layer-by-layer solution only).
        layerwise_first: keep the layer-by-layer solution where it reaches the target (step 1);
            False searches every class (the layer-by-layer solution is still computed for the
            proofs and kept only where the search ends further from the target).
    """
    _check_solver_args(tolerance, max_iterations)
    names = _check_chain(chain, names)
    layerwise = layerwise_inverse(chain, targets, anchors, input_shape, names=names)
    reasons = _unreachable(chain, names, layerwise, tolerance)
    num = anchors.shape[0]
    device = anchors.device
    t64 = targets.detach().to(device=device, dtype=torch.float64)
    best = layerwise.images64.reshape(num, -1).clone()
    residual = layerwise.output_residual.clone()
    iterations = torch.zeros(num, dtype=torch.int64, device=device)
    solver = ["layerwise"] * num
    search = (
        (residual > tolerance).nonzero().flatten()
        if layerwise_first
        else torch.arange(num, device=device)
    )
    if search.numel() and max_iterations > 0:
        net = _Float64Net(chain, input_shape, device)
        starts = anchors.detach().to(torch.float64).reshape(num, -1)
        for part in _chunks(int(search.numel()), t64.shape[1], starts.shape[1]):
            rows = search[part]
            x, rel, steps = _path_search(
                net, starts[rows], t64[rows], max_iterations=max_iterations, tolerance=tolerance
            )
            iterations[rows] = steps
            # Keep the search's input unless the layer-by-layer one is closer to the target;
            # without layerwise_first, a search that reaches the target always wins.
            take = rel <= residual[rows]
            if not layerwise_first:
                take |= rel <= tolerance
            best[rows[take]] = x[take]
            residual[rows[take]] = rel[take]
            for k in rows[take].tolist():
                solver[k] = "gauss_newton"
    status = [_status(float(residual[k]), tolerance, reasons[k]) for k in range(num)]
    images64 = best.reshape(num, *input_shape)
    return ExactInverseResult(
        images=images64.to(anchors.dtype),
        images64=images64,
        status=status,
        solver=solver,
        output_residual=residual,
        iterations=iterations,
        unreachable_reason=[
            r if s is InverseStatus.UNREACHABLE else None
            for r, s in zip(reasons, status, strict=True)
        ],
        layerwise=layerwise,
    )


# --------------------------------------------------------------------------------------------
# The nearest reachable output inside the data box
# --------------------------------------------------------------------------------------------


@dataclass
class BoxInverseResult:
    """The input in the box whose output is closest to each class target (locally).

    Attributes:
        images: ``(K, *input_shape)`` inside ``[low, high]``, in the first start's dtype.
        images64: the same in float64 (what the errors describe).
        status: per class: ``reached`` (an input in the box reaches the target to the
            tolerance), ``unreachable`` (when given as proved, e.g. by :func:`exact_inverse`),
            else ``not_found``.
        output_residual: ``(K,)`` ``‖f(x) − t‖ / ‖t‖`` (float64).
        mse: ``(K,)`` ``mean((f(x) − t)²)`` (float64).
        start: ``(K,)`` int64: which start the kept input came from.
        iterations: ``(K,)`` search steps taken from that start.
    """

    images: Tensor
    images64: Tensor
    status: list[InverseStatus]
    output_residual: Tensor
    mse: Tensor
    start: Tensor
    iterations: Tensor


def box_inverse(
    chain: Sequence[nn.Module],
    targets: Tensor,
    starts: Sequence[Tensor],
    input_shape: tuple[int, ...],
    low: Tensor | float,
    high: Tensor | float,
    *,
    tolerance: float = REACH_TOLERANCE,
    max_iterations: int = 200,
    unreachable: Sequence[bool] | None = None,
) -> BoxInverseResult:
    """Minimize ``‖f(x) − t‖`` over inputs in the box ``low ≤ x ≤ high``, per class.

    Projected Levenberg–Marquardt (see :func:`exact_inverse`) in float64 from every start, each
    clamped into the box first; per class the input with the smallest error is kept. Steps are
    kept only when they lower the error, so the result is never worse than the best clamped
    start: pass the class averages and the clamped exact inverse to be no worse than either.
    The problem is not convex: the result is a local minimizer (the nearest reachable output
    found in the box), not a certified global one.

    Args:
        chain: the layers from :func:`invertible_chain`.
        targets: ``(K, M)`` the target output of each class.
        starts: each ``(K, *input_shape)``; at least one.
        input_shape: the model's input shape, e.g. ``(C, H, W)``.
        low, high: the box in model-input units: floats or tensors broadcastable to
            ``input_shape`` (e.g. ``(C, 1, 1)`` per channel), ``low < high``.
        tolerance: relative output error that counts as reached.
        max_iterations: search steps per class and start.
        unreachable: per class, whether the target is proved unreachable (reported as such).
    """
    _check_solver_args(tolerance, max_iterations)
    _check_chain(chain, None)
    if not starts:
        raise ValueError("box_inverse needs at least one start")
    num = targets.shape[0]
    for start in starts:
        _check_inputs(targets, start, input_shape)
    device = starts[0].device
    lo = torch.as_tensor(low, dtype=torch.float64, device=device).expand(input_shape).flatten()
    hi = torch.as_tensor(high, dtype=torch.float64, device=device).expand(input_shape).flatten()
    if not bool((lo < hi).all()):
        raise ValueError("the box needs low < high everywhere")
    if unreachable is not None and len(unreachable) != num:
        raise ValueError(f"unreachable must have {num} entries, got {len(unreachable)}")
    t64 = targets.detach().to(device=device, dtype=torch.float64)
    net = _Float64Net(chain, input_shape, device)
    # Every (start, class) pair is an independent problem: solve them in one batch.
    x0 = torch.cat(
        [s.detach().to(device=device, dtype=torch.float64).reshape(num, -1) for s in starts]
    )
    tt = t64.repeat(len(starts), 1)
    x = torch.empty_like(x0)
    rel = torch.empty(x0.shape[0], dtype=torch.float64, device=device)
    steps = torch.empty(x0.shape[0], dtype=torch.int64, device=device)
    for part in _chunks(x0.shape[0], t64.shape[1], x0.shape[1]):
        x[part], rel[part], steps[part] = _levenberg_marquardt(
            net, x0[part], tt[part], max_iterations=max_iterations, low=lo, high=hi
        )
    which = rel.reshape(len(starts), num).argmin(dim=0)
    rows = which * num + torch.arange(num, device=device)
    best, residual = x[rows], rel[rows]
    with torch.no_grad():
        mse = ((net(best) - t64) ** 2).mean(dim=1)
    proved = list(unreachable) if unreachable is not None else [False] * num
    status = [
        _status(float(residual[k]), tolerance, "proved" if proved[k] else None) for k in range(num)
    ]
    images64 = best.reshape(num, *input_shape)
    dtype = starts[0].dtype if starts[0].is_floating_point() else torch.float32
    # Rounding can step just outside the box: clamp again in the output dtype.
    images = torch.maximum(
        torch.minimum(images64.to(dtype), hi.reshape(input_shape).to(dtype)),
        lo.reshape(input_shape).to(dtype),
    )
    return BoxInverseResult(
        images=images,
        images64=images64,
        status=status,
        output_residual=residual,
        mse=mse,
        start=which,
        iterations=steps[rows],
    )
