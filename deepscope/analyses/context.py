"""What an analysis's compute function gets: the loaded model, its params, the dataset, where
to write, the device, progress; and where it leaves artifacts and warnings. Worker side (torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deepscope import render
from deepscope.analyses.registry import AnalysisParams
from deepscope.contract.result import Artifact
from deepscope.models.datasets import Dataset
from deepscope.models.loading import LoadedModel

__all__ = ["Progress", "RunContext", "safe_name", "to_numpy"]

#: ``progress(fraction in [0, 1], message)``; the worker turns it into job progress.
Progress = Callable[[float, str], None]


def to_numpy(t: Tensor) -> np.ndarray:
    """A tensor on any device as a numpy array (for rendering and .npz files)."""
    return t.detach().cpu().numpy()


def safe_name(name: str) -> str:
    """A layer name as a file-name part (``layer1.0.conv1`` stays readable)."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "input"


@dataclass
class RunContext:
    """One run of one analysis."""

    loaded: LoadedModel
    params: AnalysisParams
    out_dir: Path
    device: torch.device
    progress: Progress
    dataset: Dataset | None
    artifacts: list[Artifact] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.loaded.input_shape

    def class_names(self, num_classes: int) -> list[str]:
        """The model's class names (manifest, else the dataset's, else ``0..n-1``)."""
        names = self.loaded.manifest.class_names
        if names is None and self.dataset is not None:
            names = list(self.dataset.class_names)
        if names is None or len(names) != num_classes:
            return [str(k) for k in range(num_classes)]
        return list(names)

    def require_dataset(self, analysis: str) -> Dataset:
        if self.dataset is None:
            raise ValueError(
                f"analysis {analysis!r} needs a dataset: give --dataset (digits, fashion-mnist, "
                "an idx directory or an .npz file)"
            )
        return self.dataset

    def normalize(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` images in [0, 1] → the model's input space."""
        return self.loaded.normalization.normalize(images)

    def denormalize(self, x: Tensor) -> Tensor:
        """The model's input space → [0, 1] pixel space (the inverse of :meth:`normalize`)."""
        return self.loaded.normalization.denormalize(x)

    def add_arrays(
        self, name: str, filename: str, arrays: dict[str, np.ndarray], description: str
    ) -> None:
        """Save arrays as an ``.npz`` artifact (for clients that want the numbers)."""
        payload: dict[str, Any] = dict(arrays)  # numpy's stubs type **kwds as allow_pickle
        np.savez_compressed(self.out_dir / filename, **payload)
        self.artifacts.append(
            Artifact(
                name=name, url=filename, media_type="application/x-npz", description=description
            )
        )

    def draw(
        self, drawing: render.Drawing, name: str, filename: str, description: str, /, **kwargs: Any
    ) -> None:
        """The picture ``render.draw(drawing, out_dir / filename, **kwargs)`` as artifact
        ``name``."""
        render.draw(drawing, self.out_dir / filename, **kwargs)
        self.artifacts.append(Artifact(name=name, url=filename, description=description))
