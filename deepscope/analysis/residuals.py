"""What each layer cannot see: per-row and row-space residuals (Pattichis & Pattichis 2024).

A layer with weight ``W`` sees an input ``x`` only through ``W x``. Splitting ``x = P x + r`` with
``P`` the orthogonal projection onto the row space of ``W`` gives ``W x = W P x`` and ``W r = 0``:
``r`` is the part of the input the layer throws away, and ``‖r‖² / ‖x‖²`` the share of the input's
energy it loses. The paper also looks at each output unit on its own: the per-row residual
``r_i = x − (w_iᵀx / w_iᵀw_i) w_i`` is what row ``i`` alone does not see.

Linear layers are projected exactly with the SVD of ``W``. A convolution is a huge sparse matrix
``A`` (``C_out·H_out·W_out × C_in·H·W``) that is never formed when large. Its projection is found
on whichever side is smaller, after setting aside the structural null space (input pixels no tap
reads, e.g. the odd pixels of a 1×1 stride-2 conv):

* injective on the read pixels (columns ≤ rows, and the smallest singular value of ``A`` is
  positive): ``P x = x`` there and 0 on the unread pixels: nothing is solved. Square 3×3 convs
  are in this case, and they are the ill-conditioned ones (``σ_min/σ_max ≈ 10⁻⁵``), so their
  ``σ_min`` comes from shift-invert with an exact inverse
  (:mod:`deepscope.analysis.precondition`), not from a Krylov solve that would stall;
* surjective (rows < columns, ``AAᵀ`` invertible, e.g. stride-2 convs doubling the channels):
  ``P x = Aᵀ y`` with ``AAᵀ y = A x``, solved exactly (dense Cholesky) or by CG in float32 with
  float64 iterative refinement, all samples at once;
* otherwise (rank-deficient beyond the structure): CGLS on the normal equations, as a fallback
  without a certified error.

Each conv result carries ``error_bound``, an upper bound on ``‖p − P x‖ / ‖x‖`` (see
:class:`RowSpaceResult`), so a reader knows how far to trust ``lost_fraction``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deepscope.analysis.conv_operator import ConvOperator
from deepscope.analysis.hooks import Where, capture_activations, eval_mode
from deepscope.analysis.krylov import batched_cg, sq_norms
from deepscope.analysis.layers import LayerKind, WeightLayer, finite_or_raise
from deepscope.analysis.operator_spectrum import (
    OperatorStructure,
    gram_inverse,
    largest_singular_values,
    rounding_allowance,
    smallest_singular_values,
)
from deepscope.analysis.precondition import GramInverse

__all__ = [
    "LayerResiduals",
    "RowSpaceResult",
    "per_row_residuals",
    "residual_metrics",
    "residuals",
    "row_space_residual",
]

_F64 = torch.float64
_EPS64 = float(torch.finfo(_F64).eps)
#: The Lanczos basis for σ_max and σ_min, in float64 entries: 128 MiB, ~170 vectors on the
#: 128×28×28 output side of resnet18's layer2.0.conv1 at 224 (far more than it needs).
_LANCZOS_ENTRIES = 1 << 24


@dataclass
class RowSpaceResult:
    """The split ``x = projection + residual`` of a batch of inputs to one layer.

    Attributes:
        projection: ``P_row(W) x``, x's shape and dtype (computed in float64).
        residual: ``x − P_row(W) x``, the null-space component; x's shape and dtype.
        relative_error: ``(B,)`` float64, the normal-equations residual
            ``‖AᵀA(p − x)‖ / ‖AᵀA x‖`` at the returned ``p`` (0 where ``AᵀA x = 0``; 0 for Linear
            layers). Kept for continuity: it is NOT the error of the projection. Directions the
            layer barely sees weigh ``σ²`` in it, so an ill-conditioned layer can read 1e-5 here
            while ``p`` is off by percents; ``error_bound`` is the error.
        iterations: iterations of the conv solve (CG or CGLS, the most over the batch); 0 when
            nothing is solved iteratively (Linear, injective, dense).
        error_bound: ``(B,)`` float64, an upper bound on ``‖p − P x‖ / ‖x‖``, the error of the
            returned projection relative to the input (0 for a zero input). Linear layers and
            injective convs: 0 (``p`` is exact: ``x V Vᵀ`` from the SVD, or ``x`` itself). A
            surjective conv solved for ``p = Aᵀ y``: ``‖A x − AAᵀ y‖ / σ_min(A)`` plus a
            rounding term, where ``σ_min`` is a lower bound on the smallest singular value of
            ``A`` (found by Lanczos and checked with the operator itself; the bound assumes
            Lanczos found the smallest one). ``inf`` for the rank-deficient fallback, which
            has no certified bound. The lost fraction is then within
            ``2·error_bound + error_bound²`` of the true one.
        method: how the conv projection was found: ``linear`` (SVD), ``injective``,
            ``surjective (dense Cholesky)``, ``surjective (CG, float32 + float64 refinement)``,
            ``rank-deficient (CGLS)``.
        sigma_min: the smallest singular value of the layer's map on its smaller side
            (structural zeros set aside) as computed, None for Linear layers and the fallback.
    """

    projection: Tensor
    residual: Tensor
    relative_error: Tensor
    iterations: int
    error_bound: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=_F64))
    method: str = "linear"
    sigma_min: float | None = None


@dataclass
class LayerResiduals:
    """Residuals of one layer for a batch of inputs.

    Attributes:
        name, kind: the layer.
        inputs: the layer's captured input ``(B, ...)``; None when ``keep_inputs=False``.
        result: the row-space split of ``inputs``.
        input_norm, residual_norm: ``(B,)`` float64, ``‖x‖`` and ``‖r‖`` per sample.
        lost_fraction: ``(B,)`` float64, ``‖r‖² / ‖x‖²`` (0 for a zero input): the share of the
            input's energy the layer cannot see.
        row_residual_norms: ``(B, out)`` float64 per-row residual norms ``‖r_i‖`` (Linear only;
            summed over any token axes between B and the features); None for Conv2d.
    """

    name: str
    kind: LayerKind
    inputs: Tensor | None
    result: RowSpaceResult
    input_norm: Tensor
    residual_norm: Tensor
    lost_fraction: Tensor
    row_residual_norms: Tensor | None


def per_row_residuals(weight: Tensor, x: Tensor) -> Tensor:
    """The paper's per-row residuals ``r_i = x − (w_iᵀx / w_iᵀw_i) w_i`` for every row of W.

    Args:
        weight: ``(out, in)``.
        x: ``(B, in)``.

    Returns:
        ``(B, out, in)`` in the promoted dtype of ``weight`` and ``x`` (computed in float64);
        ``result[b, i] · weight[i] = 0``.

    Raises:
        ValueError: wrong shapes, or a zero row (its residual is undefined); the message names it.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
    if x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x must be (B, {weight.shape[1]}) to match weight {tuple(weight.shape)}, "
            f"got shape {tuple(x.shape)}"
        )
    w = weight.detach().to(device=x.device, dtype=_F64)
    ww = (w * w).sum(dim=1)
    zero = torch.nonzero(ww == 0).flatten()
    if zero.numel():
        raise ValueError(
            f"weight row {int(zero[0])} is zero; its per-row residual is undefined (0/0)"
        )
    x64 = x.detach().to(_F64)
    coeff = (x64 @ w.T) / ww  # (B, out)
    out = x64[:, None, :] - coeff[:, :, None] * w[None, :, :]
    return out.to(torch.promote_types(weight.dtype, x.dtype))


def _check_tolerances(rtol: float, max_iter: int) -> None:
    if not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}")


def row_space_residual(
    layer: WeightLayer, x: Tensor, *, rtol: float = 1e-5, max_iter: int = 500
) -> RowSpaceResult:
    """Split ``x`` into its projection on the layer's row space and the residual.

    Linear: exact, ``P x = V_r V_rᵀ x`` with the right singular vectors of W whose singular
    values exceed ``σ_max · max(out, in) · eps`` (eps of the weight's dtype). ``x`` is
    ``(B, in)`` (or ``(B, ..., in)``: the projection acts on the last axis).

    Conv2d (any stride, padding, padding mode, dilation, groups; ``x`` is ``(B, C_in, H, W)``):
    the row space of the layer's map ``A`` on ``C_in × H × W`` (no bias), as the stored weights
    define it: a singular value counts as nonzero above ``σ_max·max(m, n)·eps(float64)``, so an
    ill-conditioned but injective layer (a square 3×3 conv, ``σ_min/σ_max ≈ 10⁻⁵``) loses
    nothing. See the module docstring for the three routes (injective, surjective, fallback);
    the result's ``method`` says which one ran and ``error_bound`` how exact it is. Runs on
    ``x``'s device; the samples are solved together.

    Args:
        layer: the layer.
        x: its input batch.
        rtol: the target of ``error_bound`` for a surjective conv solved by CG (stop when the
            bound is at most ``rtol``), and the normal-equations tolerance of the fallback.
        max_iter: the most CG (or CGLS) iterations.

    Raises:
        ValueError: ``x`` does not fit the layer, or ``rtol``/``max_iter`` out of range.
    """
    _check_tolerances(rtol, max_iter)
    if layer.kind is LayerKind.LINEAR:
        return _linear_row_space(layer, x)
    return _conv_row_space(layer, x, rtol, max_iter)


def _linear_row_space(layer: WeightLayer, x: Tensor) -> RowSpaceResult:
    n_out, n_in = (int(s) for s in layer.weight.shape)
    if x.dim() < 2 or x.shape[-1] != n_in:
        raise ValueError(
            f"layer {layer.name!r} takes (B, {n_in}) inputs, got shape {tuple(x.shape)}"
        )
    w = layer.weight.detach().to(device=x.device, dtype=_F64)
    _, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    dtype = layer.weight.dtype if layer.weight.dtype.is_floating_point else torch.float32
    tol = float(sigma.max()) * max(n_out, n_in) * torch.finfo(dtype).eps if sigma.numel() else 0.0
    v = vh[: int((sigma > tol).sum())].T  # (in, rank)
    x64 = x.detach().to(_F64)
    p = (x64 @ v) @ v.T
    zeros = torch.zeros(x.shape[0], dtype=_F64, device=x.device)
    return RowSpaceResult(
        projection=p.to(x.dtype),
        residual=(x64 - p).to(x.dtype),
        relative_error=zeros,
        iterations=0,
        error_bound=zeros.clone(),
        method="linear",
    )


class _ConvOperator(ConvOperator):
    """:class:`ConvOperator` built from a full input shape ``(B, C_in, H, W)`` (older callers)."""

    def __init__(self, layer: WeightLayer, shape: torch.Size, device: torch.device) -> None:
        super().__init__(layer, (int(shape[2]), int(shape[3])), device=device)


def _conv_row_space(layer: WeightLayer, x: Tensor, rtol: float, max_iter: int) -> RowSpaceResult:
    if x.dim() != 4 or x.shape[1] != layer.in_channels:
        raise ValueError(
            f"layer {layer.name!r} takes (B, {layer.in_channels}, H, W) inputs, "
            f"got shape {tuple(x.shape)}"
        )
    op = ConvOperator(layer, (int(x.shape[2]), int(x.shape[3])), device=x.device)
    x64 = x.detach().to(_F64)
    x_norm = sq_norms(x64).sqrt()
    structure = OperatorStructure.of(op)
    iterations = 0
    sigma_min: float | None = None
    if structure.dim == 0:
        # A = 0: everything is lost, exactly.
        p = torch.zeros_like(x64)
        bound = torch.zeros_like(x_norm)
        method = "zero map"
    else:
        # σ_max scales the rank tolerance and the rounding allowances, σ_min decides the route
        # and scales the bound: a Ritz residual of 1% of the value is plenty (the Ritz values
        # themselves are accurate to its square, and the bound uses σ_min − its error).
        sigma_max = 1.01 * float(
            largest_singular_values(
                structure, 1, tol=1e-2, lanczos_entries=_LANCZOS_ENTRIES
            ).values[0]
        )
        # Square operators need an exact inverse for σ_min; rectangular ones try Lanczos on G
        # first and build the dense inverse only if that does not converge.
        inverse = gram_inverse(structure, rectangular=False)
        bottom = smallest_singular_values(
            structure,
            1,
            inverse,
            tol=1e-4 if inverse is not None else 1e-2,
            lanczos_entries=_LANCZOS_ENTRIES,
            sigma_max=sigma_max,
        )
        if not bottom.converged and inverse is None:
            inverse = gram_inverse(structure)
            if inverse is not None:
                bottom = smallest_singular_values(
                    structure, 1, inverse, tol=1e-4, sigma_max=sigma_max
                )
        sigma_min = float(bottom.values[0])
        sigma_low = sigma_min - float(bottom.errors[0])
        tolerance = sigma_max * max(op.m, op.n) * _EPS64
        if bottom.converged and sigma_low > tolerance:
            if structure.side == "input":
                # Injective on the read pixels: they are kept whole, the unread ones lost.
                p = x64.masked_fill(structure.zero_cols, 0.0)
                bound = torch.zeros_like(x_norm)
                method = "injective"
            else:
                p, bound, iterations, method = _surjective(
                    op, structure, inverse, x64, x_norm, sigma_low, sigma_max, rtol, max_iter
                )
        else:
            p, iterations = _cgls(op, x64, rtol, max_iter)
            bound = torch.full_like(x_norm, math.inf)
            method = "rank-deficient (CGLS)"
            sigma_min = None
    bound = torch.where(x_norm > 0, bound, 0.0)
    # The normal-equations residual, afresh in float64 (kept for continuity).
    ata_x = op.gram_input(x64)
    ata_err = op.gram_input(x64 - p)
    b_norm = sq_norms(ata_x).sqrt()
    rel = torch.where(b_norm > 0, sq_norms(ata_err).sqrt() / b_norm.clamp_min(1e-300), 0.0)
    return RowSpaceResult(
        projection=p.to(x.dtype),
        residual=(x64 - p).to(x.dtype),
        relative_error=rel,
        iterations=iterations,
        error_bound=bound,
        method=method,
        sigma_min=sigma_min,
    )


def _surjective(
    op: ConvOperator,
    structure: OperatorStructure,
    inverse: GramInverse | None,
    x64: Tensor,
    x_norm: Tensor,
    sigma_low: float,
    sigma_max: float,
    rtol: float,
    max_iter: int,
) -> tuple[Tensor, Tensor, int, str]:
    """``p = Aᵀ y`` with ``AAᵀ y = A x`` for a surjective ``A`` (``AAᵀ`` invertible on the rows
    that read something), and the bound ``‖A x − AAᵀ y‖ / σ_min + rounding`` on ``‖p − P x‖``.

    ``p − P x = Aᵀ(y − y*)`` and ``‖Aᵀ(AAᵀ)⁻¹ r‖ ≤ ‖r‖/σ_min``, so the output-side residual ``r``
    bounds the error whatever solved for ``y``. With a dense Cholesky factor ``y`` is solved
    directly (then refined once); otherwise by CG in float32 on ``r`` with the residual and ``y``
    kept in float64 (iterative refinement): each round gains float32's ~4 digits, until the
    bound reaches ``rtol`` or ``max_iter`` CG iterations have run.
    """
    b = op.forward(x64)
    per = (-1,) + (1,) * (b.dim() - 1)
    # The rounding of one float64 evaluation of A x − AAᵀ y, as for the σ bounds.
    per_unit = rounding_allowance(op, sigma_max) / sigma_max**2

    def residual(y: Tensor) -> tuple[Tensor, Tensor]:
        r = b - op.gram_output(y)
        rounding = per_unit * sigma_max * (x_norm + sigma_max * sq_norms(y).sqrt())
        return r, (sq_norms(r).sqrt() + rounding) / sigma_low

    target = rtol * x_norm
    iterations = 0
    if inverse is not None and inverse.side == "output":
        y = inverse.apply(b)
        r, bound = residual(y)
        y = y + inverse.apply(r)
        r, bound = residual(y)
        method = f"surjective ({inverse.method})"
    else:
        y = torch.zeros_like(b)
        r, bound = residual(y)
        method = "surjective (CG, float32 + float64 refinement)"
        dtype = torch.float32
        while iterations < max_iter and bool((bound > target).any()):
            active = bound > target
            # Each round asks float32 for what it can give (~1e-4) or what is left to reach.
            r_norm = sq_norms(r).sqrt().clamp_min(1e-300)
            inner = torch.clamp(
                target * sigma_low / r_norm, min=1e-4 if dtype == torch.float32 else 1e-12, max=1.0
            )
            inner = torch.where(active, inner, 1.0)
            d, its = batched_cg(
                structure.gram, r.to(dtype), rtol=inner.to(dtype), max_iter=max_iter - iterations
            )
            iterations += max(its, 1)
            y = y + d.to(_F64) * active.view(per)
            r_new, bound_new = residual(y)
            stalled = bool((sq_norms(r_new) > 0.25 * sq_norms(r))[active].any())
            r, bound = r_new, bound_new
            if stalled and dtype == torch.float32:
                # float32 cannot resolve what is left: finish in float64.
                dtype = _F64
    p = op.adjoint(y)
    return p, bound / x_norm.clamp_min(1e-300), iterations, method


def _cgls(op: ConvOperator, x64: Tensor, rtol: float, max_iter: int) -> tuple[Tensor, int]:
    """CGLS on ``AᵀA p = AᵀA x`` from ``p = 0`` (iterates stay in the row space), per-sample
    steps, stopping per sample at ``‖AᵀA(p − x)‖ ≤ rtol·‖AᵀA x‖``: the rank-deficient fallback."""
    per_sample = (-1,) + (1,) * (x64.dim() - 1)
    s = op.forward(x64)
    per_out = (-1,) + (1,) * (s.dim() - 1)
    r = op.adjoint(s)
    gamma = sq_norms(r)
    threshold = rtol**2 * gamma
    p = torch.zeros_like(x64)
    d = r
    active = gamma > threshold
    iterations = 0
    while iterations < max_iter and bool(active.any()):
        q = op.forward(d)
        delta = sq_norms(q)
        # d ∈ range(Aᵀ), so A d = 0 only when d = 0: the guard only keeps finished samples still.
        alpha = torch.where(active & (delta > 0), gamma / delta.clamp_min(1e-300), 0.0)
        p.addcmul_(d, alpha.view(per_sample))
        s.addcmul_(q, alpha.view(per_out), value=-1.0)
        del q
        r = op.adjoint(s)
        gamma_new = sq_norms(r)
        beta = torch.where(active, gamma_new / gamma.clamp_min(1e-300), 0.0)
        d = r.add_(d.mul_(beta.view(per_sample)))
        gamma = torch.where(active, gamma_new, gamma)
        active = active & (gamma > threshold)
        iterations += 1
    return p, iterations


def _row_residual_norms(weight: Tensor, x: Tensor) -> Tensor:
    """``(B, out)`` norms of the per-row residuals without forming ``(B, out, in)``.

    ``‖r_i‖² = ‖x‖² − (w_iᵀx)² / ‖w_i‖²`` (Pythagoras) in float64, summed over any token axes.
    A zero row spans only {0}, so its residual is x itself (the projection onto span{w_i}).
    """
    w = weight.detach().to(device=x.device, dtype=_F64)
    ww = (w * w).sum(dim=1)
    x64 = x.detach().to(_F64).reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    xx = x64.pow(2).sum(dim=-1, keepdim=True)  # (B, T, 1)
    dots = x64 @ w.T  # (B, T, out)
    seen = torch.where(ww > 0, dots.pow(2) / ww.clamp_min(1e-300), 0.0)
    return (xx - seen).clamp_min(0.0).sum(dim=1).sqrt()


def _capture_inputs(model: nn.Module, names: list[str], inputs: Tensor) -> dict[str, Tensor]:
    """One no-grad eval-mode pass; the input of each named module, not copied where possible."""
    with (
        torch.no_grad(),
        eval_mode(model),
        capture_activations(model, names, where=Where.INPUT, clone=False) as capture,
    ):
        model(inputs)
        missing = [n for n in names if n not in capture]
        if missing:
            raise ValueError(
                f"layer(s) {', '.join(map(repr, missing))} were not called by the forward pass"
            )
        overwritten = set(capture.modified_in_place())
        captured = {n: capture[n] for n in names if n not in overwritten}
        capture.reset()
    if overwritten:
        # An in-place op (ReLU(inplace=True), +=) changed these inputs after the layer read
        # them; a second pass copies just those at capture time (eval mode is deterministic).
        again = [n for n in names if n in overwritten]
        with (
            torch.no_grad(),
            eval_mode(model),
            capture_activations(model, again, where=Where.INPUT, clone=True) as capture,
        ):
            model(inputs)
            captured.update({n: capture[n] for n in again})
            capture.reset()
    return captured


def residuals(
    model: nn.Module,
    layers: Sequence[WeightLayer],
    inputs: Tensor,
    *,
    rtol: float = 1e-5,
    max_iter: int = 500,
    keep_inputs: bool = True,
) -> list[LayerResiduals]:
    """Row-space (and, for Linear layers, per-row) residuals of each layer's input.

    Runs one forward pass of ``inputs`` ``(B, C, H, W)`` (already normalized) under
    ``torch.no_grad()`` with ``model`` in eval mode, hooking only the named layers (hooks removed
    and modes restored also when it raises); a second pass re-captures only inputs that a later
    in-place op overwrote. Layers are then processed one at a time, each captured input released
    as soon as its layer is done when ``keep_inputs`` is False. ``model`` is any module whose
    named submodules carry the layers' names (for ``.pt2`` models an unflattened module).

    Returns:
        One :class:`LayerResiduals` per layer, in the order of ``layers``.

    Raises:
        ValueError: no layers, duplicate names, a name that is not a module (valid names listed),
            a layer not called, non-finite weights or inputs, bad ``rtol``/``max_iter``.
    """
    _check_tolerances(rtol, max_iter)
    names = [layer.name for layer in layers]
    if not names:
        raise ValueError("no layers given; pass at least one WeightLayer")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"layer(s) named more than once: {', '.join(map(repr, dup))}")
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be (B, C, H, W), got shape {tuple(inputs.shape)}")
    finite_or_raise(layers)
    captured = _capture_inputs(model, names, inputs)

    results: list[LayerResiduals] = []
    for layer in layers:
        x = captured.pop(layer.name).detach()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"the input to layer {layer.name!r} has non-finite values (NaN/Inf)")
        result = row_space_residual(layer, x, rtol=rtol, max_iter=max_iter)
        input_sq = sq_norms(x.to(_F64))
        residual_sq = sq_norms(result.residual.to(_F64))
        lost = torch.where(input_sq > 0, residual_sq / input_sq.clamp_min(1e-300), 0.0)
        row_norms = _row_residual_norms(layer.weight, x) if layer.kind is LayerKind.LINEAR else None
        results.append(
            LayerResiduals(
                name=layer.name,
                kind=layer.kind,
                inputs=x if keep_inputs else None,
                result=result,
                input_norm=input_sq.sqrt(),
                residual_norm=residual_sq.sqrt(),
                lost_fraction=lost,
                row_residual_norms=row_norms,
            )
        )
        del x
    return results


def residual_metrics(lr: LayerResiduals, class_names: Sequence[str]) -> dict[str, object]:
    """JSON-ready metrics of one layer: its entry of the analysis's ``metrics.layers[]``.

    Returns:
        ``{name, kind, input_shape, iterations, method, sigma_min, classes: [{class, input_norm,
        residual_norm, lost_fraction, projection_error_bound, projection_relative_error
        [, row_residual_norms]}]}``, one class per sample (``row_residual_norms``, a list of
        ``out`` floats, for Linear layers only). ``projection_error_bound`` is
        :attr:`RowSpaceResult.error_bound` (null where there is no certified bound);
        ``projection_relative_error`` is the normal-equations residual
        (:attr:`RowSpaceResult.relative_error`), not an error of the projection.

    Raises:
        ValueError: ``class_names`` does not have one name per sample.
    """
    batch = int(lr.input_norm.shape[0])
    if len(class_names) != batch:
        raise ValueError(
            f"class_names has {len(class_names)} names but layer {lr.name!r} has {batch} samples"
        )
    input_norm = lr.input_norm.tolist()
    residual_norm = lr.residual_norm.tolist()
    lost = lr.lost_fraction.tolist()
    rel = lr.result.relative_error.tolist()
    bound = lr.result.error_bound.tolist()
    rows = lr.row_residual_norms.tolist() if lr.row_residual_norms is not None else None
    classes: list[dict[str, object]] = []
    for b, class_name in enumerate(class_names):
        entry: dict[str, object] = {
            "class": str(class_name),
            "input_norm": float(input_norm[b]),
            "residual_norm": float(residual_norm[b]),
            "lost_fraction": float(lost[b]),
            # JSON has no inf: an uncertified projection's bound is null.
            "projection_error_bound": None if math.isinf(bound[b]) else float(bound[b]),
            "projection_relative_error": float(rel[b]),
        }
        if rows is not None:
            entry["row_residual_norms"] = [float(v) for v in rows[b]]
        classes.append(entry)
    return {
        "name": lr.name,
        "kind": str(lr.kind),
        "input_shape": [int(s) for s in lr.result.residual.shape[1:]],
        "iterations": lr.result.iterations,
        "method": lr.result.method,
        "sigma_min": lr.result.sigma_min,
        "classes": classes,
    }
