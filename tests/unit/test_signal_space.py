"""Known answers for deepscope.analysis.signal_space."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from deepscope.analysis.layers import LayerKind, WeightLayer, layer_from_module, weight_layers
from deepscope.analysis.signal_space import (
    ConvView,
    conv_input_hw,
    conv_operator_singular_values,
    layer_matrix,
    layer_spectrum_metrics,
    signal_space,
    spectrum_stats,
    top_singular_directions,
)


def _orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    signed: Tensor = q * torch.sign(torch.diagonal(r))
    return signed


def _linear(weight: Tensor, name: str = "fc") -> WeightLayer:
    return WeightLayer(name, LayerKind.LINEAR, weight)


def _conv(
    weight: Tensor,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    name: str = "conv",
) -> WeightLayer:
    return WeightLayer(
        name,
        LayerKind.CONV2D,
        weight,
        stride=(stride, stride),
        dilation=(dilation, dilation),
        groups=groups,
    )


def _circular_operator(layer: WeightLayer, hw: tuple[int, int]) -> Tensor:
    """The dense matrix of the circular conv, probed with every basis vector of C_in×H×W."""
    h, w = hw
    k_h, k_w = layer.kernel_size
    d_h, d_w = layer.dilation
    # Explicit circular padding by index (works for any pad, also larger than the input).
    span_h, span_w = d_h * (k_h - 1), d_w * (k_w - 1)
    rows = (torch.arange(h + span_h) - span_h // 2) % h
    cols = (torch.arange(w + span_w) - span_w // 2) % w
    n = layer.in_channels * h * w
    basis = torch.eye(n, dtype=torch.float64).reshape(n, layer.in_channels, h, w)
    padded = basis[:, :, rows][:, :, :, cols]
    out = nn.functional.conv2d(
        padded,
        layer.weight.to(torch.float64),
        stride=layer.stride,
        dilation=layer.dilation,
        groups=layer.groups,
    )
    return out.reshape(n, -1).T


def _reference_values(layer: WeightLayer, hw: tuple[int, int]) -> Tensor:
    values: Tensor = torch.linalg.svdvals(_circular_operator(layer, hw))
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("m", "n"), [(7, 5), (5, 9)])
def test_linear_known_singular_values(dtype: torch.dtype, m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(1)
    k = min(m, n)
    s = torch.linspace(4.0, 0.5, k, dtype=torch.float64)
    u, v = _orthogonal(m, gen)[:, :k], _orthogonal(n, gen)[:, :k]
    weight = (u * s) @ v.T
    (result,) = signal_space([_linear(weight.to(dtype))])
    assert result.matrix_shape == (m, n)
    assert result.stats.singular_values.dtype == torch.float64
    torch.testing.assert_close(result.stats.singular_values, s, rtol=1e-6, atol=1e-6)
    assert result.stats.rank == k
    assert result.stats.condition_number == pytest.approx(8.0, rel=1e-6)
    assert result.stats.spectral_norm == pytest.approx(4.0, rel=1e-6)
    assert result.stats.stable_rank == pytest.approx(float((s**2).sum() / 16.0), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_linear(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    m, n, r = 12, 8, 3
    u, v = _orthogonal(m, gen)[:, :r], _orthogonal(n, gen)[:, :r]
    weight = (u * torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    (result,) = signal_space([_linear(weight.to(dtype))])
    assert result.stats.rank == r
    assert result.stats.condition_number == math.inf
    metrics = layer_spectrum_metrics(result)
    assert metrics["condition_number"] is None
    json.dumps(metrics, allow_nan=False)  # strict JSON: no inf / nan anywhere


def test_spectrum_stats_formulas() -> None:
    stats = spectrum_stats(torch.tensor([4.0, 3.0, 0.0], dtype=torch.float64), (3, 5), 1e-7)
    assert stats.spectral_norm == 4.0
    assert stats.stable_rank == pytest.approx(25.0 / 16.0)
    assert stats.rank == 2
    assert stats.condition_number == math.inf
    full = spectrum_stats(torch.tensor([4.0, 3.0, 0.5], dtype=torch.float64), (5, 3), 1e-7)
    assert full.rank == 3
    assert full.condition_number == pytest.approx(8.0)
    # Below σ_max·max(m, n)·eps counts as zero: 4·5·0.01 = 0.2 > 0.1.
    noisy = spectrum_stats(torch.tensor([4.0, 3.0, 0.1], dtype=torch.float64), (5, 3), 0.01)
    assert noisy.rank == 2
    assert noisy.condition_number == math.inf
    zero = spectrum_stats(torch.zeros(2, dtype=torch.float64), (2, 2), 1e-7)
    assert (zero.rank, zero.stable_rank, zero.spectral_norm) == (0, 0.0, 0.0)
    with pytest.raises(ValueError, match="expected 3 singular values"):
        spectrum_stats(torch.ones(2), (3, 5), 1e-7)


def test_stable_rank_and_spectral_norm_match_matrix_norms() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    (result,) = signal_space([_linear(weight)])
    spectral = torch.linalg.matrix_norm(weight, ord=2).item()
    frobenius = torch.linalg.matrix_norm(weight).item()
    assert result.stats.spectral_norm == pytest.approx(spectral, rel=1e-12)
    assert result.stats.stable_rank == pytest.approx(frobenius**2 / spectral**2, rel=1e-12)


def test_kernels_and_filters_matrices() -> None:
    weight = torch.arange(4 * 3 * 2 * 3, dtype=torch.float32).reshape(4, 3, 2, 3)
    layer = _conv(weight)
    kernels = layer_matrix(layer, ConvView.KERNELS)
    filters = layer_matrix(layer, ConvView.FILTERS)
    assert kernels.dtype == filters.dtype == torch.float64
    assert kernels.shape == (12, 6)
    assert filters.shape == (4, 18)
    # Row o·C_in + c is kernel [o, c]; row o of the filter view is filter o.
    torch.testing.assert_close(kernels[2 * 3 + 1], weight[2, 1].flatten().double())
    torch.testing.assert_close(filters[3], weight[3].flatten().double())
    torch.testing.assert_close(kernels.reshape(4, -1), filters)
    grouped = _conv(weight, groups=2)  # C_in = 6, C_in/groups = 3
    assert layer_matrix(grouped, ConvView.KERNELS).shape == (12, 6)
    assert layer_matrix(grouped, ConvView.FILTERS).shape == (4, 18)
    with pytest.raises(ValueError, match="conv_operator_singular_values"):
        layer_matrix(layer, ConvView.OPERATOR)
    with pytest.raises(ValueError, match="valid views are: kernels, filters, operator"):
        layer_matrix(layer, "rows")  # type: ignore[arg-type]
    linear = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    for view in ConvView:
        torch.testing.assert_close(layer_matrix(_linear(linear), view), linear.double())


def test_circular_reference_matches_torch_circular_padding() -> None:
    # Guard the test's own reference against nn.Conv2d(padding_mode="circular").
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular", bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    layer = layer_from_module("conv", conv)
    assert layer is not None
    basis = torch.eye(3 * 5 * 6, dtype=torch.float64).reshape(-1, 3, 5, 6)
    dense = conv(basis).detach().reshape(basis.shape[0], -1).T
    torch.testing.assert_close(_circular_operator(layer, (5, 6)), dense)


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "stride", "dilation", "groups", "hw"),
    [
        (3, 4, 3, 1, 1, 1, (6, 6)),  # C_in ≠ C_out
        (3, 5, 3, 1, 1, 1, (5, 7)),  # non-square, odd width (rfft's unpaired column)
        (2, 3, 3, 2, 1, 1, (8, 6)),  # stride 2
        (2, 3, 4, 2, 1, 1, (6, 4)),  # stride 2, even kernel
        (3, 2, 7, 2, 1, 1, (6, 8)),  # stride 2, 7×7 (resnet's first conv)
        (4, 6, 3, 1, 1, 2, (5, 6)),  # groups 2
        (4, 4, 3, 2, 1, 2, (6, 6)),  # groups 2 and stride 2
        (2, 3, 3, 1, 2, 1, (7, 6)),  # dilation 2
        (2, 3, 5, 1, 1, 1, (3, 4)),  # kernel larger than the input: it wraps
        (2, 2, 3, 2, 2, 1, (4, 2)),  # dilated, strided and wrapped at once
        (3, 4, 1, 2, 1, 1, (4, 6)),  # 1×1 stride 2: one polyphase component of four is used
        (2, 3, 2, 2, 2, 1, (6, 4)),  # taps 0 and 2 at stride 2: one component again
        (4, 2, 3, 3, 1, 2, (6, 3)),  # stride 3, groups 2, C_out < C_in
    ],
)
def test_operator_matches_dense_circular_matrix(
    c_in: int, c_out: int, k: int, stride: int, dilation: int, groups: int, hw: tuple[int, int]
) -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=gen)
    layer = _conv(weight, stride, dilation, groups)
    values = conv_operator_singular_values(layer, hw)
    expected = _reference_values(layer, hw)
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-9)
    # signal_space refuses the circular view for a layer the circular operator does not describe
    # (padding 0 here): give it the "same" padding, which only shifts the circular operator.
    same = replace(layer, padding=(dilation * (k - 1) // 2,) * 2)
    (result,) = signal_space([same], ConvView.OPERATOR, {"conv": hw})
    dense_shape = _circular_operator(layer, hw).shape
    assert result.matrix_shape == (dense_shape[0], dense_shape[1])
    torch.testing.assert_close(result.stats.singular_values, expected, rtol=1e-9, atol=1e-9)


def test_operator_of_1x1_conv_repeats_channel_matrix_values() -> None:
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(5, 3, 1, 1, generator=gen, dtype=torch.float64)
    values = conv_operator_singular_values(_conv(weight), (4, 6))
    expected = torch.linalg.svdvals(weight[:, :, 0, 0]).repeat_interleave(24)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 1), (1, 6)])
def test_single_row_or_column_value_is_its_norm(shape: tuple[int, int]) -> None:
    weight = torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0, 12.0]).reshape(shape)
    (result,) = signal_space([_linear(weight)])
    torch.testing.assert_close(result.stats.singular_values, torch.tensor([13.0]).double())
    assert (result.stats.rank, result.stats.condition_number) == (1, 1.0)


def test_operator_input_errors() -> None:
    layer = _conv(torch.ones(2, 2, 3, 3), stride=2)
    with pytest.raises(ValueError, match="not divisible by the stride"):
        conv_operator_singular_values(layer, (7, 8))
    with pytest.raises(ValueError, match="needs input_hw for conv layer\\(s\\) 'conv'"):
        signal_space([_linear(torch.ones(2, 3), "fc"), layer], ConvView.OPERATOR, {"fc": (1, 1)})
    with pytest.raises(ValueError, match="not a conv2d layer"):
        conv_operator_singular_values(_linear(torch.ones(2, 3)), (4, 4))


def test_top_singular_directions() -> None:
    gen = torch.Generator().manual_seed(7)
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    u, v = _orthogonal(6, gen)[:, :4], _orthogonal(4, gen)
    matrix = (u * s) @ v.T
    sigma, vh = top_singular_directions(matrix.float(), 2)
    torch.testing.assert_close(sigma, s[:2], rtol=1e-6, atol=1e-6)
    # Each direction is ±v_i, with the sign that makes its largest entry positive.
    for i in range(2):
        expected = v[:, i] * torch.sign(v[v[:, i].abs().argmax(), i])
        torch.testing.assert_close(vh[i], expected, rtol=1e-5, atol=1e-5)
    assert top_singular_directions(matrix, 10)[1].shape == (4, 4)
    # A wide matrix takes the transposed path: same values, same directions.
    wide = (v * s) @ u.T  # (4, 6) = V S Uᵀ, right singular vectors are U's columns
    sigma_w, vh_w = top_singular_directions(wide, 3)
    torch.testing.assert_close(sigma_w, s[:3])
    for i in range(3):
        expected = u[:, i] * torch.sign(u[u[:, i].abs().argmax(), i])
        torch.testing.assert_close(vh_w[i], expected)
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_singular_directions(matrix, 0)


def test_signal_space_resnet18_every_layer_finite() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    layers = weight_layers(model)
    expected_names = [
        name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    for view in (ConvView.KERNELS, ConvView.FILTERS):
        results = signal_space(layers, view)
        assert [r.name for r in results] == expected_names
        assert len(results) == 21  # 20 convs + fc
        for r, layer in zip(results, layers, strict=True):
            stats = r.stats
            assert r.view is view
            assert stats.singular_values.numel() == min(r.matrix_shape)
            assert math.isfinite(stats.condition_number), r.name
            assert stats.rank == min(r.matrix_shape)
            assert 1.0 <= stats.stable_rank <= stats.rank
            if view is ConvView.KERNELS or layer.name in ("conv1", "fc"):
                # Independent check (the wide filter matrices are slow in LAPACK's wide path).
                plain = torch.linalg.svdvals(layer_matrix(layer, view).contiguous())
                torch.testing.assert_close(stats.singular_values, plain, rtol=1e-10, atol=1e-12)
        metrics = [layer_spectrum_metrics(r) for r in results]
        assert set(metrics[0]) == {
            "name",
            "kind",
            "view",
            "matrix_shape",
            "singular_values",
            "rank",
            "condition_number",
            "stable_rank",
            "spectral_norm",
        }
        assert metrics[-1]["kind"] == "linear"
        assert metrics[-1]["matrix_shape"] == [1000, 512]
        json.dumps(metrics, allow_nan=False)


def test_signal_space_operator_view_small_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    hw = conv_input_hw(model, (3, 32, 32))
    assert hw["conv1"] == (32, 32)
    assert hw["layer1.0.conv1"] == (8, 8)
    assert hw["layer4.1.conv2"] == (1, 1)
    results = signal_space(weight_layers(model), ConvView.OPERATOR, hw)
    by_name = {r.name: r for r in results}
    assert by_name["conv1"].matrix_shape == (64 * 16 * 16, 3 * 32 * 32)
    assert by_name["layer2.0.downsample.0"].matrix_shape == (128 * 4 * 4, 64 * 8 * 8)
    assert by_name["fc"].matrix_shape == (10, 512)
    for r in results:
        assert r.stats.singular_values.numel() == min(r.matrix_shape)
        assert r.stats.spectral_norm > 0
    # At 1×1 a 3×3 kernel wraps onto one tap: the operator is the summed kernel.
    last = next(layer for layer in weight_layers(model) if layer.name == "layer4.1.conv2")
    torch.testing.assert_close(
        by_name["layer4.1.conv2"].stats.singular_values,
        torch.linalg.svdvals(last.weight.double().sum(dim=(2, 3))),
    )
