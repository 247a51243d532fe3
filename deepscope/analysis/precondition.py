"""Exact inverses of convolution operators: circulant (FFT), boundary-corrected, dense.

Krylov methods on the Gram ``AᵀA`` of a square convolution converge with ``σ_max/σ_min``, and
that ratio is large: a square 3×3 conv with generic weights behaves like a square random matrix,
whose smallest singular values crowd towards 0 (resnet18's ``layer1.0.conv1`` on 16×16 has
``σ_min/σ_max ≈ 2.4·10⁻⁵``; on 32×32, ``2.4·10⁻⁶``). Preconditioning with the inverse of the
circular operator does not help there: zero padding moves the small singular values and their
vectors, so the preconditioned Gram stays as ill-conditioned (measured on that layer: after 3000
CG iterations on ``AᵀA`` the solution is 2% off without the preconditioner and 29% off with it,
for any regularization of it; on the well-conditioned ``AAᵀ`` of a stride-2 conv it saves only
~40% of the iterations, 177 → 104, for an FFT per iteration). What does work is the exact
inverse, which makes shift-invert (Lanczos on ``(AᵀA)⁻¹``) and exact solves possible:

* :class:`CirculantConv`: the circular counterpart ``C`` of a stride-1 conv is block-diagonal in
  the 2-D DFT, one ``C_out × C_in`` matrix per frequency; ``C⁻¹`` costs two FFTs.
* :class:`BoundaryCorrectedInverse`: a square stride-1 conv with a "same" padding of any mode
  differs from ``C`` only in the output pixels whose taps reach the padding, a band of width
  ``p`` around the border: ``A = C + U Ẽ`` with ``U`` embedding those ``r = C_out·(boundary
  pixels)`` rows. Woodbury's identity then gives ``A⁻¹ = C⁻¹ − C⁻¹U S⁻¹ Ẽ C⁻¹`` with the
  ``r × r`` capacitance ``S = I + Ẽ C⁻¹ U``. ``C⁻¹U`` is ``C``'s Green's function shifted to
  each boundary pixel, so ``S`` costs ``r`` small gathers and one LU: ``r = 3840`` for 64
  channels on 16×16 against ``n = 16384`` unknowns.
* :class:`DenseSquareInverse` and :class:`DenseGramInverse`: LU / Cholesky of the dense matrix
  for small operators.

Each exposes the inverse Gram on the operator's smaller side (:class:`GramInverse`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from deepscope.analysis.conv_operator import (
    ConvOperator,
    OperatorPadding,
    full_weight,
    layer_padding,
    pad_index,
)

__all__ = [
    "BoundaryCorrectedInverse",
    "CirculantConv",
    "DenseGramInverse",
    "DenseSquareInverse",
    "GramInverse",
    "square_same_conv",
]

_F64 = torch.float64


class GramInverse(Protocol):
    """``G⁻¹`` for the Gram ``G`` on the operator's smaller side (``AᵀA`` or ``AAᵀ``)."""

    #: ``"input"`` (``G = AᵀA`` on ``C_in × H × W``) or ``"output"`` (``G = AAᵀ``).
    side: str
    #: How the inverse is computed, for reports.
    method: str

    def apply(self, v: Tensor) -> Tensor:
        """``G⁻¹ v`` for a batch ``(b, *side_shape)``, float64."""
        ...


def _batched_inverse(blocks: Tensor) -> Tensor:
    """``inv`` of each matrix of ``(F, n, n)``.

    On the CPU, blocks of 128 and more are inverted one at a time: with several threads, the
    batched LU of the MKL build torch ships fails on them ("Parameter 6 was incorrect on entry
    to ZLASWP", seen with 12 blocks of 256×256 on 2 threads) while one matrix at a time works.
    """
    if blocks.device.type != "cpu" or blocks.shape[-1] < 128:
        batched: Tensor = torch.linalg.inv(blocks)
        return batched
    return torch.stack([torch.linalg.inv(block) for block in blocks])


def _fold_kernel(weight: Tensor, dilation: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """The dilated kernel ``(C_out, C_in, ·, ·)`` wrapped onto an ``H × W`` torus (taps that land
    on the same pixel modulo ``(H, W)`` add up)."""
    c_out, c_in, k_h, k_w = weight.shape
    d_h, d_w = dilation
    h, w = hw
    span_h, span_w = d_h * (k_h - 1) + 1, d_w * (k_w - 1) + 1
    n_h, n_w = -(-span_h // h), -(-span_w // w)
    dense = weight.new_zeros((c_out, c_in, n_h * h, n_w * w))
    dense[:, :, :span_h:d_h, :span_w:d_w] = weight
    return dense.reshape(c_out, c_in, n_h, h, n_w, w).sum(dim=(2, 4))


class CirculantConv:
    """The circular counterpart ``C`` of a stride-1 conv on ``C_in × H × W``, via the 2-D DFT.

    ``C x = conv(circular_pad(x, p))`` with the layer's kernel, dilation, groups and padding
    amount ``p`` (the amount only shifts the output, an orthogonal map). By the DFT,
    ``(Cx)^(f) = M(f) x̂(f)`` with ``M(f) = conj(K̂(f)) · e^{−2πi(f_h p_h/H + f_w p_w/W)}``
    (``C_out × C_in`` per frequency; ``K̂`` the DFT of the kernel folded onto the torus; the
    conjugate because conv2d correlates). Only the ``W//2 + 1`` non-redundant columns of
    frequencies are kept (real signals).

    Raises:
        ValueError: stride > 1, or an output size other than ``(H, W)``.
    """

    def __init__(self, op: ConvOperator) -> None:
        layer = op.layer
        c_in, h, w = op.in_shape
        c_out, out_h, out_w = op.out_shape
        if layer.stride != (1, 1) or (out_h, out_w) != (h, w):
            raise ValueError(
                f"layer {layer.name!r}: the circulant inverse needs a stride-1 conv with a "
                f"'same' output, got stride {layer.stride} and output {out_h}×{out_w} on {h}×{w}"
            )
        self.hw = (h, w)
        self.channels = (c_out, c_in)
        kernel = _fold_kernel(full_weight(layer).to(op.device), layer.dilation, (h, w))
        spectrum = torch.fft.rfft2(kernel, s=(h, w))  # (C_out, C_in, H, W//2+1)
        f_h = torch.fft.fftfreq(h, dtype=_F64, device=op.device)[:, None]
        f_w = torch.fft.rfftfreq(w, dtype=_F64, device=op.device)[None, :]
        p_h, p_w = layer.padding
        shift = torch.exp(-2j * math.pi * (f_h * p_h + f_w * p_w))
        # (F, C_out, C_in): one matrix per frequency, F = H·(W//2+1).
        self.blocks = (spectrum.conj() * shift).permute(2, 3, 0, 1).reshape(-1, c_out, c_in)
        self._inverse: Tensor | None = None

    def condition(self) -> float:
        """The largest condition number over the frequencies (``inf`` when some block is
        singular or the blocks are not square): ``cond(C)``."""
        if self.channels[0] != self.channels[1]:
            return math.inf
        s = torch.linalg.svdvals(self.blocks)
        smallest = float(s[:, -1].min())
        return math.inf if smallest == 0 else float(s[:, 0].max()) / smallest

    def _apply_blocks(self, x: Tensor, blocks: Tensor) -> Tensor:
        b, c = x.shape[:2]
        h, w = self.hw
        spectrum = torch.fft.rfft2(x)  # (B, C, H, Wf)
        flat = spectrum.permute(2, 3, 1, 0).reshape(blocks.shape[0], c, b)
        out = torch.bmm(blocks, flat)  # (F, C', B)
        out = out.reshape(h, -1, blocks.shape[1], b).permute(3, 2, 0, 1)
        result: Tensor = torch.fft.irfft2(out, s=(h, w))
        return result

    def apply(self, x: Tensor) -> Tensor:
        """``C x``: ``(B, C_in, H, W)`` → ``(B, C_out, H, W)``, float64."""
        return self._apply_blocks(x, self.blocks)

    def inverse_blocks(self) -> Tensor:
        """``M(f)⁻¹`` for every frequency ``(F, C_in, C_out)`` (square blocks only)."""
        if self._inverse is None:
            self._inverse = _batched_inverse(self.blocks)
        return self._inverse

    def solve(self, y: Tensor) -> Tensor:
        """``C⁻¹ y``: ``(B, C_out, H, W)`` → ``(B, C_in, H, W)``."""
        return self._apply_blocks(y, self.inverse_blocks())

    def solve_adjoint(self, x: Tensor) -> Tensor:
        """``C⁻ᵀ x``: ``(B, C_in, H, W)`` → ``(B, C_out, H, W)`` (``M(f)⁻ᴴ`` per frequency)."""
        return self._apply_blocks(x, self.inverse_blocks().mH)

    def green(self) -> Tensor:
        """``C⁻¹ e_{o, (0, 0)}`` for every output channel ``o``: ``(C_out, C_in, H, W)``.

        ``C`` commutes with circular shifts, so ``C⁻¹ e_{o, (i, j)}`` is this shifted by
        ``(i, j)``.
        """
        h, w = self.hw
        inverse = self.inverse_blocks()  # (F, C_in, C_out)
        spectrum = inverse.reshape(h, -1, *inverse.shape[1:]).permute(3, 2, 0, 1)
        result: Tensor = torch.fft.irfft2(spectrum, s=(h, w))
        return result


class BoundaryCorrectedInverse:
    """Exact ``A⁻¹`` of a square stride-1 "same" conv: circulant inverse plus boundary Woodbury.

    ``A`` (the layer with its own padding mode) equals ``C`` (:class:`CirculantConv`) except in
    the ``nb`` output pixels whose taps reach the padding; there ``(A − C)x`` reads only the
    border band of ``x``. With ``U`` embedding those pixels' ``r = C_out·nb`` rows and
    ``Ẽ = (A − C)`` restricted to them, ``A = C + UẼ``,
    ``A⁻¹ = C⁻¹ − C⁻¹U S⁻¹ Ẽ C⁻¹`` and ``A⁻ᵀ = C⁻ᵀ − C⁻ᵀẼᵀ S⁻ᵀ Uᵀ C⁻ᵀ``, with the ``r × r``
    capacitance ``S = I + Ẽ C⁻¹ U`` factored once (LU, float64). ``S`` is invertible iff ``A``
    is (given invertible ``C``).

    Cost: the channel sums of the Green's function with each tap (``k²·H·W·C_out²·C_in``
    multiply-adds), one ``C_out × C_out`` block gathered per (boundary pixel, wrapped tap,
    boundary pixel) triple, and one LU (``⅔r³``, which dominates: ~1 s for ``r = 3840``); each
    solve then costs two FFT solves, a boundary correction and two ``r × r`` triangular solves.
    Memory: ``S`` and its LU, ``2r²`` floats (1.6 GB each for 64 channels on 56×56).

    Raises:
        ValueError: not square, not stride 1 / "same", ``C`` numerically singular
            (``cond(C) > max_condition``), or ``r > max_boundary``.
    """

    side = "input"
    method = "boundary-corrected circulant inverse (Woodbury)"

    def __init__(
        self,
        op: ConvOperator,
        *,
        max_boundary: int = 16384,
        max_condition: float = 1e10,
    ) -> None:
        layer = op.layer
        if op.m != op.n or op.in_shape[0] != op.out_shape[0]:
            raise ValueError(
                f"layer {layer.name!r}: the boundary-corrected inverse needs a square map "
                f"(C_out = C_in, same output size), got {op.m}×{op.n}"
            )
        self.op = op
        self.circulant = CirculantConv(op)
        cond = self.circulant.condition()
        if not cond <= max_condition:
            raise ValueError(
                f"layer {layer.name!r}: its circular counterpart is numerically singular "
                f"(condition number {cond:.3g}); the boundary-corrected inverse needs it invertible"
            )
        _, h, w = op.in_shape
        c_out = op.out_shape[0]
        (k_h, k_w), (d_h, d_w), (p_h, p_w) = layer.kernel_size, layer.dilation, layer.padding
        after_h, after_w = d_h * (k_h - 1) - p_h, d_w * (k_w - 1) - p_w
        rows, cols = torch.meshgrid(
            torch.arange(h, device=op.device), torch.arange(w, device=op.device), indexing="ij"
        )
        border = (rows < p_h) | (rows >= h - after_h) | (cols < p_w) | (cols >= w - after_w)
        if op.padding is OperatorPadding.CIRCULAR:
            border &= False  # A = C: no correction
        self._bh, self._bw = rows[border], cols[border]
        nb = int(self._bh.numel())
        r = c_out * nb
        if r > max_boundary:
            raise ValueError(
                f"layer {layer.name!r}: {nb} boundary pixels × {c_out} channels = {r} boundary "
                f"unknowns, over the limit of {max_boundary}"
            )
        self.boundary = r
        if r == 0:
            self.method = "circulant inverse (FFT)"
        self._circular = ConvOperator(
            layer, (h, w), padding=OperatorPadding.CIRCULAR, device=op.device
        )
        self._pairs(op, (after_h, after_w))
        self._lu: tuple[Tensor, Tensor] | None = None
        if r:
            # LU of Sᵀ: solves with S use adjoint=True, solves with Sᵀ the plain one.
            self._lu = torch.linalg.lu_factor(self._capacitance_transposed())

    def _pairs(self, op: ConvOperator, after: tuple[int, int]) -> None:
        """The (boundary pixel, tap) pairs where the layer's pad and the circular pad read
        different input pixels: only there is ``(A − C)`` nonzero.

        Sets ``_pair_pixel`` (P,) the boundary pixel's index in ``0..nb``, ``_pair_weight``
        ``(P, C_out, C_in)`` the tap's weights, ``_pair_layer`` / ``_pair_circular`` (P,) the flat
        input pixel each pad reads (-1 for a zero), as (h, w) pairs too for shifted gathers.
        """
        layer = op.layer
        _, h, w = op.in_shape
        (k_h, k_w), (d_h, d_w), (p_h, p_w) = layer.kernel_size, layer.dilation, layer.padding
        dev = op.device
        mode = "zeros" if op.padding is OperatorPadding.ZERO else op.padding.value
        layer_h = pad_index(h, p_h, after[0], mode, dev)
        layer_w = pad_index(w, p_w, after[1], mode, dev)
        circ_h = pad_index(h, p_h, after[0], "circular", dev)
        circ_w = pad_index(w, p_w, after[1], "circular", dev)
        nb = int(self._bh.numel())
        # Padded coordinates each boundary output reads, (nb, k_h, k_w).
        q_h = (self._bh[:, None] + torch.arange(k_h, device=dev)[None, :] * d_h)[:, :, None]
        q_w = (self._bw[:, None] + torch.arange(k_w, device=dev)[None, :] * d_w)[:, None, :]
        q_h, q_w = q_h.expand(nb, k_h, k_w), q_w.expand(nb, k_h, k_w)
        lh, lw, ch, cw = layer_h[q_h], layer_w[q_w], circ_h[q_h], circ_w[q_w]
        zero = (lh < 0) | (lw < 0)
        differ = zero | (lh != ch) | (lw != cw)
        pixel, tap_h, tap_w = differ.nonzero(as_tuple=True)
        self._pair_pixel = pixel
        self._pair_tap = tap_h * k_w + tap_w
        weight = full_weight(layer).to(dev)
        self._pair_weight = weight[:, :, tap_h, tap_w].permute(2, 0, 1).contiguous()
        self._tap_weights = weight.flatten(2).permute(2, 0, 1).contiguous()  # (T, C_out, C_in)
        pick = (pixel, tap_h, tap_w)
        self._pair_zero = zero[pick]
        self._pair_layer_hw = (lh[pick].clamp_min(0), lw[pick].clamp_min(0))
        self._pair_circ_hw = (ch[pick], cw[pick])
        self._pair_layer = self._pair_layer_hw[0] * w + self._pair_layer_hw[1]
        self._pair_circ = self._pair_circ_hw[0] * w + self._pair_circ_hw[1]

    def _contract(self, patches: Tensor) -> Tensor:
        """``(P, C_in, B)`` pad differences → ``(B, C_out, nb)`` boundary outputs."""
        per_pair = torch.bmm(self._pair_weight, patches)  # (P, C_out, B)
        nb = int(self._bh.numel())
        out = per_pair.new_zeros((nb, *per_pair.shape[1:]))
        out.index_add_(0, self._pair_pixel, per_pair)
        return out.permute(2, 1, 0)

    def correction(self, u: Tensor) -> Tensor:
        """``Ẽ u = ((A − C) u)`` at the boundary pixels: ``(B, C_in, H, W)`` → ``(B, C_out, nb)``.

        Both pads agree inside the image, so only the (boundary pixel, tap) pairs where they read
        different pixels contribute: two gathers and one batched product per pair.
        """
        flat = u.flatten(2)  # (B, C_in, H·W)
        read = flat[:, :, self._pair_layer]
        if bool(self._pair_zero.any()):
            read = read.masked_fill(self._pair_zero, 0.0)
        diff = read - flat[:, :, self._pair_circ]  # (B, C_in, P)
        return self._contract(diff.permute(2, 1, 0))

    def _embed(self, z: Tensor) -> Tensor:
        c_out, h, w = self.op.out_shape
        out = z.new_zeros((z.shape[0], c_out, h, w))
        out[:, :, self._bh, self._bw] = z
        return out

    def _capacitance_transposed(self) -> Tensor:
        """``Sᵀ`` for ``S = I + Ẽ C⁻¹ U``.

        Column ``(o', j)`` of ``S`` is ``Ẽ`` applied to the Green's function ``g_{o'}`` shifted
        to boundary pixel ``j``. Pair ``p`` (boundary pixel ``i``, tap ``t``, reading pixel ``q``
        through the layer's pad and ``q'`` through the circular one) adds
        ``Σ_c w[o, c, t] (g[o', c, q − j] − g[o', c, q' − j])`` to entry ``((o, i), (o', j))``.
        The channel sums ``Z[t, δ] = w[:, :, t] g[:, :, δ]ᵀ`` (``C_out × C_out'`` for each tap and
        each of the ``H·W`` offsets) are computed once, so each entry block is two gathers.
        Built transposed (rows ``(o', j)``), each boundary pixel ``j`` filling a block of rows.
        """
        _, h, w = self.op.in_shape
        c_out = self.op.out_shape[0]
        nb = int(self._bh.numel())
        r = c_out * nb
        green = self.circulant.green()  # (C_out', C_in, H, W)
        flat = green.reshape(c_out, green.shape[1], h * w)  # (C_out', C_in, H·W)
        # (T, H·W + 1, C_out', C_out): offset-major, so that a pair's block is one contiguous
        # read; the extra offset is a zero for the taps that read zero padding.
        z = torch.einsum("toc,pcd->tdpo", self._tap_weights, flat)
        z = torch.cat((z, z.new_zeros((z.shape[0], 1, c_out, c_out))), dim=1)
        (lh, lw), (ch, cw) = self._pair_layer_hw, self._pair_circ_hw
        cap_t = torch.zeros((c_out, nb, c_out, nb), dtype=_F64, device=green.device)
        for j in range(nb):
            jh, jw = self._bh[j], self._bw[j]
            layer_off = (lh - jh).remainder(h) * w + (lw - jw).remainder(w)
            layer_off = layer_off.masked_fill(self._pair_zero, h * w)
            circ_off = (ch - jh).remainder(h) * w + (cw - jw).remainder(w)
            blocks = z[self._pair_tap, layer_off] - z[self._pair_tap, circ_off]  # (P, C', C)
            per_pixel = blocks.new_zeros((nb, c_out, c_out)).index_add_(
                0, self._pair_pixel, blocks
            )  # (i, o', o)
            cap_t[:, j] = per_pixel.permute(1, 2, 0)
        cap_t = cap_t.reshape(r, r)
        cap_t.diagonal().add_(1.0)
        return cap_t

    def solve(self, y: Tensor) -> Tensor:
        """``A⁻¹ y``: ``(B, C_out, H, W)`` → ``(B, C_in, H, W)``, float64."""
        u = self.circulant.solve(y)
        if self._lu is None:
            return u
        rhs = self.correction(u).reshape(u.shape[0], -1).T
        z = torch.linalg.lu_solve(*self._lu, rhs, adjoint=True).T
        z = z.reshape(u.shape[0], self.op.out_shape[0], -1)
        return u - self.circulant.solve(self._embed(z))

    def solve_adjoint(self, x: Tensor) -> Tensor:
        """``A⁻ᵀ x``: ``(B, C_in, H, W)`` → ``(B, C_out, H, W)``, float64."""
        v = self.circulant.solve_adjoint(x)
        if self._lu is None:
            return v
        rhs = v[:, :, self._bh, self._bw].reshape(v.shape[0], -1).T
        z = torch.linalg.lu_solve(*self._lu, rhs).T
        embedded = self._embed(z.reshape(v.shape[0], self.op.out_shape[0], -1))
        correction = self.op.adjoint(embedded) - self._circular.adjoint(embedded)
        return v - self.circulant.solve_adjoint(correction)

    def apply(self, v: Tensor) -> Tensor:
        """``(AᵀA)⁻¹ v = A⁻¹ A⁻ᵀ v`` on ``(B, C_in, H, W)``."""
        return self.solve(self.solve_adjoint(v))


class DenseSquareInverse:
    """``A⁻¹`` from the LU of a small square operator's dense matrix (float64).

    Raises:
        ValueError: the matrix is not square, or numerically singular (a zero pivot).
    """

    side = "input"
    method = "dense LU"

    def __init__(self, op: ConvOperator, matrix: Tensor) -> None:
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got {tuple(matrix.shape)}")
        self.op = op
        self._lu = torch.linalg.lu_factor(matrix)
        pivots = self._lu[0].diagonal().abs()
        if not bool((pivots > 0).all()):
            raise ValueError(f"layer {op.layer.name!r}: the operator is singular (zero pivot)")

    def solve(self, y: Tensor) -> Tensor:
        """``A⁻¹ y``: ``(B, *out_shape)`` → ``(B, *in_shape)``."""
        z: Tensor = torch.linalg.lu_solve(*self._lu, y.reshape(y.shape[0], -1).T)
        return z.T.reshape(y.shape[0], *self.op.in_shape)

    def solve_adjoint(self, x: Tensor) -> Tensor:
        """``A⁻ᵀ x``: ``(B, *in_shape)`` → ``(B, *out_shape)``."""
        z: Tensor = torch.linalg.lu_solve(*self._lu, x.reshape(x.shape[0], -1).T, adjoint=True)
        return z.T.reshape(x.shape[0], *self.op.out_shape)

    def apply(self, v: Tensor) -> Tensor:
        """``(AᵀA)⁻¹ v = A⁻¹ A⁻ᵀ v``."""
        return self.solve(self.solve_adjoint(v))


class DenseGramInverse:
    """``G⁻¹`` from the Cholesky factor of the smaller-side Gram of a dense matrix (float64).

    ``keep`` (bool, the side's shape) restricts ``G`` to the entries that are not structurally
    zero (unread inputs or empty outputs), where it can be positive definite; the others map to 0.

    Raises:
        ValueError: ``G`` is not numerically positive definite on ``keep``.
    """

    method = "dense Cholesky"

    def __init__(
        self, op: ConvOperator, matrix: Tensor, side: str, keep: Tensor | None = None
    ) -> None:
        self.op = op
        self.side = side
        shape = op.in_shape if side == "input" else op.out_shape
        self._shape = shape
        size = matrix.shape[1] if side == "input" else matrix.shape[0]
        flat_keep = (
            torch.ones(size, dtype=torch.bool, device=matrix.device)
            if keep is None
            else keep.reshape(-1).to(matrix.device)
        )
        self._keep = flat_keep
        # Drop the excluded entries before the product: they would only add zero rows.
        kept = matrix[:, flat_keep] if side == "input" else matrix[flat_keep]
        gram = kept.T @ kept if side == "input" else kept @ kept.T
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            raise ValueError(
                f"layer {op.layer.name!r}: its {side}-side Gram is not positive definite"
            )
        self._factor = factor

    def apply(self, v: Tensor) -> Tensor:
        """``G⁻¹ v`` on ``(B, *side_shape)`` (0 on the excluded entries)."""
        flat = v.reshape(v.shape[0], -1)
        out = torch.zeros_like(flat)
        out[:, self._keep] = torch.cholesky_solve(flat[:, self._keep].T, self._factor).T
        return out.reshape(v.shape[0], *self._shape)


def square_same_conv(op: ConvOperator) -> bool:
    """The operator is square with stride 1 and a "same" output (the Woodbury inverse applies)."""
    layer = op.layer
    return (
        op.m == op.n
        and op.in_shape[0] == op.out_shape[0]
        and layer.stride == (1, 1)
        and op.in_shape[1:] == op.out_shape[1:]
        and layer_padding(layer).circular_shaped
    )
