"""The model manifest: what a weights file needs beside it to be loaded and analyzed.

Plain pydantic, no torch: the API validates manifests without importing torch.
A manifest lives beside its weights file with the suffix ``.json`` (``fcnn1.safetensors`` →
``fcnn1.json``); ``deepscope train`` writes both.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["Manifest", "ModelFormat", "Normalization", "TrainingInfo", "manifest_path_for"]


class ModelFormat(StrEnum):
    """How a model file is stored. The last two carry code and are off unless allowed."""

    SAFETENSORS = "safetensors"
    STATE_DICT = "state_dict"
    PT2 = "pt2"
    TORCHSCRIPT = "torchscript"


class Normalization(BaseModel):
    """Per-channel ``(x - mean) / std`` applied to [0, 1] images before the model."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @model_validator(mode="after")
    def _check(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError("normalization mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("normalization std must be positive")
        return self


class TrainingInfo(BaseModel):
    """How ``deepscope train`` made the weights, and how well they do."""

    dataset: str
    epochs: int
    recipe: str
    seed: int
    accuracy: float = Field(description="accuracy on the held-out split, 0..1")
    num_train: int
    num_test: int


class Manifest(BaseModel):
    """What the loader needs besides the weights (sent with ``POST /v1/models``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    format: ModelFormat = ModelFormat.SAFETENSORS
    arch: str | None = None
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_shape: tuple[int, int, int] | None = None
    normalization: Normalization = Field(default_factory=Normalization)
    class_names: list[str] | None = None
    training: TrainingInfo | None = None

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"input_shape must be positive [C, H, W], got {list(value)}")
        return value

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Parse a manifest file; ValueError with the file name on bad JSON or fields."""
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise ValueError(f"invalid manifest {path}: {exc}") from None

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n")


def manifest_path_for(weights: Path) -> Path:
    """The manifest beside a weights file: same name, suffix ``.json``."""
    return weights.with_suffix(".json")
