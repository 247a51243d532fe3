"""Facts about the built-in datasets, torch-free: shared by the loaders, the workers and the
API (which lists and checks them without loading any)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUILTIN_DATASETS", "FASHION_MNIST_CLASSES", "BuiltinDataset"]


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset every tenant may name."""

    name: str
    num_samples: int  # of the train split
    input_shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


#: The built-in datasets by name.
BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset("digits", 1437, (1, 28, 28), tuple(str(k) for k in range(10))),
        BuiltinDataset("fashion-mnist", 60000, (1, 28, 28), FASHION_MNIST_CLASSES),
    )
}
