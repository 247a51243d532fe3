"""The zero-padded operator past the dense limit: a partial spectrum (the k largest and k
smallest singular values by Lanczos) through ``signal_space`` and the ``signal_space`` analysis.

References are independent of the code under test: the module itself applied to each basis
vector of ``C_in × H × W``, decomposed by ``numpy.linalg.svd``. The Lanczos path is forced on
operators small enough for that reference by lowering ``max_dense``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from deepscope.analyses.registry import parse_params
from deepscope.analyses.run import run_analysis
from deepscope.analyses.signal_space import SignalSpaceMetrics
from deepscope.analysis.conv_operator import OperatorPadding
from deepscope.analysis.layers import WeightLayer, layer_from_module
from deepscope.analysis.signal_space import ConvView, layer_spectrum_metrics, signal_space
from deepscope.manifest import Manifest, manifest_path_for
from deepscope.models.loading import load_model
from deepscope.models.registry import get_model

F64 = torch.float64


def _module(seed: int, **kwargs: Any) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(bias=False, **kwargs).double()


def _layer(conv: nn.Conv2d) -> WeightLayer:
    layer = layer_from_module("conv", conv)
    assert layer is not None
    return layer


def _reference_values(conv: nn.Conv2d, hw: tuple[int, int]) -> Tensor:
    """Every singular value, descending: the module on each basis vector, then numpy's SVD."""
    n = conv.in_channels * hw[0] * hw[1]
    basis = torch.eye(n, dtype=F64).reshape(n, conv.in_channels, *hw)
    with torch.no_grad():
        matrix = conv(basis).reshape(n, -1).T.numpy()
    return torch.from_numpy(np.linalg.svd(matrix, compute_uv=False))


CASES = [
    # stride 2, rectangular (smallest by Lanczos on the smaller Gram)
    {"in_channels": 3, "out_channels": 8, "kernel_size": 3, "padding": 1, "stride": 2},
    # groups, square stride 1 (smallest by shift-invert)
    {"in_channels": 6, "out_channels": 6, "kernel_size": 3, "padding": 1, "groups": 3},
    # dilation
    {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 2, "dilation": 2},
    # not "same": "valid" (output H − 2) and over-padded (output H + 2)
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 0},
    {"in_channels": 4, "out_channels": 3, "kernel_size": 3, "padding": 2},
    # stride 2 with a 7×7 kernel, as resnets' first conv
    {"in_channels": 3, "out_channels": 8, "kernel_size": 7, "padding": 3, "stride": 2},
]


def _ids(kwargs: dict[str, Any]) -> str:
    return "-".join(f"{k[:3]}{v}" for k, v in kwargs.items() if k != "padding_mode")


@pytest.mark.parametrize("kwargs", CASES, ids=_ids)
def test_partial_spectrum_matches_dense(kwargs: dict[str, Any]) -> None:
    conv = _module(21, **kwargs)
    hw = (10, 10)
    layer = _layer(conv)
    expected = _reference_values(conv, hw)
    k = 5
    # max_dense=32 sends these 100..600-value operators down the matrix-free path.
    (ls,) = signal_space(
        [layer], ConvView.OPERATOR, {"conv": hw}, operator_padding=None, max_dense=32, k=k
    )
    spec = ls.extremes
    assert ls.stats is None and not ls.complete and spec is not None
    assert ls.padding is OperatorPadding.ZERO and ls.note is None
    assert spec.converged and not spec.complete
    with torch.no_grad():
        out_shape = conv(torch.zeros(1, conv.in_channels, *hw, dtype=F64)).shape
    assert ls.matrix_shape == (math.prod(out_shape), conv.in_channels * hw[0] * hw[1])
    # The reference's own rounding (~n·eps·σ_max, LAPACK's SVD is backward stable).
    slack = expected.numel() * 4 * 2.3e-16 * float(expected[0])
    torch.testing.assert_close(spec.largest, expected[:k], rtol=1e-6, atol=0)
    bottom = expected.flip(0)[:k]
    # The non-"same" convs here are rank deficient (their smallest values are 0 to rounding):
    # relative accuracy where a value is nonzero, the reference's rounding where it is not.
    zero = bottom <= 1e3 * slack
    torch.testing.assert_close(spec.smallest[~zero], bottom[~zero], rtol=1e-6, atol=0)
    assert bool((spec.smallest[zero] <= 1e3 * slack).all())
    # Each bound holds, up to the reference's rounding.
    assert bool(((spec.largest - expected[:k]).abs() <= spec.largest_error + slack).all())
    assert bool(((spec.smallest - bottom).abs() <= spec.smallest_error + slack).all())
    assert ls.spectral_norm == pytest.approx(float(expected[0]), rel=1e-9)

    metrics = layer_spectrum_metrics(ls)
    json.dumps(metrics, allow_nan=False)
    assert metrics["rank"] is None and "singular_values" not in metrics
    if not bool(zero[0]):
        cond = float(expected[0] / bottom[0])
        assert metrics["condition_number"] == pytest.approx(cond, rel=1e-6)
    frobenius_sq = float(expected.pow(2).sum())
    assert metrics["stable_rank"] == pytest.approx(frobenius_sq / float(expected[0]) ** 2)
    extremes = metrics["extremes"]
    assert isinstance(extremes, dict)
    assert extremes["k"] == k and extremes["converged"]
    # A σ_min that is 0 to rounding has no relative accuracy: it is stated as an estimate.
    assert extremes["sigma_min_certified"] is not bool(zero[0])
    assert extremes["frobenius_norm"] == pytest.approx(math.sqrt(frobenius_sq), rel=1e-9)


def test_small_operators_stay_dense_and_k_is_checked() -> None:
    conv = _module(22, in_channels=3, out_channels=4, kernel_size=3, padding=1)
    layer = _layer(conv)
    (ls,) = signal_space([layer], ConvView.OPERATOR, {"conv": (6, 6)}, operator_padding="zero")
    assert ls.complete and ls.extremes is None and ls.stats is not None
    torch.testing.assert_close(
        ls.stats.singular_values, _reference_values(conv, (6, 6)), rtol=1e-6, atol=1e-12
    )
    with pytest.raises(ValueError, match="k must be at least 1"):
        signal_space([layer], ConvView.OPERATOR, {"conv": (6, 6)}, operator_padding="zero", k=0)


def test_bad_input_errors_are_clear() -> None:
    conv = _module(23, in_channels=4, out_channels=4, kernel_size=3, padding=1)
    layer = _layer(conv)
    # Too large even for Lanczos: a basis of a few blocks must fit in lanczos_entries.
    with pytest.raises(ValueError, match="too large even for its extreme singular values") as err:
        signal_space(
            [layer],
            ConvView.OPERATOR,
            {"conv": (16, 16)},
            operator_padding="zero",
            max_dense=8,
            lanczos_entries=4096,
        )
    assert "operator_padding='circular'" in str(err.value) and "'conv'" in str(err.value)
    # A padding mode the layer cannot have: the circular operator of a "valid" conv has
    # another shape; reflect padding wider than the input.
    valid = _layer(_module(24, in_channels=2, out_channels=2, kernel_size=3))
    with pytest.raises(ValueError, match="circular operator is not this layer's map"):
        signal_space([valid], ConvView.OPERATOR, {"conv": (8, 8)}, operator_padding="circular")
    wide = _layer(_module(25, in_channels=2, out_channels=2, kernel_size=5, padding=2))
    with pytest.raises(ValueError, match=r"reflect padding .* needs an input larger"):
        signal_space([wide], ConvView.OPERATOR, {"conv": (2, 2)}, operator_padding="reflect")
    with pytest.raises(ValueError, match="unknown padding 'mirror'"):
        signal_space([wide], ConvView.OPERATOR, {"conv": (8, 8)}, operator_padding="mirror")


def test_extremes_param_is_bounded() -> None:
    assert parse_params("signal_space").extremes == 16  # type: ignore[attr-defined]
    for bad in (0, 129):
        with pytest.raises(ValueError, match="extremes"):
            parse_params("signal_space", {"extremes": bad})


def test_analysis_reports_a_partial_spectrum(tmp_path: Path) -> None:
    """End to end: resnet18_gray on 1×64×64; layer1.0.conv1 reads 64×16×16, a 16384×16384
    zero-padded operator over the dense limit (4096), beside a Linear layer decomposed whole."""
    torch.manual_seed(0)
    model = get_model("resnet18_gray")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    Manifest(name="r18", arch="resnet18_gray", input_shape=(1, 64, 64)).write(
        manifest_path_for(path)
    )
    params = parse_params(
        "signal_space",
        {"view": "operator", "layers": ["layer1.0.conv1", "fc"], "extremes": 4, "vectors": 2},
    )
    out = tmp_path / "out"
    result = run_analysis(load_model(path), "signal_space", params, out, device="cpu")
    metrics = result.metrics_as(SignalSpaceMetrics)
    conv, fc = metrics.layers
    assert conv.name == "layer1.0.conv1" and conv.padding == "zero" and conv.padding_note is None
    assert conv.matrix_shape == [16384, 16384]
    spectrum = conv.spectrum
    assert not spectrum.complete and spectrum.count == 16384
    assert spectrum.quantiles is None and spectrum.histogram is None and conv.rank is None
    assert len(spectrum.top) == 4 and len(spectrum.bottom) == 4
    assert spectrum.profile.indices == [0, 1, 2, 3, 16380, 16381, 16382, 16383]
    assert spectrum.profile.values == [*spectrum.top, *reversed(spectrum.bottom)]
    assert spectrum.max == spectrum.top[0] and spectrum.min == spectrum.bottom[0]
    assert conv.extremes is not None and conv.extremes.converged
    assert conv.extremes.sigma_min_certified
    assert conv.condition_number == pytest.approx(spectrum.max / spectrum.min)
    assert conv.stable_rank is not None and conv.stable_rank > 1
    # Each reported value is a singular value to within its stated bound, and the bounds are
    # tight for a converged run (test_partial_spectrum_matches_dense checks them against SVDs).
    assert max(conv.extremes.largest_error) <= 1e-8 * spectrum.max
    assert fc.spectrum.complete and fc.rank is not None and fc.extremes is None
    # result.json says the spectrum is partial, and why.
    stored = json.loads((out / "result.json").read_text())
    assert any(
        "layer1.0.conv1: partial spectrum" in w and "rank, quantiles and histogram are null" in w
        for w in stored["warnings"]
    )
    assert stored["metrics"]["layers"][0]["spectrum"]["complete"] is False
    arrays = np.load(out / "extreme_singular_values.npz")
    assert list(arrays) == ["layer1.0.conv1"] and arrays["layer1.0.conv1"].shape == (4, 4)
    np.testing.assert_allclose(arrays["layer1.0.conv1"][0], spectrum.top)
    assert list(np.load(out / "singular_values.npz")) == ["fc"]
    assert Image.open(out / "spectra.png").size[0] > 0
    table = metrics.tables()[-1]
    assert "partial spectrum" in (table.note or "")
