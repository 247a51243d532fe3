"""Training recipes, evaluation and train_model's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from deepscope.manifest import Manifest, ModelFormat, Normalization, manifest_path_for
from deepscope.models.datasets import Dataset, channel_stats, load_dataset
from deepscope.models.registry import get_model
from deepscope.models.training import Recipe, evaluate, train, train_model


class MeanSign(nn.Module):
    """Class 1 when the (normalized) image mean is positive, else class 0."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.flatten(1).mean(dim=1)
        return torch.stack([-m, m], dim=1)


def tiny_dataset(n: int = 8, channels: int = 1, side: int = 4) -> Dataset:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, channels, side, side, generator=g)
    labels = (images.flatten(1).mean(dim=1) > 0.5).long()
    return Dataset("tiny", images, labels, ("low", "high"))


def test_evaluate_known_answer() -> None:
    images = torch.tensor([0.1, 0.3, 0.6, 0.9]).reshape(4, 1, 1, 1).expand(4, 1, 2, 2)
    ds = Dataset("known", images.contiguous(), torch.tensor([0, 1, 1, 1]), ("a", "b"))
    model = MeanSign()
    # Raw pixels are all positive: everything is class 1, 3 of 4 right.
    assert evaluate(model, ds, None) == pytest.approx(0.75)
    # Centred at 0.5, the two dark images become class 0: only the second is wrong.
    centred = Normalization(mean=[0.5], std=[2.0])
    assert evaluate(model, ds, centred, batch_size=3) == pytest.approx(0.75)
    ds2 = Dataset("known", ds.images, torch.tensor([0, 0, 1, 1]), ("a", "b"))
    assert evaluate(model, ds2, centred) == 1.0
    with pytest.raises(ValueError, match="channel"):
        evaluate(model, ds, Normalization(mean=[0.0, 0.0], std=[1.0, 1.0]))


def test_evaluate_restores_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.Dropout(0.5))
    model.train()
    evaluate(model, tiny_dataset(), None)
    assert model.training
    assert model[2].training


def test_train_validates_arguments() -> None:
    ds = tiny_dataset()
    model = get_model("fcnn1", num_classes=2, input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="epochs must be positive"):
        train(model, ds, ds, epochs=0)
    with pytest.raises(ValueError, match="unknown recipe 'adamw'; choose one of: paper, fast"):
        train(model, ds, ds, recipe="adamw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="held-out images"):
        train(model, ds, tiny_dataset(side=8))


def test_train_progress_history_and_eval_mode() -> None:
    ds = tiny_dataset(n=20)
    model = get_model("fcnn1", num_classes=2, input_shape=(1, 4, 4))
    calls: list[tuple[int, float, float]] = []
    result = train(
        model,
        ds,
        ds,
        recipe=Recipe.FAST,
        epochs=3,
        progress=lambda e, loss, acc: calls.append((e, loss, acc)),
    )
    assert [c[0] for c in calls] == [1, 2, 3]
    assert [h["epoch"] for h in result.history] == [1.0, 2.0, 3.0]
    assert [h["loss"] for h in result.history] == [c[1] for c in calls]
    assert result.accuracy == calls[-1][2] == evaluate(model, ds, None)
    assert result.epochs == 3
    assert result.model is model
    assert not any(m.training for m in model.modules())


def test_fcnn1_fast_learns_digits(tmp_path: Path) -> None:
    out = tmp_path / "fcnn1-digits.safetensors"
    result, manifest = train_model("fcnn1", "digits", out, epochs=2, recipe=Recipe.FAST, seed=0)
    assert result.accuracy > 0.85
    assert result.train_accuracy > 0.85
    assert len(result.history) == 2

    # Files written, and the manifest round-trips.
    assert out.is_file()
    assert Manifest.read(manifest_path_for(out)) == manifest
    assert manifest.name == "fcnn1-digits"
    assert manifest.format is ModelFormat.SAFETENSORS
    assert manifest.arch == "fcnn1"
    assert manifest.input_shape == (1, 28, 28)
    assert manifest.class_names == [str(i) for i in range(10)]
    # fcnn1 sees raw pixels, as in the paper.
    assert manifest.normalization == Normalization(mean=[0.0], std=[1.0])
    assert manifest.training is not None
    assert manifest.training.accuracy == result.accuracy
    assert (manifest.training.num_train, manifest.training.num_test) == (1437, 360)
    assert (manifest.training.recipe, manifest.training.epochs) == ("fast", 2)

    # The weights file alone rebuilds the same classifier.
    rebuilt = get_model(manifest.arch, **manifest.arch_kwargs)
    rebuilt.load_state_dict(load_file(str(out)))
    test = load_dataset("digits", "test")
    assert evaluate(rebuilt, test, manifest.normalization) == result.accuracy


def test_seeded_runs_give_identical_weights(tmp_path: Path) -> None:
    def weights(seed: int, name: str) -> dict[str, Tensor]:
        out = tmp_path / f"{name}.safetensors"
        train_model("fcnn1", "digits", out, epochs=1, recipe="fast", seed=seed)
        return load_file(str(out))

    a, b, c = weights(3, "a"), weights(3, "b"), weights(4, "c")
    assert a.keys() == b.keys() == {"fc1.weight", "fc1.bias"}
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


def test_train_model_cnn_on_npz(tmp_path: Path) -> None:
    # 3-channel 8×8 images: topdown must be built with in_channels=3, normalized by the data.
    g = np.random.default_rng(0)
    images = g.integers(0, 256, size=(24, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(24) % 3
    data = tmp_path / "rgb.npz"
    np.savez(data, images=images, labels=labels, class_names=np.array(["r", "g", "b"]))
    out = tmp_path / "models" / "topdown-rgb.safetensors"
    result, manifest = train_model(
        "topdown", str(data), out, epochs=1, recipe=Recipe.FAST, arch_kwargs={"width": 4}
    )
    assert manifest.arch_kwargs == {"num_classes": 3, "in_channels": 3, "width": 4}
    assert manifest.input_shape == (3, 8, 8)
    assert manifest.class_names == ["r", "g", "b"]
    mean, std = channel_stats(load_dataset(str(data)))
    assert manifest.normalization.mean == pytest.approx(mean)
    assert manifest.normalization.std == pytest.approx(std)
    state = load_file(str(out))
    assert state["stage1.conv1.weight"].shape == (4, 3, 3, 3)
    assert "stage1.bn1.running_mean" in state
    assert 0.0 <= result.accuracy <= 1.0


def test_train_model_validates_before_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors"):
        train_model("fcnn1", "digits", tmp_path / "model.pt")
    with pytest.raises(ValueError, match="unknown architecture"):
        train_model("fcnn7", "digits", tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="epochs must be positive"):
        train_model("fcnn1", "digits", tmp_path / "m.safetensors", epochs=0)
    assert not any(tmp_path.iterdir())
