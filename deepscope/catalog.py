"""Facts about the built-in datasets, torch-free: shared by the loaders and the API."""

from __future__ import annotations

__all__ = ["FASHION_MNIST_CLASSES"]

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
