"""The operator view with the layer's real boundary: padding, matrices, exact inverses, spectra.

Every reference matrix here is built independently of the code under test: ``F.conv2d`` (or the
``nn.Conv2d`` module itself) applied to each basis vector of ``C_in × H × W``, decomposed by
``numpy.linalg.svd``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from deepscope.analysis.conv_operator import (
    ConvOperator,
    OperatorPadding,
    dense_operator_matrix,
    layer_padding,
    operator_padding_note,
    resolve_operator_padding,
)
from deepscope.analysis.krylov import batched_cg, block_lanczos
from deepscope.analysis.layers import LayerKind, WeightLayer, layer_from_module, weight_layers
from deepscope.analysis.operator_spectrum import (
    SpectrumMethod,
    conv_operator_spectrum,
    operator_spectrum_metrics,
)
from deepscope.analysis.precondition import (
    BoundaryCorrectedInverse,
    CirculantConv,
    DenseSquareInverse,
)
from deepscope.analysis.signal_space import (
    ConvView,
    conv_operator_singular_values,
    layer_spectrum_metrics,
    signal_space,
)

F64 = torch.float64


def _module(seed: int = 0, **kwargs: Any) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(bias=False, **kwargs).double()
    return conv


def _layer(conv: nn.Conv2d, name: str = "conv") -> WeightLayer:
    layer = layer_from_module(name, conv)
    assert layer is not None
    return layer


def _probed(conv: nn.Conv2d, hw: tuple[int, int]) -> Tensor:
    """The module's matrix, column j = conv(e_j): the reference, independent of the code."""
    n = conv.in_channels * hw[0] * hw[1]
    basis = torch.eye(n, dtype=F64).reshape(n, conv.in_channels, *hw)
    with torch.no_grad():
        out = conv(basis)
    return out.reshape(n, -1).T


def _reference_values(conv: nn.Conv2d, hw: tuple[int, int]) -> np.ndarray:
    values: np.ndarray = np.linalg.svd(_probed(conv, hw).numpy(), compute_uv=False)
    return values


# --- the layer's own boundary -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "mode", "shaped"),
    [
        ({"kernel_size": 3, "padding": 1}, OperatorPadding.ZERO, True),
        ({"kernel_size": 7, "stride": 2, "padding": 3}, OperatorPadding.ZERO, True),
        ({"kernel_size": 1, "stride": 2}, OperatorPadding.ZERO, True),
        ({"kernel_size": 4, "stride": 2, "padding": 1}, OperatorPadding.ZERO, True),
        ({"kernel_size": 3}, OperatorPadding.ZERO, False),  # "valid": output H − 2
        ({"kernel_size": 3, "padding": 2}, OperatorPadding.ZERO, False),  # output H + 2
        (
            {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
            OperatorPadding.CIRCULAR,
            True,
        ),
        (
            {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
            OperatorPadding.REFLECT,
            True,
        ),
        (
            {"kernel_size": 5, "padding": 1, "padding_mode": "replicate"},
            OperatorPadding.REPLICATE,
            False,
        ),
    ],
)
def test_layer_padding(kwargs: dict[str, Any], mode: OperatorPadding, shaped: bool) -> None:
    layer = _layer(_module(in_channels=2, out_channels=3, **kwargs))
    own = layer_padding(layer)
    assert own.mode is mode
    assert own.padding_mode == kwargs.get("padding_mode", "zeros")
    assert own.amount == (kwargs.get("padding", 0),) * 2
    assert own.circular_shaped is shaped
    assert own.describe().startswith(mode.value)
    # The layer's own padding is the default boundary.
    assert resolve_operator_padding(layer, None, (8, 8)) is mode


def test_padding_errors_are_readable() -> None:
    valid = _layer(_module(in_channels=2, out_channels=3, kernel_size=3))
    with pytest.raises(ValueError, match=r"maps a 8×8 input to 6×6.*not this layer's map"):
        resolve_operator_padding(valid, "circular", (8, 8))
    with pytest.raises(ValueError, match="not this layer's map"):
        conv_operator_spectrum(valid, (8, 8), "circular")
    with pytest.raises(ValueError, match="not this layer's map"):
        signal_space([valid], ConvView.OPERATOR, {"conv": (8, 8)})
    same = _layer(_module(in_channels=2, out_channels=3, kernel_size=3, padding=1, stride=2))
    with pytest.raises(ValueError, match="not divisible by the stride"):
        resolve_operator_padding(same, "circular", (7, 8))
    with pytest.raises(ValueError, match="valid paddings are: circular, zero, reflect"):
        resolve_operator_padding(same, "mirror", (8, 8))
    with pytest.raises(ValueError, match=r"reflect padding .* needs an input larger"):
        resolve_operator_padding(same, "reflect", (1, 8))
    with pytest.raises(ValueError, match="output would be empty"):
        conv_operator_spectrum(valid, (2, 2))
    with pytest.raises(ValueError, match="not a conv2d layer"):
        layer_padding(WeightLayer("fc", LayerKind.LINEAR, torch.ones(2, 3)))
    with pytest.raises(ValueError, match="fft method is exact for the circular boundary only"):
        conv_operator_spectrum(same, (8, 8), "zero", method="fft")
    with pytest.raises(ValueError, match="unknown method"):
        conv_operator_spectrum(same, (8, 8), method="qr")
    with pytest.raises(ValueError, match="k must be at least 1"):
        conv_operator_spectrum(same, (8, 8), k=0)
    with pytest.raises(ValueError, match="over the limit of 100 entries"):
        conv_operator_spectrum(same, (8, 8), "zero", method="dense", max_dense_entries=100)
    with pytest.raises(ValueError, match="too large for a Lanczos basis"):
        conv_operator_spectrum(same, (8, 8), "zero", method="extremes", lanczos_entries=100)


def test_padding_note_only_for_another_boundary() -> None:
    layer = _layer(_module(in_channels=2, out_channels=3, kernel_size=3, padding=1))
    assert operator_padding_note(layer, "zero") is None
    note = operator_padding_note(layer, "circular")
    assert note is not None and "zero padding 1×1" in note and "circular" in note


# --- the operator and its matrix ----------------------------------------------------------------

GEOMETRIES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 0},
    {"kernel_size": 3, "padding": 2},
    {"kernel_size": 3, "padding": 1, "stride": 2},
    {"kernel_size": 3, "padding": 2, "dilation": 2},
    {"kernel_size": 3, "padding": 1, "groups": 2},
    {"kernel_size": 1, "stride": 2},
    {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
    {"kernel_size": 3, "padding": 2, "stride": 2, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 3, "padding_mode": "replicate"},
]


def _ids(geometry: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in geometry.items())


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
def test_operator_and_dense_matrix_are_the_module(geometry: dict[str, Any]) -> None:
    conv = _module(1, in_channels=4, out_channels=6, **geometry)
    hw = (5, 6)
    layer = _layer(conv)
    reference = _probed(conv, hw)
    torch.testing.assert_close(dense_operator_matrix(layer, hw), reference, rtol=0, atol=1e-15)
    op = ConvOperator(layer, hw)
    x = torch.randn(3, 4, *hw, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(op.forward(x), conv(x))
    # The adjoint is the vector-Jacobian product (autograd, independent of conv2d_input).
    y = torch.randn(3, *op.out_shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    xr = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(conv(xr), xr, y)
    torch.testing.assert_close(op.adjoint(y), vjp)
    zero_rows, zero_cols = op.structural_zeros()
    assert torch.equal(zero_cols.reshape(-1), reference.abs().sum(0) == 0)
    assert torch.equal(zero_rows.reshape(-1), reference.abs().sum(1) == 0)
    assert op.norm_upper_bound() >= float(torch.linalg.matrix_norm(reference, 2))


# --- exact inverses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "geometry",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "padding": 2, "dilation": 2},
        {"kernel_size": 3, "padding": 1, "groups": 2},
        {"kernel_size": 5, "padding": 2},  # 5×5 on 4×4: the kernel is wider than the input
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "replicate"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
    ],
    ids=_ids,
)
def test_boundary_corrected_inverse_solves_exactly(geometry: dict[str, Any]) -> None:
    conv = _module(4, in_channels=4, out_channels=4, **geometry)
    hw = (4, 4) if geometry["kernel_size"] == 5 else (6, 7)
    layer = _layer(conv)
    op = ConvOperator(layer, hw)
    matrix = _probed(conv, hw)
    circulant = CirculantConv(op)
    x = torch.randn(2, 4, *hw, dtype=F64, generator=torch.Generator().manual_seed(5))
    circular = ConvOperator(layer, hw, padding="circular")
    torch.testing.assert_close(circulant.apply(x), circular.forward(x))
    inverse = BoundaryCorrectedInverse(op)
    assert inverse.boundary == (
        0 if geometry.get("padding_mode") == "circular" else inverse.boundary
    )
    y = torch.randn(2, *op.out_shape, dtype=F64, generator=torch.Generator().manual_seed(6))
    expected = torch.linalg.solve(matrix, y.reshape(2, -1).T).T.reshape(x.shape)
    scale = float(expected.abs().max())
    torch.testing.assert_close(inverse.solve(y), expected, rtol=0, atol=1e-9 * scale)
    expected_t = torch.linalg.solve(matrix.T, x.reshape(2, -1).T).T.reshape(y.shape)
    scale_t = float(expected_t.abs().max())
    torch.testing.assert_close(inverse.solve_adjoint(x), expected_t, rtol=0, atol=1e-9 * scale_t)
    dense = DenseSquareInverse(op, matrix)
    torch.testing.assert_close(dense.apply(x), inverse.apply(x), rtol=1e-8, atol=0)


def test_boundary_corrected_inverse_refuses_what_it_cannot_do() -> None:
    strided = _layer(_module(in_channels=4, out_channels=4, kernel_size=3, padding=1, stride=2))
    with pytest.raises(ValueError, match="needs a square map"):
        BoundaryCorrectedInverse(ConvOperator(strided, (6, 6)))
    square = _layer(_module(in_channels=4, out_channels=4, kernel_size=3, padding=1))
    with pytest.raises(ValueError, match="over the limit of 10"):
        BoundaryCorrectedInverse(ConvOperator(square, (6, 6)), max_boundary=10)
    flat = _module(in_channels=2, out_channels=2, kernel_size=3, padding=1)
    with torch.no_grad():
        flat.weight.zero_()
        flat.weight[:, :, 1, 1] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # singular everywhere
    with pytest.raises(ValueError, match="numerically singular"):
        BoundaryCorrectedInverse(ConvOperator(_layer(flat), (6, 6)))


# --- spectra ------------------------------------------------------------------------------------

ZERO_CASES = [
    {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1, "stride": 2},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, "groups": 2},
    {"in_channels": 3, "out_channels": 3, "kernel_size": 3, "padding": 2, "dilation": 2},
    {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "padding": 0},
    {"in_channels": 3, "out_channels": 2, "kernel_size": 3, "padding": 2},
    {"in_channels": 2, "out_channels": 3, "kernel_size": 7, "padding": 3, "stride": 2},
]


@pytest.mark.parametrize("kwargs", ZERO_CASES, ids=_ids)
def test_zero_padded_values_match_dense(kwargs: dict[str, Any]) -> None:
    conv = _module(7, **kwargs)
    hw = (8, 6)
    layer = _layer(conv)
    expected = torch.from_numpy(_reference_values(conv, hw))
    spec = conv_operator_spectrum(layer, hw)  # the layer's own: zero
    assert spec.padding is OperatorPadding.ZERO and spec.note is None
    assert spec.method is SpectrumMethod.DENSE and spec.complete and spec.converged
    m, n = spec.matrix_shape
    assert (m, n) == tuple(_probed(conv, hw).shape)
    assert spec.singular_values is not None
    torch.testing.assert_close(spec.singular_values, expected, rtol=1e-6, atol=1e-12)
    assert spec.sigma_max == pytest.approx(float(expected[0]), rel=1e-6)
    assert spec.sigma_min == pytest.approx(float(expected[-1]), rel=1e-6)
    assert spec.frobenius_norm == pytest.approx(float(expected.pow(2).sum().sqrt()), rel=1e-9)
    (ls,) = signal_space([layer], ConvView.OPERATOR, {"conv": hw}, operator_padding="zero")
    assert ls.matrix_shape == (m, n) and ls.padding is OperatorPadding.ZERO
    torch.testing.assert_close(ls.stats.singular_values, expected, rtol=1e-6, atol=1e-12)
    metrics = layer_spectrum_metrics(ls)
    assert metrics["padding"] == "zero" and metrics["padding_note"] is None


EXTREME_CASES = [
    # square stride 1: the smallest values by shift-invert with the boundary-corrected inverse
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1},
    {
        "in_channels": 8,
        "out_channels": 8,
        "kernel_size": 3,
        "padding": 1,
        "padding_mode": "reflect",
    },
    {
        "in_channels": 8,
        "out_channels": 8,
        "kernel_size": 3,
        "padding": 2,
        "dilation": 2,
        "groups": 2,
    },
    # rectangular: Lanczos on the smaller Gram
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 1, "stride": 2},
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 0},
    {"in_channels": 8, "out_channels": 16, "kernel_size": 1, "stride": 2},  # structural zeros
]


@pytest.mark.parametrize("kwargs", EXTREME_CASES, ids=_ids)
def test_extremes_match_dense(kwargs: dict[str, Any]) -> None:
    conv = _module(8, **kwargs)
    hw = (12, 12)
    layer = _layer(conv)
    expected = torch.from_numpy(_reference_values(conv, hw))
    k = 4
    # max_dense=64 forces the matrix-free route on this 1152-unknown operator.
    spec = conv_operator_spectrum(layer, hw, k=k, method="extremes", max_dense=64)
    assert spec.method is SpectrumMethod.EXTREMES and not spec.complete and spec.converged
    assert spec.singular_values is None
    assert spec.matrix_shape == tuple(_probed(conv, hw).shape)
    top = expected[:k]
    torch.testing.assert_close(spec.largest, top, rtol=1e-6, atol=0)
    # The bounds hold up to the reference's own rounding (~n·eps·σ_max for LAPACK's SVD).
    slack = 1152 * 2.3e-16 * float(top[0])
    assert bool(((spec.largest - top).abs() <= spec.largest_error + slack).all())
    bottom = expected.flip(0)[:k]
    if spec.structural_zeros:
        # 1×1 stride 2 reads 1 pixel in 4: of the min(16·36, 8·144) values, all but the
        # 8·36 of the read pixels are exactly 0.
        assert spec.structural_zeros == 16 * 36 - 8 * 36
        assert torch.equal(spec.smallest, torch.zeros(k, dtype=F64))
        assert float(bottom.max()) < 1e-12 * float(top[0])
    else:
        torch.testing.assert_close(spec.smallest, bottom, rtol=1e-6, atol=0)
        assert bool(((spec.smallest - bottom).abs() <= spec.smallest_error + slack).all())
    if layer.stride == (1, 1) and spec.matrix_shape[0] == spec.matrix_shape[1]:
        assert "boundary-corrected" in spec.detail
    assert spec.condition_number == pytest.approx(
        float(top[0] / bottom[0]) if not spec.structural_zeros else math.inf, rel=1e-6
    )
    frob = spec.frobenius_norm
    if frob is not None:
        assert frob == pytest.approx(float(expected.pow(2).sum().sqrt()), rel=1e-9)
    json.dumps(operator_spectrum_metrics(spec), allow_nan=False)


def test_square_extremes_from_dense_lu_when_small() -> None:
    conv = _module(9, in_channels=4, out_channels=4, kernel_size=3, padding=1)
    spec = conv_operator_spectrum(_layer(conv), (6, 6), k=3, method="extremes")
    assert "dense LU" in spec.detail
    expected = torch.from_numpy(_reference_values(conv, (6, 6)))
    torch.testing.assert_close(spec.smallest, expected.flip(0)[:3], rtol=1e-6, atol=0)


def test_resnet18_layer3_conv1_zero_and_circular() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    layer = next(la for la in weight_layers(model) if la.name == "layer3.0.conv1")
    module = model.layer3[0].conv1.double()
    zero = conv_operator_spectrum(layer, (2, 2))
    expected = torch.from_numpy(_reference_values(module, (2, 2)))
    assert zero.matrix_shape == (256, 512)
    assert zero.singular_values is not None
    torch.testing.assert_close(zero.singular_values, expected, rtol=1e-6, atol=1e-12)
    circular = conv_operator_spectrum(layer, (2, 2), "circular")
    assert circular.method is SpectrumMethod.FFT and circular.note is not None
    assert circular.singular_values is not None
    torch.testing.assert_close(
        circular.singular_values, conv_operator_singular_values(layer, (2, 2)).cpu()
    )
    # The border matters at 2×2: ~1.13 zero-padded against ~1.8 circular.
    assert zero.sigma_max == pytest.approx(1.13, abs=0.05)
    assert circular.sigma_max == pytest.approx(1.8, abs=0.1)


def test_signal_space_own_padding_and_limits() -> None:
    conv = _module(10, in_channels=3, out_channels=4, kernel_size=3, padding=1)
    layer = _layer(conv)
    hw = {"conv": (6, 6)}
    (own,) = signal_space([layer], ConvView.OPERATOR, hw, operator_padding=None)
    (circ,) = signal_space([layer], ConvView.OPERATOR, hw)
    assert own.padding is OperatorPadding.ZERO and own.note is None
    assert circ.padding is OperatorPadding.CIRCULAR and circ.note is not None
    expected = torch.from_numpy(_reference_values(conv, (6, 6)))
    torch.testing.assert_close(own.stats.singular_values, expected, rtol=1e-6, atol=1e-12)
    # Over the dense limit: the extremes only (Lanczos), a partial spectrum.
    (partial,) = signal_space([layer], ConvView.OPERATOR, hw, operator_padding="zero", max_dense=10)
    assert partial.stats is None and partial.extremes is not None and not partial.complete
    torch.testing.assert_close(partial.extremes.largest[:3], expected[:3], rtol=1e-6, atol=0)
    (kernels,) = signal_space([layer], ConvView.KERNELS)
    assert kernels.padding is None and "padding" not in layer_spectrum_metrics(kernels)


# --- Krylov building blocks ---------------------------------------------------------------------


def test_block_lanczos_finds_clustered_extremes() -> None:
    values = torch.cat(
        (torch.tensor([1e-4, 1e-4, 2e-3]), torch.linspace(0.1, 1, 200), torch.tensor([5.0, 5.0]))
    ).to(F64)
    diag = values.reshape(1, -1)

    def op(x: Tensor) -> Tensor:
        return x * diag

    top = block_lanczos(
        op,
        (values.numel(),),
        k=2,
        which="largest",
        block=3,
        tol=1e-12,
        max_vectors=205,
        dtype=F64,
        device=torch.device("cpu"),
    )
    assert top.converged
    torch.testing.assert_close(top.values, torch.tensor([5.0, 5.0], dtype=F64))
    both = block_lanczos(
        op,
        (values.numel(),),
        k=3,
        which="both",
        block=3,
        tol=1e-12,
        max_vectors=205,
        dtype=F64,
        device=torch.device("cpu"),
    )
    torch.testing.assert_close(both.values[:3], values[:3], rtol=1e-8, atol=0)


def test_batched_cg_per_sample() -> None:
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=F64, generator=gen))
    spd = (q * torch.linspace(1, 100, 30, dtype=F64)) @ q.T

    def op(x: Tensor) -> Tensor:
        return x @ spd

    b = torch.randn(3, 30, dtype=F64, generator=gen)
    b[1] = 0
    x, iterations = batched_cg(op, b, rtol=1e-12, max_iter=200)
    torch.testing.assert_close(x @ spd, b, rtol=0, atol=1e-9)
    assert torch.equal(x[1], torch.zeros(30, dtype=F64))
    assert 0 < iterations <= 60
