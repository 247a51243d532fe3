"""Conv row-space projections against dense references, and the honesty of their error bound.

The reference is independent of the code under test: the module applied to every basis vector
gives the dense matrix, ``numpy.linalg.svd`` its row space (singular values above
``σ_max·max(m, n)·eps64``, the weights taken as exact).
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from deepscope.analysis.layers import WeightLayer, layer_from_module, weight_layers
from deepscope.analysis.residuals import residual_metrics, residuals, row_space_residual

F64 = torch.float64


def _conv(seed: int, **kwargs: Any) -> tuple[nn.Conv2d, WeightLayer]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(bias=False, **kwargs).double()
    layer = layer_from_module("conv", conv)
    assert layer is not None
    return conv, layer


def _reference(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``P_row x`` for ``x`` ``(B, C, H, W)`` from the SVD of the probed dense matrix."""
    n = x[0].numel()
    basis = torch.eye(n, dtype=F64).reshape(n, *x.shape[1:])
    with torch.no_grad():
        matrix = conv(basis).reshape(n, -1).T.numpy()
    _, s, vh = np.linalg.svd(matrix, full_matrices=False)
    rank = int((s > s[0] * max(matrix.shape) * np.finfo(np.float64).eps).sum())
    v = vh[:rank].T
    flat = x.reshape(x.shape[0], -1).numpy()
    return torch.from_numpy(flat @ v @ v.T).reshape(x.shape)


def _errors(p: Tensor, reference: Tensor, x: Tensor) -> Tensor:
    return (p - reference).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)


def _lost(r: Tensor, x: Tensor) -> Tensor:
    return r.flatten(1).pow(2).sum(1) / x.flatten(1).pow(2).sum(1)


CASES = [
    # (conv kwargs, input H×W, expected method prefix)
    ({"in_channels": 6, "out_channels": 6, "kernel_size": 3, "padding": 1}, 8, "injective"),
    (
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 2, "dilation": 2},
        9,
        "injective",
    ),
    ({"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 0}, 8, "injective"),
    ({"in_channels": 3, "out_channels": 5, "kernel_size": 1, "stride": 2}, 8, "injective"),
    (
        {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 1, "stride": 2},
        10,
        "surjective",
    ),
    (
        {
            "in_channels": 4,
            "out_channels": 4,
            "kernel_size": 3,
            "padding": 1,
            "stride": 2,
            "groups": 2,
        },
        10,
        "surjective",
    ),
    ({"in_channels": 4, "out_channels": 2, "kernel_size": 3, "padding": 2}, 8, "surjective"),
    # Taps 0, 2, 4 at stride 2 read every other pixel only: injective on those.
    (
        {
            "in_channels": 4,
            "out_channels": 4,
            "kernel_size": 3,
            "padding": 1,
            "stride": 2,
            "dilation": 2,
            "padding_mode": "reflect",
        },
        7,
        "injective",
    ),
    (
        {
            "in_channels": 4,
            "out_channels": 4,
            "kernel_size": 3,
            "padding": 1,
            "stride": 2,
            "padding_mode": "replicate",
        },
        9,
        "surjective",
    ),
    (
        {
            "in_channels": 4,
            "out_channels": 4,
            "kernel_size": 3,
            "padding": 1,
            "padding_mode": "circular",
        },
        7,
        "injective",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "size", "method"),
    CASES,
    ids=lambda v: "-".join(f"{k}{w}" for k, w in v.items()) if isinstance(v, dict) else str(v),
)
def test_conv_projection_matches_dense(kwargs: dict[str, Any], size: int, method: str) -> None:
    conv, layer = _conv(1, **kwargs)
    x = torch.randn(
        3, kwargs["in_channels"], size, size, dtype=F64, generator=torch.Generator().manual_seed(2)
    )
    res = row_space_residual(layer, x, rtol=1e-10, max_iter=2000)
    assert res.method.startswith(method)
    reference = _reference(conv, x)
    error = _errors(res.projection, reference, x)
    assert float(error.max()) <= 1e-6
    # The bound is honest: at least the true error (up to the reference's own rounding).
    assert bool((res.error_bound + 1e-12 >= error).all()), (res.error_bound, error)
    assert float(res.error_bound.max()) <= 1e-6
    torch.testing.assert_close(res.projection + res.residual, x)
    lost_ref = _lost(x - reference, x)
    torch.testing.assert_close(_lost(res.residual, x), lost_ref, rtol=1e-6, atol=1e-9)
    assert res.sigma_min is not None and res.sigma_min > 0
    if method == "injective" and layer.stride == (1, 1):
        assert float(_lost(res.residual, x).max()) <= 1e-6  # true value 0
        assert res.iterations == 0 and torch.equal(res.error_bound, torch.zeros(3, dtype=F64))


@pytest.mark.slow
def test_ill_conditioned_square_conv_loses_nothing() -> None:
    # 16×12×12 = 2304 unknowns: σ_min from the boundary-corrected circulant inverse.
    conv, layer = _conv(3, in_channels=16, out_channels=16, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 12, 12, dtype=F64, generator=torch.Generator().manual_seed(4))
    res = row_space_residual(layer, x)
    assert res.method == "injective"
    basis = torch.eye(2304, dtype=F64).reshape(-1, 16, 12, 12)
    with torch.no_grad():
        matrix = conv(basis).reshape(2304, -1).T.numpy()
    matrix_values = np.linalg.svd(matrix, compute_uv=False)
    assert matrix_values[-1] / matrix_values[0] < 1e-3  # ill-conditioned, yet injective
    assert res.sigma_min == pytest.approx(float(matrix_values[-1]), rel=1e-6)
    assert float(_lost(res.residual, x).max()) <= 1e-6
    assert torch.equal(res.projection, x)


@pytest.mark.slow
def test_resnet18_layer1_conv_is_injective() -> None:
    # The case the old CGLS got wrong: injective, yet it reported a lost fraction of ~1%.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    layer = next(la for la in weight_layers(model) if la.name == "layer1.0.conv1")
    x = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(5))
    res = row_space_residual(layer, x)
    assert res.method == "injective"
    assert res.sigma_min is not None and 0 < res.sigma_min < 1e-3
    assert float(_lost(res.residual.double(), x.double()).max()) <= 1e-6


def test_stopped_solve_reports_an_honest_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    conv, layer = _conv(6, in_channels=4, out_channels=8, kernel_size=3, padding=1, stride=2)
    x = torch.randn(2, 4, 10, 10, dtype=F64, generator=torch.Generator().manual_seed(7))
    res = row_space_residual(layer, x, rtol=1e-12, max_iter=2)
    assert res.method.startswith("surjective (CG") and res.iterations == 2
    error = _errors(res.projection, _reference(conv, x), x)
    assert bool((res.error_bound >= error).all())
    assert float(error.min()) > 1e-8  # really stopped early
    # The same with no inverse at all: the bound still holds.
    # (deepscope.analysis re-exports the function residuals, which shadows the module name.)
    module = importlib.import_module("deepscope.analysis.residuals")
    monkeypatch.setattr(module, "gram_inverse", lambda *a, **k: None)
    again = row_space_residual(layer, x, rtol=1e-10, max_iter=2000)
    assert float(_errors(again.projection, _reference(conv, x), x).max()) <= 1e-6


def test_rank_deficient_conv_falls_back_without_a_bound() -> None:
    conv, layer = _conv(8, in_channels=4, out_channels=4, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight[:, 1] = conv.weight[:, 0]  # x₀ = v, x₁ = −v is invisible
    layer = layer_from_module("conv", conv)
    assert layer is not None
    x = torch.randn(2, 4, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(9))
    res = row_space_residual(layer, x, rtol=1e-12, max_iter=3000)
    assert res.method == "rank-deficient (CGLS)"
    assert bool(torch.isinf(res.error_bound).all()) and res.sigma_min is None
    torch.testing.assert_close(res.projection + res.residual, x)
    invisible = x.clone()
    invisible[:, 1] = -invisible[:, 0]
    invisible[:, 2:] = 0
    assert float(_lost(row_space_residual(layer, invisible).residual, invisible).min()) > 0.9


def test_metrics_carry_the_bound_as_json() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.dup = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            out: Tensor = self.dup(self.conv(x))
            return out

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.dup.weight[:, 1] = net.dup.weight[:, 0]
    out = residuals(net, weight_layers(net), torch.randn(2, 2, 5, 5), rtol=1e-8)
    good, bad = (residual_metrics(lr, ["a", "b"]) for lr in out)
    json.dumps([good, bad], allow_nan=False)
    assert good["method"] == "injective" and isinstance(good["sigma_min"], float)
    classes: Any = good["classes"]
    assert classes[0]["projection_error_bound"] == 0.0
    bad_classes: Any = bad["classes"]
    assert bad_classes[0]["projection_error_bound"] is None  # inf: no certified bound
    assert math.isfinite(bad_classes[0]["lost_fraction"])
