"""Known-answer tests for per-row and row-space residuals (Pattichis & Pattichis 2024)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from deepscope.analysis.hooks import Where, capture_activations
from deepscope.analysis.layers import LayerKind, WeightLayer, layer_from_module, weight_layers
from deepscope.analysis.residuals import (
    LayerResiduals,
    RowSpaceResult,
    _ConvOperator,
    per_row_residuals,
    residual_metrics,
    residuals,
    row_space_residual,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _conv_layer(seed: int = 0, **kwargs: Any) -> WeightLayer:
    torch.manual_seed(seed)
    layer = layer_from_module("conv", nn.Conv2d(**kwargs))
    assert layer is not None
    return layer


def _dense_projection(layer: WeightLayer, shape: tuple[int, ...]) -> Tensor:
    """The row-space projector of the conv as a dense (n, n) matrix, by probing: tests only."""
    n = 1
    for s in shape:
        n *= s
    basis = torch.eye(n, dtype=F64).reshape(n, *shape)
    matrix = layer.apply(basis).reshape(n, -1).T  # (m, n): column j = A e_j
    _, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = int((sigma > sigma.max() * max(matrix.shape) * 1e-12).sum())
    v: Tensor = vh[:rank].T
    return v @ v.T


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- per-row residuals ---------------------------------------------------------------------------


def test_per_row_residual_matches_formula_and_is_orthogonal_to_its_row() -> None:
    weight = torch.randn(4, 6, generator=_gen(1))
    x = torch.randn(3, 6, generator=_gen(2))
    out = per_row_residuals(weight, x)
    assert out.shape == (3, 4, 6)
    for b in range(3):
        for i in range(4):
            w = weight[i]
            expected = x[b] - (w @ x[b]) / (w @ w) * w
            torch.testing.assert_close(out[b, i], expected, rtol=1e-5, atol=1e-6)
    dots = torch.einsum("boi,oi->bo", out.double(), weight.double())
    assert float(dots.abs().max()) < 1e-5


def test_per_row_residual_of_a_row_multiple_is_zero() -> None:
    weight = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    x = torch.tensor([[2.0, 4.0, 0.0]])  # 2 * row 0, orthogonal to row 1
    out = per_row_residuals(weight, x)
    torch.testing.assert_close(out[0, 0], torch.zeros(3))
    torch.testing.assert_close(out[0, 1], x[0])


def test_per_row_residual_zero_row_names_it() -> None:
    weight = torch.randn(4, 6, generator=_gen(1))
    weight[2] = 0
    with pytest.raises(ValueError, match="row 2 is zero"):
        per_row_residuals(weight, torch.randn(1, 6))


def test_per_row_residual_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"x must be \(B, 6\)"):
        per_row_residuals(torch.randn(4, 6), torch.randn(2, 5))


# --- row space: Linear ---------------------------------------------------------------------------


def _rank3_linear(dtype: torch.dtype = F64) -> tuple[WeightLayer, Tensor]:
    """A 5×8 weight with singular values (3, 2, 1, 0, 0) and the basis of its row space."""
    u, _ = torch.linalg.qr(torch.randn(5, 5, dtype=F64, generator=_gen(3)))
    v, _ = torch.linalg.qr(torch.randn(8, 8, dtype=F64, generator=_gen(4)))
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=F64)
    weight = (u * sigma) @ v[:, :5].T
    return WeightLayer("fc", LayerKind.LINEAR, weight.to(dtype)), v[:, :3]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_linear_row_space_known_rank(dtype: torch.dtype) -> None:
    # In float32 the rounded weight is full rank with σ ≈ 1e-7: the eps tolerance drops those.
    layer, v3 = _rank3_linear(dtype)
    x = torch.randn(4, 8, dtype=F64, generator=_gen(5))
    res = row_space_residual(layer, x)
    assert isinstance(res, RowSpaceResult)
    assert res.iterations == 0
    assert torch.equal(res.relative_error, torch.zeros(4, dtype=F64))
    tol = 1e-10 if dtype == F64 else 1e-6  # float32 rounding tilts the row space by ~1e-7
    torch.testing.assert_close(res.projection, x @ v3 @ v3.T, rtol=tol, atol=tol)
    torch.testing.assert_close(res.projection + res.residual, x)
    assert float(res.residual.norm()) > 0.3 * float(x.norm())  # 5 of 8 directions are lost
    w = layer.weight.double()
    assert float((res.residual @ w.T).norm()) < 10 * tol * float(x.norm())
    assert float((res.projection * res.residual).sum(1).abs().max()) < 1e-10
    again = row_space_residual(layer, res.projection)
    torch.testing.assert_close(again.projection, res.projection, rtol=1e-10, atol=1e-10)


def test_linear_row_space_keeps_dtype_and_checks_shape() -> None:
    layer, _ = _rank3_linear(torch.float32)
    x = torch.randn(2, 8, generator=_gen(6))
    res = row_space_residual(layer, x)
    assert res.projection.dtype == torch.float32
    assert res.residual.shape == (2, 8)
    with pytest.raises(ValueError, match=r"takes \(B, 8\) inputs"):
        row_space_residual(layer, torch.randn(2, 7))


# --- row space: Conv2d (matrix-free) -------------------------------------------------------------

CONV_CASES = [
    {"stride": 1, "padding": 0},
    {"stride": 2, "padding": 1},
    {"stride": 1, "padding": 1, "groups": 2},
    {"stride": 1, "padding": 1, "padding_mode": "circular"},
    {"stride": 2, "padding": 1, "padding_mode": "reflect", "dilation": 2},
]


@pytest.mark.parametrize(
    "geometry", CONV_CASES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items())
)
def test_conv_row_space_matches_dense_projection(geometry: dict[str, Any]) -> None:
    layer = _conv_layer(in_channels=4, out_channels=4, kernel_size=3, **geometry)
    x = torch.randn(2, 4, 7, 7, dtype=F64, generator=_gen(7))
    res = row_space_residual(layer, x, rtol=1e-11, max_iter=1000)
    assert float(res.relative_error.max()) <= 1e-11
    p, r = res.projection, res.residual
    torch.testing.assert_close(p + r, x)
    # The layer cannot see r; what it sees of x it sees of P x.
    assert float(layer.apply(r).norm()) < 1e-4 * float(layer.apply(x).norm())
    assert float((p * r).flatten(1).sum(1).abs().max()) < 1e-8 * float(x.norm()) ** 2
    idem = row_space_residual(layer, p, rtol=1e-11, max_iter=1000)
    assert _rel(idem.projection, p) < 1e-4
    dense = x.reshape(2, -1) @ _dense_projection(layer, (4, 7, 7))
    assert _rel(p.reshape(2, -1), dense) < 1e-4


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_adjoint_is_the_transpose(mode: str) -> None:
    # <A x, y> = <x, Aᵀ y>: the identity CGLS rests on, for every padding mode.
    layer = _conv_layer(
        in_channels=4,
        out_channels=6,
        kernel_size=3,
        stride=2,
        padding=2,
        dilation=1,
        groups=2,
        padding_mode=mode,
    )
    x = torch.randn(2, 4, 7, 8, dtype=F64, generator=_gen(20))
    op = _ConvOperator(layer, x.shape, x.device)
    ax = op.forward(x)
    y = torch.randn(ax.shape, dtype=F64, generator=_gen(21))
    aty = op.adjoint(y)
    assert aty.shape == x.shape
    assert float((ax * y).sum()) == pytest.approx(float((x * aty).sum()), rel=1e-12)


def test_conv_injective_layer_sees_everything() -> None:
    # C_out·H_out·W_out = 6·36 ≥ C_in·H·W = 2·36 with generic weights: A has full column rank.
    layer = _conv_layer(1, in_channels=2, out_channels=6, kernel_size=3, padding=1)
    x = torch.randn(2, 2, 6, 6, generator=_gen(8))
    res = row_space_residual(layer, x, rtol=1e-12, max_iter=2000)
    assert float(res.residual.norm()) < 1e-4 * float(x.norm())


def test_conv_1x1_stride2_keeps_only_even_pixels() -> None:
    # Generic invertible channel mixing: the row space is every input at the even pixels.
    layer = _conv_layer(2, in_channels=3, out_channels=3, kernel_size=1, stride=2)
    x = torch.randn(2, 3, 6, 6, dtype=F64, generator=_gen(9))
    res = row_space_residual(layer, x, rtol=1e-12)
    even = torch.zeros_like(x)
    even[:, :, ::2, ::2] = x[:, :, ::2, ::2]
    torch.testing.assert_close(res.projection, even, rtol=1e-8, atol=1e-8)
    lost = res.residual.pow(2).flatten(1).sum(1) / x.pow(2).flatten(1).sum(1)
    expected = 1 - x[:, :, ::2, ::2].pow(2).flatten(1).sum(1) / x.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(lost, expected, rtol=1e-8, atol=1e-10)


def test_conv_1x1_stride2_one_output_channel_loses_known_fraction() -> None:
    # One output channel w: at each even pixel the layer sees only the component along w.
    layer = _conv_layer(3, in_channels=3, out_channels=1, kernel_size=1, stride=2)
    w = layer.weight.double().reshape(3)
    x = torch.randn(2, 3, 6, 6, dtype=F64, generator=_gen(10))
    res = row_space_residual(layer, x, rtol=1e-12)
    seen = torch.einsum("c,bchw->bhw", w, x[:, :, ::2, ::2]).pow(2).flatten(1).sum(1) / (w @ w)
    total = x.pow(2).flatten(1).sum(1)
    lost = res.residual.pow(2).flatten(1).sum(1) / total
    torch.testing.assert_close(lost, 1 - seen / total, rtol=1e-8, atol=1e-10)


def test_conv_reports_relative_error_honestly_when_stopped_early() -> None:
    # A square 3×3 conv is injective and now projects exactly (no iterations), so stop a
    # surjective one instead (stride 2 doubling the channels: solved by CG on AAᵀ).
    layer = _conv_layer(4, in_channels=3, out_channels=6, kernel_size=3, padding=1, stride=2)
    x = torch.randn(2, 3, 6, 6, dtype=F64, generator=_gen(11))
    res = row_space_residual(layer, x, rtol=1e-12, max_iter=2)
    assert res.iterations == 2
    expected = _ata(layer, res.projection - x).flatten(1).norm(dim=1) / _ata(layer, x).flatten(
        1
    ).norm(dim=1)
    torch.testing.assert_close(res.relative_error, expected, rtol=1e-8, atol=0.0)
    assert float(res.relative_error.min()) > 1e-12
    assert bool(torch.isfinite(res.error_bound).all()) and float(res.error_bound.min()) > 1e-12


def _ata(layer: WeightLayer, t: Tensor) -> Tensor:
    """AᵀA t through autograd (independent of the module's adjoint)."""
    t = t.detach().requires_grad_(True)
    y = layer.apply(t)
    (g,) = torch.autograd.grad(y, t, grad_outputs=y.detach())
    return g


def test_conv_per_sample_steps_zero_and_null_space_samples() -> None:
    layer = _conv_layer(5, in_channels=3, out_channels=2, kernel_size=1, stride=2)
    x = torch.randn(3, 3, 6, 6, dtype=F64, generator=_gen(12))
    x[1] = 0
    x[2, :, ::2, ::2] = 0  # only odd pixels: entirely invisible to the layer
    res = row_space_residual(layer, x, rtol=1e-12)
    assert torch.equal(res.projection[1], torch.zeros_like(x[1]))
    assert float(res.relative_error[1]) == 0.0
    assert float(res.relative_error[2]) == 0.0
    torch.testing.assert_close(res.residual[2], x[2])
    full = row_space_residual(layer, x[:1], rtol=1e-12)
    torch.testing.assert_close(res.projection[:1], full.projection, rtol=1e-9, atol=1e-9)


def test_conv_input_checks() -> None:
    layer = _conv_layer(in_channels=4, out_channels=4, kernel_size=3)
    with pytest.raises(ValueError, match=r"takes \(B, 4, H, W\) inputs"):
        row_space_residual(layer, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="rtol"):
        row_space_residual(layer, torch.randn(1, 4, 8, 8), rtol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        row_space_residual(layer, torch.randn(1, 4, 8, 8), max_iter=0)


# --- residuals() on a model ----------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        out: Tensor = self.fc(self.drop(h.flatten(1)))
        return out


def _small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_residuals_match_manual_capture_and_restore_the_model() -> None:
    model = _small_cnn().train()
    layers = weight_layers(model)
    inputs = torch.randn(2, 3, 8, 8, generator=_gen(13))
    out = residuals(model, layers, inputs, rtol=1e-10, max_iter=1000)
    assert _no_hooks(model)
    assert all(m.training for m in model.modules())

    with (
        torch.no_grad(),
        capture_activations(model.eval(), [lr.name for lr in out], Where.INPUT) as cap,
    ):
        model(inputs)
        manual = {lr.name: cap[lr.name] for lr in out}
    assert [lr.name for lr in out] == ["conv1", "conv2", "fc"]
    for layer, lr in zip(layers, out, strict=True):
        assert isinstance(lr, LayerResiduals)
        assert lr.kind is layer.kind
        assert lr.inputs is not None
        torch.testing.assert_close(lr.inputs, manual[layer.name], rtol=0, atol=0)
        ref = row_space_residual(layer, manual[layer.name], rtol=1e-10, max_iter=1000)
        torch.testing.assert_close(lr.result.residual, ref.residual, rtol=0, atol=0)
        x = manual[layer.name].double().flatten(1)
        r = ref.residual.double().flatten(1)
        torch.testing.assert_close(lr.input_norm, x.norm(dim=1))
        torch.testing.assert_close(lr.residual_norm, r.norm(dim=1))
        torch.testing.assert_close(lr.lost_fraction, r.pow(2).sum(1) / x.pow(2).sum(1))
    fc = out[2]
    assert fc.row_residual_norms is not None and out[0].row_residual_norms is None
    expected = per_row_residuals(model.fc.weight, manual["fc"]).double().norm(dim=-1)
    torch.testing.assert_close(fc.row_residual_norms, expected, rtol=1e-5, atol=1e-6)
    # fc is 5×54: it cannot see most of its 54-dim input.
    assert float(fc.lost_fraction.min()) > 0.5


def test_residuals_recapture_an_input_overwritten_in_place() -> None:
    class Overwrites(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(2, 3, 3, padding=1)
            self.conv = nn.Conv2d(3, 2, 3, stride=2)

        def forward(self, x: Tensor) -> Tensor:
            h: Tensor = self.conv0(x)
            y: Tensor = self.conv(h)
            h.mul_(-2.0)  # changes conv's input after conv read it
            return y.sum() + h.sum()

    torch.manual_seed(1)
    model = Overwrites()
    inputs = torch.randn(1, 2, 6, 6, generator=_gen(14))
    layer = layer_from_module("conv", model.conv)
    assert layer is not None
    out = residuals(model, [layer], inputs, rtol=1e-10)
    with torch.no_grad():
        expected = model.conv0(inputs)
    assert out[0].inputs is not None
    torch.testing.assert_close(out[0].inputs, expected)
    assert _no_hooks(model)


def test_residuals_restore_hooks_and_mode_when_forward_raises() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x: Tensor) -> Tensor:
            self.conv(x)
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        residuals(model, weight_layers(model), torch.randn(1, 3, 5, 5))
    assert _no_hooks(model)
    assert model.training and model.conv.training


def test_residuals_keep_inputs_false_and_validation() -> None:
    model = _small_cnn()
    layers = weight_layers(model)
    inputs = torch.randn(1, 3, 8, 8, generator=_gen(15))
    out = residuals(model, layers, inputs, keep_inputs=False)
    assert all(lr.inputs is None for lr in out)
    with pytest.raises(ValueError, match="no layers"):
        residuals(model, [], inputs)
    with pytest.raises(ValueError, match="more than once"):
        residuals(model, [layers[0], layers[0]], inputs)
    with pytest.raises(ValueError, match="unknown layer"):
        residuals(model, [WeightLayer("nope", LayerKind.LINEAR, torch.ones(2, 2))], inputs)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        residuals(model, layers, inputs[0])
    bad = WeightLayer("fc", LayerKind.LINEAR, torch.full((5, 54), float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        residuals(model, [bad], inputs)
    assert _no_hooks(model)


def test_residual_metrics_fields() -> None:
    model = _small_cnn()
    inputs = torch.randn(2, 3, 8, 8, generator=_gen(16))
    out = residuals(model, weight_layers(model), inputs)
    conv = residual_metrics(out[0], ["cat", "dog"])
    fc = residual_metrics(out[2], ["cat", "dog"])
    json.dumps([conv, fc])
    assert conv["name"] == "conv1" and conv["kind"] == "conv2d"
    assert conv["input_shape"] == [3, 8, 8]
    classes: Any = conv["classes"]
    assert [c["class"] for c in classes] == ["cat", "dog"]
    assert set(classes[0]) == {
        "class",
        "input_norm",
        "residual_norm",
        "lost_fraction",
        "projection_error_bound",
        "projection_relative_error",
    }
    assert classes[1]["lost_fraction"] == pytest.approx(float(out[0].lost_fraction[1]))
    fc_classes: Any = fc["classes"]
    assert len(fc_classes[0]["row_residual_norms"]) == 5
    assert fc_classes[0]["projection_relative_error"] == 0.0
    assert fc_classes[0]["projection_error_bound"] == 0.0
    with pytest.raises(ValueError, match="has 1 names but layer 'conv1' has 2 samples"):
        residual_metrics(out[0], ["cat"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_conv_row_space_on_cuda_matches_cpu() -> None:
    layer = _conv_layer(6, in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 9, generator=_gen(17))
    cpu = row_space_residual(layer, x, rtol=1e-10)
    cuda_layer = WeightLayer(
        "conv", layer.kind, layer.weight.cuda(), stride=layer.stride, padding=layer.padding
    )
    gpu = row_space_residual(cuda_layer, x.cuda(), rtol=1e-10)
    assert gpu.projection.device.type == "cuda"
    torch.testing.assert_close(gpu.projection.cpu(), cpu.projection, rtol=1e-5, atol=1e-6)
