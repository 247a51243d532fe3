"""The exact inverse searched over the whole network, the box-constrained inverse, and the
paper's targets and refinement recipe (deepscope.analysis.inverse / network_inverse)."""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from typing import cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from deepscope.analysis.inverse import (
    RECIPES,
    InverseStatus,
    RefineRecipe,
    TargetMode,
    box_inverse,
    class_averages,
    exact_inverse,
    inverse_images,
    invertible_chain,
    layerwise_inverse,
    output_targets,
    refine,
)
from deepscope.analysis.network_inverse import chain_names
from deepscope.models.registry import get_model

SHAPE = (1, 28, 28)
SELU_LOW = -1.0507009873554804934193349852946 * 1.6732632423543772848170429916717


def fcnn(name: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return cast(nn.Sequential, get_model(name))


def outputs64(model: nn.Module, x: Tensor) -> Tensor:
    """The model's outputs in float64 (an independent evaluation of a returned image)."""
    with torch.no_grad():
        out: Tensor = copy.deepcopy(model).double().eval()(x.double())
    return out


def relative(out: Tensor, targets: Tensor) -> Tensor:
    t = targets.double()
    rel: Tensor = (out.double() - t).norm(dim=1) / t.norm(dim=1)
    return rel


def target_mse(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    with torch.no_grad():
        mse: Tensor = ((model(x) - targets) ** 2).mean(dim=1)
    return mse


@pytest.fixture(scope="module")
def trained_fcnn5() -> tuple[nn.Sequential, Tensor, Tensor]:
    """fcnn5 trained for ~2 s on scikit-learn's digits, resized to 28×28, pixels in [0, 1]
    (the paper's networks see raw pixels)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    raw = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = nn.functional.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0)
    labels = torch.tensor(digits.target, dtype=torch.long)
    model = fcnn("fcnn5")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        loss: Tensor = nn.functional.cross_entropy(model(images), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    assert accuracy > 0.9
    return model, images, labels


def _problem(
    case: tuple[nn.Sequential, Tensor, Tensor], mode: TargetMode = TargetMode.MINMAX
) -> tuple[list[nn.Module], Tensor, Tensor]:
    model, images, labels = case
    with torch.no_grad():
        targets = output_targets(model(images), mode)
    chain = invertible_chain(model)
    assert chain is not None
    return chain, targets, class_averages(images, labels, 10)


# --------------------------------------------------------------------- exact inverse, deep net


def test_exact_inverse_reaches_every_target_of_trained_fcnn5(
    trained_fcnn5: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    model = trained_fcnn5[0]
    chain, targets, anchors = _problem(trained_fcnn5)
    # The layer-by-layer minimum-change construction fails on every class here: it asks some
    # SELU for outputs below −λα.
    layerwise = layerwise_inverse(chain, targets, anchors, SHAPE)
    assert layerwise.exact.tolist() == [False] * 10
    assert bool(layerwise.clipped.any())

    start = time.perf_counter()
    result = exact_inverse(chain, targets, anchors, SHAPE, names=chain_names(model))
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0  # about a second on one core

    assert result.status == [InverseStatus.REACHED] * 10
    assert result.solver == ["gauss_newton"] * 10
    assert result.unreachable_reason == [None] * 10
    assert bool((result.iterations > 0).all())
    assert float(result.output_residual.max()) < 1e-10
    # Checked independently: the float64 model on the float64 and on the returned float32 input.
    assert float(relative(outputs64(model, result.images64), targets).max()) < 1e-10
    out = outputs64(model, result.images)
    assert float(relative(out, targets).max()) < 1e-4
    assert out.argmax(dim=1).tolist() == list(range(10))
    # Minimum-norm steps from the anchor: the change lies in fc1's row space (each step is in
    # the row space of J = (…) W1), i.e. nothing is added that fc1 cannot see.
    change = (result.images64 - anchors.double()).flatten(1)
    w1 = cast(nn.Linear, model.get_submodule("fc1")).weight.detach().double()
    null_part = change - change @ (torch.linalg.pinv(w1) @ w1).T
    assert float(null_part.norm() / change.norm()) < 1e-8


def test_exact_inverse_with_too_few_iterations_is_not_found(
    trained_fcnn5: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    chain, targets, anchors = _problem(trained_fcnn5)
    for iterations in (0, 1):
        result = exact_inverse(chain, targets, anchors, SHAPE, max_iterations=iterations)
        # A failed search claims nothing about existence.
        assert result.status == [InverseStatus.NOT_FOUND] * 10
        assert result.unreachable_reason == [None] * 10
        assert result.iterations.tolist() == [iterations] * 10
        assert float(result.output_residual.min()) > 1e-6
        assert bool(torch.isfinite(result.images).all())


def test_exact_inverse_paper_targets_of_trained_fcnn5(
    trained_fcnn5: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    chain, targets, anchors = _problem(trained_fcnn5, TargetMode.PAPER)
    result = exact_inverse(chain, targets, anchors, SHAPE)
    assert result.status == [InverseStatus.REACHED] * 10
    out = outputs64(trained_fcnn5[0], result.images)
    assert float(relative(out, targets).max()) < 1e-4


# ------------------------------------------------------------------ exact inverse, fcnn1 & proofs


def _fcnn1_targets(model: nn.Sequential) -> tuple[Tensor, Tensor]:
    """Class averages of seeded noise images, and targets halfway from their outputs to the
    min/max targets (no float32-saturated entries, so the pre-image is well conditioned)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(200, *SHAPE, generator=g)
    labels = torch.arange(200) % 10
    anchors = class_averages(images, labels, 10)
    with torch.no_grad():
        base = model(anchors)
        targets = base + 0.5 * (output_targets(model(images)) - base)
    return targets, anchors


def test_search_on_fcnn1_converges_to_the_closed_form() -> None:
    # For one Linear layer + SELU the pre-images form an affine set; minimum-norm steps from the
    # anchor stay in anchor + row(W), which meets that set in exactly one point: the closed form.
    model = fcnn("fcnn1")
    targets, anchors = _fcnn1_targets(model)
    chain = invertible_chain(model)
    assert chain is not None
    closed = exact_inverse(chain, targets, anchors, SHAPE)
    assert closed.solver == ["layerwise"] * 10
    assert closed.iterations.tolist() == [0] * 10
    assert float(closed.output_residual.max()) < 1e-8
    searched = exact_inverse(chain, targets, anchors, SHAPE, layerwise_first=False)
    assert searched.solver == ["gauss_newton"] * 10
    assert searched.status == [InverseStatus.REACHED] * 10
    assert torch.allclose(searched.images64, closed.images64, atol=1e-7, rtol=0)


def _selu_then_square(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.SELU(), nn.Linear(4, 4))
    nn.init.orthogonal_(cast(nn.Linear, model[3]).weight)  # injective and well conditioned
    return model


def test_unreachable_when_an_injective_layer_forces_an_output_below_selu_range() -> None:
    model = _selu_then_square()
    last = cast(nn.Linear, model[3])
    # Every input reaching W z + b must give the SELU output z itself (W is invertible), and
    # z[0] = −3 is below −λα: unreachable. The second target comes from a valid SELU output.
    z = torch.tensor([[-3.0, 0.5, 1.0, 0.2], [-1.0, 0.5, 1.0, 0.2]])
    with torch.no_grad():
        targets = last(z)
    anchors = torch.zeros(2, 1, 2, 3)
    chain = invertible_chain(model)
    assert chain is not None
    result = exact_inverse(chain, targets, anchors, (1, 2, 3))
    assert result.status == [InverseStatus.UNREACHABLE, InverseStatus.REACHED]
    assert "activation '2'" in str(result.unreachable_reason[0])
    assert result.unreachable_reason[1] is None


def test_no_proof_through_a_wide_layer_means_not_unreachable() -> None:
    # The same SELU output request through a 4 → 2 layer is not forced: other SELU outputs in
    # range give the same target, so "unreachable" must not be claimed (and the search finds one).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.SELU(), nn.Linear(4, 2))
    last = cast(nn.Linear, model[3])
    with torch.no_grad():
        targets = last(torch.tensor([[-3.0, 0.5, 1.0, 0.2]]))
    chain = invertible_chain(model)
    assert chain is not None
    result = exact_inverse(chain, targets, torch.zeros(1, 1, 2, 3), (1, 2, 3))
    assert result.status != [InverseStatus.UNREACHABLE]
    assert result.status == [InverseStatus.REACHED]
    assert float(relative(outputs64(model, result.images64), targets)[0]) < 1e-6


def test_final_range_violation_is_unreachable_for_fcnn1() -> None:
    model = fcnn("fcnn1")
    targets, anchors = _fcnn1_targets(model)
    targets[4, 7] = SELU_LOW - 0.1
    chain = invertible_chain(model)
    assert chain is not None
    result = exact_inverse(chain, targets, anchors, SHAPE, names=chain_names(model))
    assert result.status[4] is InverseStatus.UNREACHABLE
    assert "activation 'selu1'" in str(result.unreachable_reason[4])
    assert all(s is InverseStatus.REACHED for k, s in enumerate(result.status) if k != 4)


# --------------------------------------------------------------------------------- the box


def test_pinv_box_stays_in_range_and_beats_clipped_pinv_and_average(
    trained_fcnn5: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    model, images, labels = trained_fcnn5
    result = inverse_images(model, images, labels, methods=("avg", "pinv", "pinv_box"))
    by = {(m["method"], m["class"]): m for m in result.metrics}
    targets = result.targets
    box, pinv = result.images["pinv_box"], result.images["pinv"]
    assert box.dtype == torch.float32
    assert float(box.min()) >= 0.0
    assert float(box.max()) <= 1.0
    box_mse = target_mse(model, box, targets)
    clipped_mse = target_mse(model, pinv.clamp(0.0, 1.0), targets)
    avg_mse = target_mse(model, result.images["avg"], targets)
    assert bool((box_mse <= clipped_mse * (1 + 1e-5)).all())
    assert bool((box_mse <= avg_mse * (1 + 1e-5)).all())
    assert bool((box_mse < 0.95 * avg_mse).all())  # it really moves
    for c in range(10):
        assert by[("pinv", c)]["reachable"] == "reached"
        assert by[("pinv", c)]["predicted_class"] == c
        assert by[("pinv", c)]["output_error"] < 1e-4  # type: ignore[operator]
        boxed = by[("pinv_box", c)]
        assert boxed["in_data_range"] is True
        assert 0.0 <= boxed["pixel_min"] <= boxed["pixel_max"] <= 1.0  # type: ignore[operator]
        assert boxed["reachable"] in ("reached", "not_found")
        assert boxed["solver"] == "projected_lm"
        assert boxed["target_mse"] == pytest.approx(float(box_mse[c]), rel=1e-6)
    assert result.box is not None
    assert result.exact is not None


def test_box_inverse_matches_independent_lbfgsb(
    trained_fcnn5: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    from scipy.optimize import minimize  # type: ignore[import-untyped]

    model = trained_fcnn5[0]
    chain, targets, anchors = _problem(trained_fcnn5)
    classes = [0, 4, 8]
    result = box_inverse(chain, targets[classes], [anchors[classes]], SHAPE, 0.0, 1.0)
    model64 = copy.deepcopy(model).double()
    for row, c in enumerate(classes):
        t = targets[c].double()

        def loss(z: np.ndarray, t: Tensor = t) -> tuple[float, np.ndarray]:
            x = torch.tensor(z, dtype=torch.float64, requires_grad=True)
            value = ((model64(x.reshape(1, *SHAPE))[0] - t) ** 2).mean()
            (grad,) = torch.autograd.grad(value, x)
            return float(value.detach()), grad.numpy()

        reference = minimize(
            loss,
            anchors[c].double().flatten().numpy(),
            jac=True,
            method="L-BFGS-B",
            bounds=[(0.0, 1.0)] * 784,
            options={"maxiter": 3000},
        )
        assert float(result.mse[row]) <= 1.02 * float(reference.fun)


def test_pinv_box_works_in_pixel_units_under_normalization(
    trained_fcnn5: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    # The same network taking normalized inputs z = (pixel − 0.2) / 0.3: fold the normalization
    # into fc1, so model_z(z) = model(0.3 z + 0.2) (up to float32 rounding of the folded
    # weights). The box is then [−2/3, 8/3] in z; the search is scale-equivariant, so it must
    # find the same output error as on the raw model (not the same image: the rounding
    # differences steer the non-convex search to nearby local minima).
    model, images, labels = trained_fcnn5
    mean, std = 0.2, 0.3
    folded = copy.deepcopy(model)
    fc1 = cast(nn.Linear, folded.get_submodule("fc1"))
    with torch.no_grad():
        fc1.bias.add_(fc1.weight.sum(dim=1) * mean)
        fc1.weight.mul_(std)
    normalized = (images - mean) / std
    raw = inverse_images(model, images, labels, methods=("pinv_box",))
    result = inverse_images(
        folded, normalized, labels, methods=("avg", "pinv_box"), normalization=((mean,), (std,))
    )
    pixels = result.images["pinv_box"].double() * std + mean
    assert float(pixels.min()) >= -1e-6
    assert float(pixels.max()) <= 1 + 1e-6
    assert raw.box is not None
    assert result.box is not None
    assert torch.allclose(result.box.mse, raw.box.mse, rtol=2e-2)
    for m in result.metrics:
        if m["method"] == "pinv_box":
            assert m["in_data_range"] is True
        else:  # the class averages of data in [0, 1]
            assert m["in_data_range"] is True
            assert m["pixel_min"] == pytest.approx(0.0, abs=1e-6)


def test_box_inverse_validates_arguments() -> None:
    model = fcnn("fcnn1")
    chain = invertible_chain(model)
    assert chain is not None
    x = torch.zeros(2, *SHAPE)
    t = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="low < high"):
        box_inverse(chain, t, [x], SHAPE, 1.0, 0.0)
    with pytest.raises(ValueError, match="at least one start"):
        box_inverse(chain, t, [], SHAPE, 0.0, 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        box_inverse(chain, t, [x], SHAPE, 0.0, 1.0, tolerance=0.0)


# ------------------------------------------------------------------------ which networks


def test_pinv_on_relu_network_names_the_blocking_module() -> None:
    model = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(), fc1=nn.Linear(784, 32), relu1=nn.ReLU(), fc2=nn.Linear(32, 10)
        )
    )
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, *SHAPE, generator=g), torch.arange(40) % 10
    for method in ("pinv", "pinv_box"):
        with pytest.raises(
            ValueError,
            match=rf"method '{method}' needs an invertible network .*"
            r"ReLU at 'relu1' \(maps every negative input to 0\)",
        ):
            inverse_images(model, images, labels, methods=("avg", method))
    pooled = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(196, 10))
    with pytest.raises(ValueError, match=r"MaxPool2d at '0' \(keeps one value per window\)"):
        inverse_images(pooled, images, labels, methods=("pinv",))
    # The low-level solvers refuse such chains too.
    with pytest.raises(ValueError, match=r"ReLU at '2'"):
        exact_inverse(list(model), torch.zeros(1, 10), torch.zeros(1, *SHAPE), SHAPE)


# --------------------------------------------------------------------- the paper's settings


def test_output_targets_paper_known_answer() -> None:
    scores = torch.tensor([[1.0, 5.0, -2.0], [3.0, 0.0, 4.0], [2.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    # Unit mins (0, 0, -2), maxes (3, 5, 4): row c = unit c's min everywhere, its max at c.
    expected = torch.tensor([[3.0, 0.0, 0.0], [0.0, 5.0, 0.0], [-2.0, -2.0, 4.0]])
    assert torch.equal(output_targets(scores, TargetMode.PAPER), expected)
    assert torch.equal(output_targets(scores, "paper"), expected)
    with pytest.raises(ValueError, match="valid modes are: minmax, percentile, paper"):
        output_targets(scores, "best")


def test_output_targets_paper_percentile_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(41, 5, generator=g, dtype=torch.float64)
    targets = output_targets(scores, TargetMode.PAPER_PERCENTILE)
    q25 = np.percentile(scores.numpy(), 25, axis=0)
    q75 = np.percentile(scores.numpy(), 75, axis=0)
    for c in range(5):
        row = np.full(5, q25[c])
        row[c] = q75[c]
        np.testing.assert_allclose(targets[c].numpy(), row, rtol=1e-12)


def test_refine_paper_recipe_is_the_authors_loop() -> None:
    # The authors refine one class at a time: SGD(lr=1e-4) on nn.MSELoss(model(z), target),
    # 100 steps, nothing clamped.
    model = fcnn("fcnn5")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, *SHAPE, generator=g)
    targets = 3 * torch.randn(3, 10, generator=g)
    expected = []
    for k in range(3):
        z = x0[k : k + 1].clone().requires_grad_(True)
        opt = torch.optim.SGD([z], lr=1e-4)
        for _ in range(100):
            opt.zero_grad()
            loss = nn.MSELoss()(model(z), targets[k : k + 1])
            loss.backward()
            opt.step()
        expected.append(z.detach())
    refined, history = refine(model, x0, targets, recipe="paper")
    assert len(history) == 100
    assert torch.allclose(refined, torch.cat(expected), atol=1e-7)
    assert RECIPES[RefineRecipe.PAPER].optimizer == "sgd"


def test_inverse_images_recipe_sets_defaults_and_arguments_override() -> None:
    model = fcnn("fcnn1")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(60, *SHAPE, generator=g), torch.arange(60) % 10
    paper = inverse_images(
        model, images, labels, methods=("avg+training",), recipe="paper", target_mode="paper"
    )
    assert len(paper.losses["avg+training"]) == 100
    with torch.no_grad():
        assert torch.equal(paper.targets, output_targets(model(images), TargetMode.PAPER))
    default = inverse_images(model, images, labels, methods=("avg+training",))
    assert len(default.losses["avg+training"]) == 200
    short = inverse_images(
        model, images, labels, methods=("avg+training",), recipe="paper", steps=7
    )
    assert len(short.losses["avg+training"]) == 7
    with pytest.raises(ValueError, match="valid recipes are: deepscope, paper"):
        inverse_images(model, images, labels, methods=("avg+training",), recipe="fast")


def test_in_place_activations_give_the_same_inverse() -> None:
    # In-place SELUs must not change the result (they overwrite the activations they are given).
    model = fcnn("fcnn5")
    targets, anchors = _fcnn1_targets(fcnn("fcnn1"))
    with torch.no_grad():
        base = model(anchors)
        targets = base + 0.01 * targets
    in_place = copy.deepcopy(model)
    for module in in_place.modules():
        if isinstance(module, nn.SELU):
            module.inplace = True
    results = []
    for net in (model, in_place):
        chain = invertible_chain(net)
        assert chain is not None
        results.append(exact_inverse(chain, targets, anchors, SHAPE))
    assert results[0].status == [InverseStatus.REACHED] * 10
    assert results[1].status == results[0].status
    assert torch.equal(results[1].images64, results[0].images64)


def test_search_through_tanh_leaky_sigmoid_and_range_proof() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6), nn.LeakyReLU(0.2),
        nn.Linear(6, 3), nn.Sigmoid(),
    )  # fmt: skip
    # Reachable targets are outputs of random inputs (tanh bounds the hidden layer, so the
    # reachable outputs are a bounded set: random targets need not be reachable); the
    # anchors are other random inputs, far from those pre-images.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        targets = model.double()(torch.randn(4, 1, 3, 4, generator=g, dtype=torch.float64))
    targets[3, 1] = 1.2  # a sigmoid never outputs it
    anchors = torch.randn(4, 1, 3, 4, generator=g)
    chain = invertible_chain(model)
    assert chain is not None
    result = exact_inverse(chain, targets, anchors, (1, 3, 4))
    assert result.status[:3] == [InverseStatus.REACHED] * 3
    assert result.status[3] is InverseStatus.UNREACHABLE
    assert "activation '6'" in str(result.unreachable_reason[3])
    out = outputs64(model, result.images64)
    assert float(relative(out[:3], targets[:3]).max()) < 1e-10
