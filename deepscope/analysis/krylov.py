"""Matrix-free Krylov methods on batches of tensors: block Lanczos and batched CG.

Both work on vectors stored as tensors of any shape ``(b, *shape)`` (``b`` vectors at once, so a
convolution applies to a whole block in one call) on any device, in the dtype of the vectors. The
operators are symmetric positive semi-definite callables ``op(X) -> (b, *shape)``: a Gram
``AᵀA``/``AAᵀ`` or the inverse of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Operator", "RitzPairs", "batched_cg", "block_lanczos", "sq_norms"]

#: A linear map on a block of vectors ``(b, *shape) -> (b, *shape)``.
Operator = Callable[[Tensor], Tensor]


def sq_norms(t: Tensor) -> Tensor:
    """``(b,)`` squared norms over all but the first axis."""
    return t.flatten(1).pow(2).sum(dim=1)


def _dots(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(dim=1)


@dataclass(frozen=True)
class RitzPairs:
    """Ritz values and vectors of a symmetric operator from :func:`block_lanczos`.

    Attributes:
        values: ``(j,)`` ascending Ritz values.
        vectors: ``(j, *shape)`` unit Ritz vectors, in the order of ``values``.
        residuals: ``(j,)`` ``‖op(v) − θ v‖`` from the recurrence (cheap, accurate to rounding
            while the basis is orthogonal): by Bauer–Fike some eigenvalue of ``op`` lies within
            it of ``θ``.
        steps: block steps run.
        converged: the wanted Ritz values met the tolerance.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    steps: int
    converged: bool


def _orthonormalize(
    w: Tensor, basis: Tensor, generator: torch.Generator | None, space: int | None = None
) -> Tensor:
    """Rows of ``w`` ``(b, N)`` orthonormal and orthogonal to ``basis`` ``(j, N)`` rows.

    Two passes of block Gram–Schmidt then a QR; a row that vanishes (the block is rank
    deficient: an invariant subspace was found) is replaced by a fresh random direction so that
    the block keeps its size, as far as the space allows: with ``space`` (the dimension of the
    space the rows live in) at most ``space − j`` rows come back, since no more directions
    orthogonal to the basis exist (a fresh one would be rounding noise, not orthogonal); the
    caller also passes a smaller ``space`` to cap the basis.
    """
    for _ in range(2):
        if basis.shape[0]:
            w = w - (w @ basis.T) @ basis
    q, r = torch.linalg.qr(w.T)
    scale = w.norm(dim=1).max().clamp_min(1e-300)
    dead = r.diagonal().abs() <= 1e-10 * scale
    room = w.shape[0] if space is None else space - basis.shape[0]
    if room < w.shape[0]:
        # The end of the space: keep the surviving directions only, at most ``room``.
        kept: Tensor = q.T[~dead][: max(room, 0)].contiguous()
        return kept
    if bool(dead.any()):
        fresh = torch.randn(
            int(dead.sum()), w.shape[1], generator=generator, dtype=w.dtype, device="cpu"
        ).to(w.device)
        rows: Tensor = q.T.clone()
        both = torch.cat((basis, rows[~dead]))
        for _ in range(2):
            fresh = fresh - (fresh @ both.T) @ both
        rows[dead] = torch.linalg.qr(fresh.T).Q.T
        return rows
    rows = q.T.contiguous()
    return rows


def block_lanczos(
    op: Operator,
    shape: tuple[int, ...],
    *,
    k: int,
    which: str,
    block: int,
    tol: float,
    max_vectors: int,
    dtype: torch.dtype,
    device: torch.device,
    mask: Tensor | None = None,
    seed: int = 0,
) -> RitzPairs:
    """Extreme eigenpairs of a symmetric operator by block Lanczos with full reorthogonalization.

    The Krylov basis ``V`` (up to ``max_vectors`` vectors of ``prod(shape)`` entries) is kept,
    and each new block is orthogonalized against all of it twice, so the projected matrix
    ``H = Vᵀ op V`` stays exact to rounding and no ghost copies of converged values appear.
    Blocks (rather than one vector) resolve clustered and repeated eigenvalues, which convolution
    operators have (conjugate frequency pairs).

    Args:
        op: the symmetric operator, ``(b, *shape) -> (b, *shape)``.
        shape: the shape of one vector.
        k: how many eigenvalues are wanted at the end(s) named by ``which``.
        which: ``"largest"``, ``"smallest"`` or ``"both"`` (``k`` at each end).
        block: vectors per step.
        tol: converged when every wanted Ritz value's residual is at most ``tol·max|θ|`` at the
            top and ``tol·|θ|`` at the bottom (each small value to its own relative accuracy).
        max_vectors: cap on the basis (memory: ``max_vectors·prod(shape)`` entries).
        dtype, device: of the vectors.
        mask: ``(*shape)`` 0/1: the subspace to work in (its complement is a known null space
            of ``op``); None for all of the space.
        seed: for the random start block (reproducible results).

    Returns:
        The wanted Ritz pairs (``k`` or ``2k``, fewer if the space is smaller), ascending.
    """
    n = math.prod(shape)
    dim = n if mask is None else int(mask.count_nonzero())
    block = max(1, min(block, dim))
    cap = max(block, min(max_vectors, dim))
    flat_mask = None if mask is None else mask.reshape(1, n).to(dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(block, n, generator=generator, dtype=dtype).to(device)
    if flat_mask is not None:
        start = start * flat_mask
    # Basis and projected matrix grow by doubling: most runs stop far below the cap.
    room = min(cap, 8 * block) + block
    basis = torch.empty(room, n, dtype=dtype, device=device)
    projected = torch.zeros(room, room, dtype=dtype, device=device)
    q = _orthonormalize(start, basis[:0], generator)
    if flat_mask is not None:
        q = q * flat_mask
    basis[:block] = q
    used = block
    steps = 0
    next_check = 1
    converged = False
    values = vectors_h = residuals = torch.empty(0, dtype=dtype, device=device)
    while True:
        w = op(q.reshape(q.shape[0], *shape)).reshape(q.shape[0], n)
        if flat_mask is not None:
            w = w * flat_mask
        v = basis[:used]
        coeff = w @ v.T  # (b, used): row i is column block of H
        w = w - coeff @ v
        again = w @ v.T
        w = w - again @ v
        coeff = coeff + again
        lo = used - q.shape[0]
        projected[:used, lo:used] = coeff.T
        projected[lo:used, :used] = coeff
        steps += 1
        # The last block may be smaller than the others: the basis fills the cap exactly
        # (a whole space of 384 with blocks of 5 would otherwise stop at 380, inexact).
        last = used >= cap
        if last:
            # The residual block's R factor: the basis ends here, but its Ritz residuals are
            # ‖R y‖ all the same (zero only when the basis spans the whole space).
            coupling = torch.linalg.qr(w.T).R
            nxt = None
        else:
            nxt = _orthonormalize(w, v, generator, cap)
            if flat_mask is not None:
                nxt = nxt * flat_mask
            if nxt.shape[0] == 0:
                coupling = torch.linalg.qr(w.T).R
                nxt = None
            else:
                coupling = nxt @ w.T  # (b_next, b): the block's R factor
        # The projected eigenproblem costs O(used³): solve it on a sparse schedule (every step
        # at first, then about every eighth of the steps so far), and always at the end.
        if last or nxt is None or steps >= next_check:
            next_check = steps + max(1, steps // 8)
            h = projected[:used, :used]
            theta, y = torch.linalg.eigh((h + h.T) / 2)
            res = (coupling @ y[lo:used]).norm(dim=0)
            wanted = _wanted(theta.shape[0], k, which)
            scale = float(theta.abs().max()) if theta.numel() else 0.0
            values, vectors_h, residuals = theta[wanted], y[:, wanted], res[wanted]
            enough = theta.shape[0] >= min(dim, _needed(k, which))
            bottom = _bottom_end(values.shape[0], k, which).to(values.device)
            limit = torch.where(bottom, tol * values.abs(), tol * scale)
            if enough and bool((residuals <= limit).all()):
                converged = True
                break
        if last or nxt is None:
            # A basis of the whole (masked) space is exact whatever the residual says.
            converged = used >= dim
            break
        if used + 2 * block > basis.shape[0]:
            room = min(cap, 2 * basis.shape[0]) + block
            grown = torch.empty(room, n, dtype=dtype, device=device)
            grown[:used] = basis[:used]
            basis = grown
            bigger = torch.zeros(room, room, dtype=dtype, device=device)
            bigger[:used, :used] = projected[:used, :used]
            projected = bigger
        basis[used : used + nxt.shape[0]] = nxt
        projected[used : used + nxt.shape[0], lo:used] = coupling
        projected[lo:used, used : used + nxt.shape[0]] = coupling.T
        used += nxt.shape[0]
        q = nxt
    ritz = (vectors_h.T @ basis[: vectors_h.shape[0]]).reshape(-1, *shape)
    return RitzPairs(values, ritz, residuals, steps, converged)


def _needed(k: int, which: str) -> int:
    return 2 * k if which == "both" else k


def _bottom_end(count: int, k: int, which: str) -> Tensor:
    """Which of the ``count`` wanted Ritz values (ascending) belong to the bottom end."""
    if which == "largest":
        return torch.zeros(count, dtype=torch.bool)
    if which == "smallest":
        return torch.ones(count, dtype=torch.bool)
    return torch.arange(count) < min(k, count - min(k, count // 2))


def _wanted(count: int, k: int, which: str) -> Tensor:
    idx = torch.arange(count)
    if which == "largest":
        return idx[max(0, count - k) :]
    if which == "smallest":
        return idx[: min(k, count)]
    if which == "both":
        if count <= 2 * k:
            return idx
        return torch.cat((idx[:k], idx[count - k :]))
    raise ValueError(f"which must be largest, smallest or both, got {which!r}")


def batched_cg(
    op: Operator,
    b: Tensor,
    *,
    rtol: Tensor | float,
    max_iter: int,
    precondition: Operator | None = None,
) -> tuple[Tensor, int]:
    """Solve ``op(x) = b`` for every sample of ``b`` ``(B, ...)`` by (preconditioned) CG.

    Each sample has its own step sizes and stops once its residual ``‖b − op(x)‖`` (from the
    recurrence) is at most ``rtol·‖b‖`` (``rtol`` a float or ``(B,)``); finished samples keep
    their iterate. Started at 0, so for a consistent singular ``op`` the iterates stay in its
    range. Runs in the dtype of ``b``.

    Returns:
        ``(x, iterations)``, iterations the most over the batch.
    """
    per = (-1,) + (1,) * (b.dim() - 1)
    x = torch.zeros_like(b)
    r = b.clone()
    z = precondition(r) if precondition is not None else r
    d = z.clone()
    rz = _dots(r, z)
    limit = torch.as_tensor(rtol, dtype=b.dtype, device=b.device) ** 2 * sq_norms(b)
    active = sq_norms(r) > limit
    iterations = 0
    while iterations < max_iter and bool(active.any()):
        q = op(d)
        dq = _dots(d, q)
        alpha = torch.where(active & (dq > 0), rz / dq.clamp_min(1e-300), 0.0)
        x.addcmul_(d, alpha.view(per))
        r.addcmul_(q, alpha.view(per), value=-1.0)
        del q
        active = active & (sq_norms(r) > limit)
        iterations += 1
        z = precondition(r) if precondition is not None else r
        rz_new = _dots(r, z)
        beta = torch.where(active, rz_new / rz.clamp_min(1e-300), 0.0)
        d = z + d * beta.view(per)
        rz = torch.where(active, rz_new, rz)
    return x, iterations
