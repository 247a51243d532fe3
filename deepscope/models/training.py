"""Training recipes: the paper's (SGD) and a fast one (Adam), plus ``train_model``, which builds
an architecture from the registry, trains it on a dataset and writes weights and manifest."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepscope.analysis.hooks import eval_mode
from deepscope.analysis.normalization import ChannelNormalization
from deepscope.manifest import (
    Manifest,
    ModelFormat,
    Normalization,
    TrainingInfo,
    manifest_path_for,
)
from deepscope.models.datasets import Dataset, channel_stats, load_dataset
from deepscope.models.registry import accepted_kwargs, get_model, get_model_spec

__all__ = ["RAW_PIXEL_ARCHS", "Recipe", "TrainResult", "evaluate", "train", "train_model"]

Progress = Callable[[int, float, float], None]

#: Architectures trained on raw [0, 1] pixels (identity normalization), as in the paper.
RAW_PIXEL_ARCHS: frozenset[str] = frozenset({"fcnn1", "fcnn5"})


class Recipe(StrEnum):
    """How to train.

    ``paper``: SGD (lr 1e-3, momentum 0.9), batch 32, cross-entropy, as in the paper.
    ``fast``: Adam (lr 1e-3), batch 128, cross-entropy; converges in fewer epochs.
    """

    PAPER = "paper"
    FAST = "fast"


@dataclass(frozen=True)
class _RecipeConfig:
    batch_size: int
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]


_RECIPES: dict[Recipe, _RecipeConfig] = {
    Recipe.PAPER: _RecipeConfig(32, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)),
    Recipe.FAST: _RecipeConfig(128, lambda ps: torch.optim.Adam(ps, lr=1e-3)),
}


@dataclass
class TrainResult:
    """A trained model (in eval mode) and how it did.

    ``accuracy`` is on the held-out split, ``train_accuracy`` on the training split (eval mode),
    both in [0, 1]. ``history`` has one dict per epoch: ``epoch``, ``loss`` (mean training loss),
    ``accuracy`` (held-out), ``seconds`` (since the start).
    """

    model: nn.Module
    accuracy: float
    train_accuracy: float
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _recipe(recipe: Recipe | str) -> Recipe:
    try:
        return Recipe(recipe)
    except ValueError:
        choices = ", ".join(r.value for r in Recipe)
        raise ValueError(f"unknown recipe {recipe!r}; choose one of: {choices}") from None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _normalizer(normalization: Normalization | None, channels: int) -> ChannelNormalization:
    """The images' normalization; identity for ``None``."""
    if normalization is None:
        return ChannelNormalization.identity(channels)
    return ChannelNormalization.of(normalization.mean, normalization.std, channels)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: Dataset,
    normalization: Normalization | None,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``ds`` (eval mode; the model's mode is restored).

    Images (N, C, H, W) are normalized with ``normalization`` (identity if ``None``) and sent to
    the device of the model's parameters.
    """
    if len(ds) == 0:
        raise ValueError(f"dataset {ds.name!r} is empty")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = _model_device(model)
    norm = _normalizer(normalization, ds.input_shape[0])
    correct = 0
    with eval_mode(model):
        for start in range(0, len(ds), batch_size):
            x = ds.images[start : start + batch_size].to(device)
            y = ds.labels[start : start + batch_size].to(device)
            logits = model(norm.normalize(x))
            correct += int((logits.argmax(dim=1) == y).sum())
    return correct / len(ds)


def train(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    *,
    recipe: Recipe = Recipe.PAPER,
    epochs: int = 1,
    seed: int = 0,
    normalization: Normalization | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``model`` on ``train`` with cross-entropy and report accuracy on ``test``.

    Batches are shuffled by a ``torch.Generator`` seeded with ``seed``; the global RNG (dropout)
    is seeded too, inside a fork, so the caller's RNG state is untouched. ``progress(epoch, loss,
    held-out accuracy)`` is called after each epoch. The model is moved to ``device`` and left
    in eval mode. ``ValueError`` for ``epochs <= 0``, empty or mismatched datasets, or a loss
    that is no longer finite (diverged).
    """
    recipe = _recipe(recipe)
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if len(train) == 0 or len(test) == 0:
        raise ValueError("training and held-out datasets must not be empty")
    if train.input_shape != test.input_shape:
        raise ValueError(
            f"train images are {train.input_shape} but held-out images are {test.input_shape}"
        )
    config = _RECIPES[recipe]
    dev = torch.device(device)
    model.to(dev)
    norm = _normalizer(normalization, train.input_shape[0])
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = config.make_optimizer(params)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    accuracy = 0.0
    fork_devices: list[int] = []
    if dev.type == "cuda":
        fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=generator)
            total_loss = 0.0
            for first in range(0, len(train), config.batch_size):
                idx = order[first : first + config.batch_size]
                x = train.images[idx].to(dev, non_blocking=True)
                y = train.labels[idx].to(dev, non_blocking=True)
                loss = F.cross_entropy(model(norm.normalize(x)), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total_loss += float(loss.detach()) * len(idx)
            mean_loss = total_loss / len(train)
            if mean_loss != mean_loss or mean_loss in (float("inf"), float("-inf")):
                raise ValueError(f"training diverged: loss is {mean_loss} in epoch {epoch}")
            model.eval()
            accuracy = evaluate(model, test, normalization)
            history.append(
                {
                    "epoch": float(epoch),
                    "loss": mean_loss,
                    "accuracy": accuracy,
                    "seconds": time.perf_counter() - start,
                }
            )
            if progress is not None:
                progress(epoch, mean_loss, accuracy)
    model.eval()
    train_accuracy = evaluate(model, train, normalization)
    return TrainResult(
        model=model,
        accuracy=accuracy,
        train_accuracy=train_accuracy,
        epochs=epochs,
        seconds=time.perf_counter() - start,
        history=history,
    )


def _arch_kwargs(arch: str, ds: Dataset, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What to build ``arch`` with for ``ds``: its class count, channels and input shape (as the
    builder declares them), overridden by ``extra``."""
    declared = accepted_kwargs(arch)
    kwargs: dict[str, Any] = {"num_classes": ds.num_classes}
    if "in_channels" in declared:
        kwargs["in_channels"] = ds.input_shape[0]
    if "input_shape" in declared:
        kwargs["input_shape"] = list(ds.input_shape)
    kwargs.update(extra or {})
    return kwargs


def train_model(
    arch: str,
    dataset: str,
    out: Path,
    *,
    epochs: int = 1,
    recipe: Recipe | str = Recipe.PAPER,
    seed: int = 0,
    arch_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> tuple[TrainResult, Manifest]:
    """Build ``arch`` for ``dataset``, train it and write ``out`` (safetensors) and its manifest.

    The model is built with ``num_classes`` (and ``in_channels`` / ``input_shape`` where the
    architecture takes them) from the dataset, then ``arch_kwargs``; its initialisation is seeded
    with ``seed``. fcnn1/fcnn5 see raw [0, 1] pixels (identity normalization, as in the paper);
    other architectures are normalized with the training set's per-channel mean and std.
    Returns the training result and the manifest written at ``manifest_path_for(out)``.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output file must end in .safetensors, got {out.name!r}")
    recipe = _recipe(recipe)
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    get_model_spec(arch)  # unknown architecture: fail before loading data
    train_ds = load_dataset(dataset, "train")
    test_ds = load_dataset(dataset, "test")
    kwargs = _arch_kwargs(arch, train_ds, arch_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_model(arch, **kwargs)
    channels = train_ds.input_shape[0]
    if arch in RAW_PIXEL_ARCHS:
        normalization = Normalization(mean=[0.0] * channels, std=[1.0] * channels)
    else:
        mean, std = channel_stats(train_ds)
        normalization = Normalization(mean=mean, std=std)
    result = train(
        model,
        train_ds,
        test_ds,
        recipe=recipe,
        epochs=epochs,
        seed=seed,
        normalization=normalization,
        device=device,
        progress=progress,
    )
    _save_safetensors(result.model, out)
    manifest = Manifest(
        name=out.stem,
        format=ModelFormat.SAFETENSORS,
        arch=arch,
        arch_kwargs=kwargs,
        input_shape=train_ds.input_shape,
        normalization=normalization,
        class_names=list(train_ds.class_names),
        training=TrainingInfo(
            dataset=dataset,
            epochs=epochs,
            recipe=recipe.value,
            seed=seed,
            accuracy=result.accuracy,
            num_train=len(train_ds),
            num_test=len(test_ds),
        ),
    )
    manifest.write(manifest_path_for(out))
    return result, manifest


def _save_safetensors(model: nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous CPU tensors that share no storage.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out))
