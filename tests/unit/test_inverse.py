"""Known answers for the paper's inverse maps (deepscope.analysis.inverse)."""

from __future__ import annotations

import copy
from typing import cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from deepscope.analysis.inverse import (
    VALID_METHODS,
    InverseStatus,
    StartMethod,
    TargetMode,
    class_averages,
    exact_inverse,
    inverse_images,
    invertible_chain,
    layerwise_inverse,
    output_targets,
    refine,
    start_images,
)
from deepscope.models.registry import get_model

SELU_LOW = -1.0507009873554804934193349852946 * 1.6732632423543772848170429916717


def fcnn1(seed: int = 0) -> nn.Sequential:
    """The registry's fcnn1, seeded (the exact inverse walks its Sequential children)."""
    torch.manual_seed(seed)
    return cast(nn.Sequential, get_model("fcnn1"))


def fcnn5(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return cast(nn.Sequential, get_model("fcnn5"))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 10)
    )


def random_data(n: int = 200, classes: int = 10, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 28, 28, generator=g)
    labels = torch.arange(n) % classes
    return images, labels


def null_space_part(weight: Tensor, v: Tensor) -> Tensor:
    """The component of the rows of ``v`` in W's null space, ``(I − W⁺W) v``."""
    w = weight.double()
    v = v.double()
    part: Tensor = v - v @ (torch.linalg.pinv(w) @ w).T
    return part


def linear(model: nn.Module, name: str) -> nn.Linear:
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear)
    return layer


# ------------------------------------------------------------------------------------ targets


def test_output_targets_minmax_known_answer() -> None:
    scores = torch.tensor([[1.0, 5.0, -2.0], [3.0, 0.0, 4.0], [2.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    # Unit mins (0, 0, -2), maxes (3, 5, 4): row c = every unit at its own min, unit c at its max.
    expected = torch.tensor([[3.0, 0.0, -2.0], [0.0, 5.0, -2.0], [0.0, 0.0, 4.0]])
    assert torch.equal(output_targets(scores), expected)


def test_output_targets_percentiles_match_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(37, 4, generator=g, dtype=torch.float64)
    targets = output_targets(scores, TargetMode.PERCENTILE)
    q25 = np.percentile(scores.numpy(), 25, axis=0)
    q75 = np.percentile(scores.numpy(), 75, axis=0)
    for c in range(4):
        row = q25.copy()
        row[c] = q75[c]
        np.testing.assert_allclose(targets[c].numpy(), row, rtol=1e-12)


def test_output_targets_rejects_bad_scores() -> None:
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        output_targets(torch.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        output_targets(torch.tensor([[0.0, float("nan")]]))


# ------------------------------------------------------------------------------ start images


def _start_fixture() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Two classes, four images each; image i of every class is the constant i + 10*class.
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    values = torch.tensor([0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0])
    images = values[:, None, None, None].expand(8, 1, 2, 3).clone()
    targets = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    # Distances to the class target: class 0 images 0..3 -> 3, 1, 2, 0 (image value 3 closest);
    # class 1 images 10..13 -> 0.5, 2, 0.1, 3 (image value 12 closest, then 10).
    scores = torch.tensor(
        [
            [1.0, 0.0],
            [0.0, 4.5],
            [3.0, 0.0],
            [0.0, 2.0],
            [2.0, 0.0],
            [0.0, 4.1],
            [4.0, 0.0],
            [0.0, 1.0],
        ]
    )
    return images, labels, scores, targets


def test_start_avg_is_class_mean() -> None:
    images, labels, scores, targets = _start_fixture()
    model = nn.Identity()
    avg = start_images(model, images, labels, scores, targets, StartMethod.AVG)
    assert avg.shape == (2, 1, 2, 3)
    assert torch.allclose(avg[0], torch.full((1, 2, 3), 1.5))
    assert torch.allclose(avg[1], torch.full((1, 2, 3), 11.5))


def test_start_min_picks_closest_image() -> None:
    images, labels, scores, targets = _start_fixture()
    closest = start_images(nn.Identity(), images, labels, scores, targets, StartMethod.MIN)
    assert torch.equal(closest[0], torch.full((1, 2, 3), 3.0))
    assert torch.equal(closest[1], torch.full((1, 2, 3), 12.0))


def test_start_avg_min_averages_closest_fraction() -> None:
    images, labels, scores, targets = _start_fixture()
    half = start_images(
        nn.Identity(), images, labels, scores, targets, StartMethod.AVG_MIN, fraction=0.5
    )
    assert torch.allclose(half[0], torch.full((1, 2, 3), (3.0 + 1.0) / 2))
    assert torch.allclose(half[1], torch.full((1, 2, 3), (12.0 + 10.0) / 2))
    # 25% of four images is one image: the closest.
    quarter = start_images(nn.Identity(), images, labels, scores, targets, StartMethod.AVG_MIN)
    assert torch.equal(quarter[0], torch.full((1, 2, 3), 3.0))


def test_start_images_validate_inputs() -> None:
    images, labels, scores, targets = _start_fixture()
    with pytest.raises(ValueError, match="no training images"):
        start_images(nn.Identity(), images, torch.zeros(8), scores, targets, StartMethod.AVG)
    with pytest.raises(ValueError, match="labels must lie"):
        start_images(nn.Identity(), images, labels + 1, scores, targets, StartMethod.AVG)
    with pytest.raises(ValueError, match="fraction"):
        start_images(nn.Identity(), images, labels, scores, targets, "avg_min", fraction=0.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- exact inverse


def _targets_for(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return output_targets(model.eval()(images))


def fcnn5_orthogonal() -> nn.Sequential:
    """fcnn5 with seeded orthogonal weights: default init leaves the square fc2 (256 → 256)
    with σ_min ≈ 1e-3, which amplifies any target change a thousandfold on the way back."""
    model = fcnn5()
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight, generator=g)
    return model


def _fcnn1_case() -> tuple[nn.Sequential, Tensor, Tensor, Tensor]:
    model = fcnn1()
    images, labels = random_data()
    anchors = class_averages(images, labels, 10)
    return model, _targets_for(model, images), anchors, labels


def _fcnn5_case() -> tuple[nn.Sequential, Tensor, Tensor, Tensor]:
    # The paper's min/max targets are extreme for fcnn5 (see the extreme-targets test); a tenth of
    # the way from the anchors' outputs towards them keeps every SELU pre-image in range.
    model = fcnn5_orthogonal()
    images, labels = random_data()
    anchors = class_averages(images, labels, 10)
    with torch.no_grad():
        base = model(anchors)
    targets = base + 0.1 * (_targets_for(model, images) - base)
    return model, targets, anchors, labels


@pytest.mark.parametrize("case", [_fcnn1_case, _fcnn5_case], ids=["fcnn1", "fcnn5"])
def test_layerwise_inverse_reaches_targets_with_minimum_change(case: object) -> None:
    model, targets, anchors, _ = case()  # type: ignore[operator]
    chain = invertible_chain(model)
    assert chain is not None
    result = layerwise_inverse(chain, targets, anchors, (1, 28, 28))

    assert result.images.shape == (10, 1, 28, 28)
    assert result.images.dtype == torch.float32
    assert [name for name, _ in result.layer_residuals] == [
        str(i) for i, m in enumerate(chain) if isinstance(m, nn.Linear)
    ]
    assert result.exact.tolist() == [True] * 10
    assert result.clipped.tolist() == [False] * 10
    for _, residual in result.layer_residuals:
        assert float(residual.max()) < 1e-9
    # The target output is reproduced, in float64 and with the float32 image.
    assert float(result.output_residual.max()) < 1e-9
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        out = model64(result.images.double())
    rel = (out - targets.double()).norm(dim=1) / targets.double().norm(dim=1)
    assert float(rel.max()) < 1e-4
    # Minimum change at the first layer: x − anchor lies in W1's row space (orthogonal to its
    # null space), so adding any null-space vector would only move further from the anchor.
    change = (result.images - anchors).flatten(1)
    null_part = null_space_part(linear(model, "fc1").weight.detach(), change)
    assert float(change.norm()) > 1e-3
    assert float(null_part.norm() / change.double().norm()) < 1e-5
    # Where the layer-by-layer solution is exact, the exact inverse keeps it.
    exact = exact_inverse(chain, targets, anchors, (1, 28, 28))
    assert exact.status == [InverseStatus.REACHED] * 10
    assert exact.solver == ["layerwise"] * 10
    assert torch.equal(exact.images, result.images)


def test_layerwise_inverse_reports_extreme_targets_of_deep_network() -> None:
    # fcnn5's minimum-change pre-images of the full min/max targets leave SELU's range
    # (below −λα): reported as clipped, and the output really misses the target.
    model = fcnn5_orthogonal()
    images, labels = random_data()
    targets = _targets_for(model, images)
    chain = invertible_chain(model)
    assert chain is not None
    result = layerwise_inverse(chain, targets, class_averages(images, labels, 10), (1, 28, 28))
    assert result.clipped.tolist() == [True] * 10
    assert result.exact.tolist() == [False] * 10
    assert [name for name, _ in result.activation_clipped] == ["2", "4", "6", "8"]
    assert int(result.activation_clipped[0][1].sum()) > 0
    assert float(result.output_residual.min()) > 1e-3
    assert bool(torch.isfinite(result.images).all())


def test_exact_inverse_minimum_change_fcnn1_is_closed_form() -> None:
    # fcnn1: x = a + W⁺(selu⁻¹(t) − b − W a), checked against an independent lstsq solve.
    model = fcnn1()
    images, labels = random_data()
    targets = _targets_for(model, images)
    anchors = class_averages(images, labels, 10)
    chain = invertible_chain(model)
    assert chain is not None
    result = exact_inverse(chain, targets, anchors, (1, 28, 28))
    assert result.status == [InverseStatus.REACHED] * 10
    assert result.solver == ["layerwise"] * 10
    assert float(result.output_residual.max()) < 1e-8
    w = linear(model, "fc1").weight.detach().double()
    b = linear(model, "fc1").bias.detach().double()
    t = targets.double()
    pre = torch.where(t > 0, t / 1.0507009873554805, torch.log1p(t / -SELU_LOW))
    a = anchors.flatten(1).double()
    # gelsd returns the minimum-norm solution of the underdetermined system W δ = rhs.
    rhs = pre - b - a @ w.T
    delta = torch.linalg.lstsq(w, rhs.T, driver="gelsd").solution.T
    expected = a + delta
    assert torch.allclose(result.images.flatten(1).double(), expected, atol=1e-5, rtol=1e-5)


def test_exact_inverse_reports_target_outside_layer_range() -> None:
    # 16 → 10 → 32: the last layer's range is a 10-dim affine subspace of R^32.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.SELU(), nn.Linear(10, 32))
    chain = invertible_chain(model)
    assert chain is not None
    g = torch.Generator().manual_seed(3)
    anchors = torch.randn(2, 1, 4, 4, generator=g)
    with torch.no_grad():
        reachable_target = model(torch.randn(1, 1, 4, 4, generator=g))[0]
    random_target = torch.randn(32, generator=g)
    targets = torch.stack([reachable_target, random_target])
    result = exact_inverse(chain, targets, anchors, (1, 4, 4))
    last_name, last_residual = result.layerwise.layer_residuals[-1]
    assert last_name == "3"
    assert float(last_residual[0]) < 1e-6  # float32 rounding of the target only
    assert float(last_residual[1]) > 0.1
    # Outside the last layer's range is a proof, whatever the search does.
    assert result.status == [InverseStatus.REACHED, InverseStatus.UNREACHABLE]
    assert result.unreachable_reason[0] is None
    assert "Linear layer '3' is outside its range" in str(result.unreachable_reason[1])
    assert result.layerwise.clipped.tolist() == [False, False]
    assert float(result.output_residual[0]) < 1e-6
    assert float(result.output_residual[1]) > 0.1


def test_exact_inverse_clips_selu_target_below_range() -> None:
    model = fcnn1()
    images, labels = random_data()
    targets = _targets_for(model, images)
    targets[3, 0] = SELU_LOW - 0.5  # below −λα: SELU never outputs it
    chain = invertible_chain(model)
    assert chain is not None
    result = exact_inverse(chain, targets, class_averages(images, labels, 10), (1, 28, 28))
    # An entry below the last activation's range is a proof of unreachability.
    assert result.status == [
        InverseStatus.UNREACHABLE if c == 3 else InverseStatus.REACHED for c in range(10)
    ]
    assert "activation '2'" in str(result.unreachable_reason[3])
    layerwise = result.layerwise
    assert layerwise.clipped.tolist() == [c == 3 for c in range(10)]
    assert layerwise.exact.tolist() == [c != 3 for c in range(10)]
    assert layerwise.activation_clipped[0][0] == "2"
    assert layerwise.activation_clipped[0][1].tolist() == [int(c == 3) for c in range(10)]
    assert bool(torch.isfinite(result.images).all())
    # Layer by layer, the clipped entry lands just inside the range; the search gets at least as
    # close (SELU saturates at the boundary). The rest of the target is met either way.
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        out = model64(layerwise.images.double())
        searched = model64(result.images.double())
    assert SELU_LOW < float(out[3, 0]) < SELU_LOW + 1e-4
    assert SELU_LOW <= float(searched[3, 0]) < SELU_LOW + 1e-4
    assert torch.allclose(out[3, 1:], targets[3, 1:].double(), atol=1e-4)
    assert torch.allclose(searched[3, 1:], targets[3, 1:].double(), atol=1e-4)


def test_invertible_chain_accepts_only_invertible_sequentials() -> None:
    assert invertible_chain(fcnn5()) is not None
    assert invertible_chain(small_cnn()) is None
    assert invertible_chain(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU())) is None
    assert invertible_chain(nn.Sequential(nn.Linear(4, 2), nn.LeakyReLU(-0.1))) is None
    assert invertible_chain(nn.Sequential(nn.Linear(4, 2), nn.LeakyReLU(0.1))) is not None
    assert invertible_chain(nn.Sequential(nn.Flatten(), nn.Tanh())) is None  # no Linear
    assert invertible_chain(nn.Sequential(nn.Flatten(0), nn.Linear(4, 2))) is None
    nested = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.Sigmoid()))
    chain = invertible_chain(nested)
    assert chain is not None
    assert len(chain) == 3


def test_exact_inverse_tanh_sigmoid_leaky() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6), nn.LeakyReLU(0.2),
        nn.Linear(6, 3), nn.Sigmoid(),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(3, 1, 3, 4, generator=g)
    with torch.no_grad():
        targets = model(truth)
    # Anchors near a true pre-image keep every minimum-change step inside tanh's range.
    anchors = truth + 0.01 * torch.randn(3, 1, 3, 4, generator=g)
    chain = invertible_chain(model)
    assert chain is not None
    result = layerwise_inverse(chain, targets, anchors, (1, 3, 4))
    assert bool(result.exact.all())
    with torch.no_grad():
        out = model.double()(result.images.double())
    assert torch.allclose(out, targets.double(), atol=1e-5)


# ----------------------------------------------------------------------------------- refine


@pytest.fixture(scope="module")
def trained_fcnn1() -> tuple[nn.Sequential, Tensor, Tensor]:
    """fcnn1 trained for ~1 s on scikit-learn's digits, resized to 28×28 and standardized."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = nn.functional.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.long)
    model = fcnn1(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        loss: Tensor = nn.functional.cross_entropy(model(images), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    assert accuracy > 0.9
    return model, images, labels


@pytest.mark.parametrize("method", list(StartMethod))
def test_refine_lowers_target_mse_for_every_start(
    trained_fcnn1: tuple[nn.Sequential, Tensor, Tensor], method: StartMethod
) -> None:
    model, images, labels = trained_fcnn1
    with torch.no_grad():
        scores = model(images)
    targets = output_targets(scores)
    x0 = start_images(model, images, labels, scores, targets, method)
    refined, history = refine(model, x0, targets, steps=60, lr=0.05)
    assert len(history) == 60
    with torch.no_grad():
        before = ((model(x0) - targets) ** 2).mean(dim=1)
        after = ((model(refined) - targets) ** 2).mean(dim=1)
    assert bool((after < before).all())
    assert history[-1] < history[0]
    assert history[0] == pytest.approx(float(before.mean()), rel=1e-5)


def test_refine_batched_equals_one_class_at_a_time() -> None:
    model = fcnn5()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 28, 28, generator=g)
    targets = torch.randn(3, 10, generator=g)
    batched, _ = refine(model, x0, targets, steps=5, lr=0.5, optimizer="sgd")
    for k in range(3):
        alone, _ = refine(
            model, x0[k : k + 1], targets[k : k + 1], steps=5, lr=0.5, optimizer="sgd"
        )
        assert torch.allclose(batched[k : k + 1], alone, atol=1e-6)


def test_refine_clamps_pixels() -> None:
    model = fcnn1()
    x0 = torch.zeros(2, 1, 28, 28)
    targets = torch.full((2, 10), 5.0)
    refined, _ = refine(model, x0, targets, steps=20, lr=0.5, clamp=(-0.1, 0.2))
    assert bool((refined >= torch.tensor(-0.1)).all())
    assert bool((refined <= torch.tensor(0.2)).all())
    assert float(refined.min()) == pytest.approx(-0.1)  # the bound is active


def test_refine_freezes_and_restores_model_state() -> None:
    model = fcnn5()
    model.train()
    linear(model, "fc2").weight.requires_grad_(False)  # a mixed state must come back as it was
    flags = [p.requires_grad for p in model.parameters()]
    seen: list[tuple[bool, bool]] = []

    def check(_fraction: float, _loss: float) -> None:
        seen.append((model.training, any(p.requires_grad for p in model.parameters())))

    x0 = torch.zeros(2, 1, 28, 28)
    targets = torch.zeros(2, 10)
    refine(model, x0, targets, steps=3, progress=check)
    assert seen == [(False, False)] * 3
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags

    def boom(_fraction: float, _loss: float) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        refine(model, x0, targets, steps=3, progress=boom)
    assert model.training
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_refine_rejects_bad_arguments() -> None:
    model = fcnn1()
    x0 = torch.zeros(2, 1, 28, 28)
    targets = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="steps must be positive"):
        refine(model, x0, targets, steps=0)
    with pytest.raises(ValueError, match="valid optimizers are: adam, sgd"):
        refine(model, x0, targets, optimizer="lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets must be"):
        refine(model, x0, torch.zeros(3, 10))


# ------------------------------------------------------------------------- inverse_images


def test_inverse_images_on_trained_fcnn1(
    trained_fcnn1: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    model, images, labels = trained_fcnn1
    calls: list[tuple[float, float]] = []
    result = inverse_images(
        model,
        images,
        labels,
        methods=("avg", "avg+training", "pinv"),
        steps=80,
        lr=0.05,
        progress=lambda f, loss: calls.append((f, loss)),
    )
    assert result.targets.shape == (10, 10)
    assert set(result.images) == {"avg", "avg+training", "pinv"}
    assert all(v.shape == (10, 1, 28, 28) for v in result.images.values())
    assert len(result.metrics) == 30
    assert set(result.metrics[0]) == {
        "class", "method", "predicted_class", "target_mse", "output_error",
        "distance_from_average", "pixel_min", "pixel_max", "in_data_range", "reachable", "solver",
    }  # fmt: skip
    by = {(m["method"], m["class"]): m for m in result.metrics}
    own = sum(by[("avg+training", c)]["predicted_class"] == c for c in range(10))
    assert own >= 8
    for c in range(10):
        assert by[("avg", c)]["distance_from_average"] == pytest.approx(0.0, abs=1e-6)
        assert by[("avg", c)]["reachable"] is None
        trained = by[("avg+training", c)]["target_mse"]
        assert isinstance(trained, float)
        assert trained < by[("avg", c)]["target_mse"]  # type: ignore[operator]
    # fcnn1's single wide layer reaches every target (float32-saturated minima at −λα count
    # as reachable: the model outputs them itself).
    for c in range(10):
        assert by[("pinv", c)]["reachable"] == "reached"
        assert by[("pinv", c)]["solver"] == "layerwise"
        assert by[("pinv", c)]["target_mse"] < 1e-8  # type: ignore[operator]
        assert by[("pinv", c)]["predicted_class"] == c
    # Progress runs once per optimizer step plus once per other method, monotone, ending at 1.
    fractions = [f for f, _ in calls]
    assert len(calls) == 80 + 2
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0


def test_inverse_images_pinv_needs_invertible_network() -> None:
    images, labels = random_data(n=20)
    with pytest.raises(ValueError, match=r"method 'pinv' needs an invertible network .* Conv2d"):
        inverse_images(small_cnn(), images, labels, methods=("avg", "pinv"))


def test_inverse_images_unknown_method_lists_valid_ones() -> None:
    images, labels = random_data(n=20)
    with pytest.raises(ValueError, match=r"unknown method.*'best'.*valid methods are: avg, min"):
        inverse_images(fcnn1(), images, labels, methods=("avg", "best"))
    assert "avg_min+training" in VALID_METHODS


def test_inverse_images_cnn_without_pinv_runs_all_starts() -> None:
    images, labels = random_data(n=40)
    result = inverse_images(
        small_cnn(), images, labels, methods=("avg", "min", "avg_min+training"), steps=3
    )
    assert list(result.images) == ["avg", "min", "avg_min+training"]
    assert len(result.losses["avg_min+training"]) == 3


def test_start_images_compute_scores_when_missing() -> None:
    model = fcnn1()
    images, labels = random_data(n=60)
    with torch.no_grad():
        scores = model(images)
    targets = output_targets(scores)
    given = start_images(model, images, labels, scores, targets, StartMethod.AVG_MIN)
    computed = start_images(model, images, labels, None, targets, StartMethod.AVG_MIN)
    assert torch.equal(given, computed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inverse_images_runs_on_the_model_device() -> None:
    model = fcnn1().cuda()
    images, labels = random_data(n=100)  # on the CPU: moved batch by batch
    result = inverse_images(
        model, images, labels, methods=("min", "avg+training", "pinv"), steps=20, lr=0.05
    )
    assert all(v.device.type == "cuda" for v in result.images.values())
    pinv = [m for m in result.metrics if m["method"] == "pinv"]
    assert all(m["reachable"] == "reached" for m in pinv)
    assert all(m["predicted_class"] == m["class"] for m in pinv)
