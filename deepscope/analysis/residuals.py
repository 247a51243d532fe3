"""What each layer cannot see: per-row and row-space residuals (Pattichis & Pattichis 2024).

A layer with weight ``W`` sees an input ``x`` only through ``W x``. Splitting ``x = P x + r`` with
``P`` the orthogonal projection onto the row space of ``W`` gives ``W x = W P x`` and ``W r = 0``:
``r`` is the part of the input the layer throws away, and ``‖r‖² / ‖x‖²`` the share of the input's
energy it loses. The paper also looks at each output unit on its own: the per-row residual
``r_i = x − (w_iᵀx / w_iᵀw_i) w_i`` is what row ``i`` alone does not see.

Linear layers are projected exactly with the SVD of ``W``. A convolution is a huge sparse matrix
(``C_out·H_out·W_out × C_in·H·W``), so it is never formed: ``P x`` is the minimum-norm least-squares
solution of ``A p ≈ A x``, found by CGLS (conjugate gradients on ``AᵀA p = AᵀA x`` started at
``p = 0``, so every iterate lies in ``range(Aᵀ)``, the row space) using only the convolution and its
adjoint. Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.grad import conv2d_input

from deepscope.analysis.hooks import Where, capture_activations, eval_mode
from deepscope.analysis.layers import LayerKind, WeightLayer, finite_or_raise

__all__ = [
    "LayerResiduals",
    "RowSpaceResult",
    "per_row_residuals",
    "residual_metrics",
    "residuals",
    "row_space_residual",
]

_F64 = torch.float64


@dataclass
class RowSpaceResult:
    """The split ``x = projection + residual`` of a batch of inputs to one layer.

    Attributes:
        projection: ``P_row(W) x``, x's shape and dtype (computed in float64).
        residual: ``x − P_row(W) x``, the null-space component; x's shape and dtype.
        relative_error: ``(B,)`` float64, how exactly the projection was found: 0 for Linear
            layers (direct SVD); for convolutions ``‖AᵀA(p − x)‖ / ‖AᵀA x‖`` evaluated afresh at
            the returned ``p`` (0 where ``AᵀA x = 0``).
        iterations: CGLS iterations run (the most over the batch); 0 for Linear layers.
    """

    projection: Tensor
    residual: Tensor
    relative_error: Tensor
    iterations: int


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

    Conv2d: matrix-free CGLS on ``AᵀA p = AᵀA x`` from ``p = 0`` with ``A`` the convolution
    without bias (any stride, padding, padding mode, dilation, groups) and ``Aᵀ`` its adjoint;
    batched with per-sample step sizes; stops per sample when ``‖AᵀA(p − x)‖ ≤ rtol·‖AᵀA x‖``
    or after ``max_iter`` iterations. ``x`` is ``(B, C_in, H, W)``. Memory: a few float64 copies
    of ``x`` and of the layer's output, never the operator's matrix.

    How to read a conv result: components of ``x`` along singular directions with tiny
    singular values are resolved last, so a stopped solve leaves them in ``residual``. A square
    layer with generic weights (a stride-1 3×3 conv with C_out = C_in) is injective, yet its
    singular values reach down to 0 and CGLS converges slowly (≈ 1/k² in ``relative_error``):
    its ``residual`` is then the energy the layer barely sees (σ ≲ σ_max·√rtol, roughly), not
    an exact null-space component. ``relative_error`` says how far the solve got.

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
    return RowSpaceResult(
        projection=p.to(x.dtype),
        residual=(x64 - p).to(x.dtype),
        relative_error=torch.zeros(x.shape[0], dtype=_F64, device=x.device),
        iterations=0,
    )


_PAD_MODES = ("zeros", "reflect", "replicate", "circular")


def _pad_index(n: int, pad: int, mode: str, device: torch.device) -> Tensor:
    """Which input position each of the ``n + 2·pad`` padded positions copies (as F.pad does)."""
    k = torch.arange(-pad, n + pad, device=device)
    if mode == "circular":
        return k.remainder(n)
    if mode == "reflect":
        return torch.where(k < 0, -k, torch.where(k >= n, 2 * (n - 1) - k, k))
    return k.clamp(0, n - 1)  # replicate


class _ConvOperator:
    """``A`` (the convolution without bias) and ``Aᵀ`` on float64 inputs of one fixed shape."""

    def __init__(self, layer: WeightLayer, shape: torch.Size, device: torch.device) -> None:
        if layer.padding_mode not in _PAD_MODES:
            raise ValueError(
                f"layer {layer.name!r} has padding mode {layer.padding_mode!r}; "
                f"valid modes are: {', '.join(_PAD_MODES)}"
            )
        weight = layer.weight.detach().to(device=device, dtype=_F64)
        # Cast once: WeightLayer.apply is then a plain conv, no per-call weight copy.
        self._layer = replace(layer, weight=weight, bias=None)
        self._weight = weight
        self._shape = shape
        self._pad_index: tuple[Tensor, Tensor] | None = None
        if layer.padding_mode != "zeros":
            # A = conv(no padding) ∘ pad, and these pads copy input pixels, so padᵀ adds each
            # padded pixel back onto the pixel it copies.
            (p_h, p_w), (h, w) = layer.padding, (int(shape[2]), int(shape[3]))
            self._pad_index = (
                _pad_index(h, p_h, layer.padding_mode, device),
                _pad_index(w, p_w, layer.padding_mode, device),
            )
            self._conv_input_size = torch.Size((*shape[:2], h + 2 * p_h, w + 2 * p_w))
            self._conv_padding: tuple[int, int] = (0, 0)
        else:
            self._conv_input_size = shape
            self._conv_padding = layer.padding

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` → ``(B, C_out, H_out, W_out)``."""
        return self._layer.apply(x)

    def adjoint(self, y: Tensor) -> Tensor:
        """``(B, C_out, H_out, W_out)`` → ``(B, C_in, H, W)``."""
        g: Tensor = conv2d_input(  # type: ignore[no-untyped-call]
            self._conv_input_size,
            self._weight,
            y,
            stride=self._layer.stride,
            padding=self._conv_padding,
            dilation=self._layer.dilation,
            groups=self._layer.groups,
        )
        if self._pad_index is None:
            return g
        idx_h, idx_w = self._pad_index
        b, c, h, w = self._shape
        g = g.new_zeros((b, c, g.shape[2], w)).index_add_(3, idx_w, g)
        return g.new_zeros((b, c, h, w)).index_add_(2, idx_h, g)


def _sq_norms(t: Tensor) -> Tensor:
    """``(B,)`` squared norms over all but the first axis."""
    return t.flatten(1).pow(2).sum(dim=1)


def _conv_row_space(layer: WeightLayer, x: Tensor, rtol: float, max_iter: int) -> RowSpaceResult:
    if x.dim() != 4 or x.shape[1] != layer.in_channels:
        raise ValueError(
            f"layer {layer.name!r} takes (B, {layer.in_channels}, H, W) inputs, "
            f"got shape {tuple(x.shape)}"
        )
    op = _ConvOperator(layer, x.shape, x.device)
    x64 = x.detach().to(_F64)
    per_sample = (-1,) + (1,) * (x.dim() - 1)

    # CGLS: s = A x − A p (output space), r = Aᵀ s = AᵀA(x − p) (the normal-equation residual).
    s = op.forward(x64)
    per_out = (-1,) + (1,) * (s.dim() - 1)
    r = op.adjoint(s)
    gamma = _sq_norms(r)
    b_norm = gamma.sqrt()  # ‖AᵀA x‖
    threshold = (rtol * b_norm) ** 2
    p = torch.zeros_like(x64)
    d = r
    active = gamma > threshold
    iterations = 0
    while iterations < max_iter and bool(active.any()):
        q = op.forward(d)
        delta = _sq_norms(q)
        # d ∈ range(Aᵀ), so A d = 0 only when d = 0: the guard only keeps finished samples still.
        alpha = torch.where(active & (delta > 0), gamma / delta.clamp_min(1e-300), 0.0)
        p.addcmul_(d, alpha.view(per_sample))
        s.addcmul_(q, alpha.view(per_out), value=-1.0)
        del q
        r = op.adjoint(s)
        gamma_new = _sq_norms(r)
        beta = torch.where(active, gamma_new / gamma.clamp_min(1e-300), 0.0)
        d = r.add_(d.mul_(beta.view(per_sample)))
        gamma = torch.where(active, gamma_new, gamma)
        active = active & (gamma > threshold)
        iterations += 1
    del s, r, d

    # The recurrences drift from the true residual in floating point: report the true one.
    true_r = op.adjoint(op.forward(x64 - p))
    rel = torch.where(b_norm > 0, _sq_norms(true_r).sqrt() / b_norm.clamp_min(1e-300), 0.0)
    del true_r
    return RowSpaceResult(
        projection=p.to(x.dtype),
        residual=(x64 - p).to(x.dtype),
        relative_error=rel,
        iterations=iterations,
    )


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
        input_sq = _sq_norms(x.to(_F64))
        residual_sq = _sq_norms(result.residual.to(_F64))
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
    """JSON-ready metrics of one layer: DESIGN.md's ``metrics.layers[]`` entry.

    Returns:
        ``{name, kind, input_shape, iterations, classes: [{class, input_norm, residual_norm,
        lost_fraction, projection_relative_error[, row_residual_norms]}]}``, one class per sample
        (``row_residual_norms``, a list of ``out`` floats, for Linear layers only).

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
    rows = lr.row_residual_norms.tolist() if lr.row_residual_norms is not None else None
    classes: list[dict[str, object]] = []
    for b, class_name in enumerate(class_names):
        entry: dict[str, object] = {
            "class": str(class_name),
            "input_norm": float(input_norm[b]),
            "residual_norm": float(residual_norm[b]),
            "lost_fraction": float(lost[b]),
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
        "classes": classes,
    }
