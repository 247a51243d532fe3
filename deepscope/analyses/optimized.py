"""Pieces the input-optimization analyses share: their per-image metrics and tables."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deepscope.contract.result import Metrics, summary_tables
from deepscope.contract.tables import Table, generic_table

__all__ = ["OptimizedImage", "OptimizedImagesMetrics"]


class OptimizedImage(BaseModel):
    """One optimized image: its target (class, channel or layer) and what it reached."""

    model_config = ConfigDict(extra="allow")

    target: int | str
    final_objective: float | None = None
    predicted_class: int


class OptimizedImagesMetrics(Metrics):
    targets: list[OptimizedImage] = Field(description="one entry per generated image")

    def tables(self) -> list[Table]:
        rows = [t.model_dump() for t in self.targets]
        return [
            *summary_tables(self, frozenset({"targets"})),
            generic_table("generated images", rows),
        ]
