"""``inverse_images``: the ideal input of each class (Pattichis & Pattichis 2024, Figure 3).

The target of class c is an output vector: by default every unit at its own training-set
minimum and unit c at its maximum (``target_mode: minmax``); the authors' construction puts
unit c's minimum in every entry (``paper``). Starts: the class average (``avg``), the training
image closest to the target (``min``), the average of the closest quarter (``avg_min``), each
optionally refined by optimizing MSE(model(x), target) (``+training``, with deepscope's recipe
or the paper's), the exact inverse of an invertible network (``pinv``: a whole-network
Gauss–Newton search that reports whether it reached the target), and the nearest reachable
output inside the data range (``pinv_box``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deepscope.analyses.params import OptimizingParams
from deepscope.analyses.registry import AnalysisSpec, Resource, register_analysis
from deepscope.contract.result import Metrics, summary_tables
from deepscope.contract.tables import Table, generic_table

__all__ = ["InverseImagesMetrics", "InverseImagesParams", "InverseMethod", "InverseTarget"]

InverseMethod = Literal[
    "avg", "min", "avg_min", "avg+training", "min+training", "avg_min+training", "pinv", "pinv_box"
]


class InverseImagesParams(OptimizingParams):
    """``inverse_images``: the paper's ideal input per class (inverse maps)."""

    analysis: Literal["inverse_images"] = "inverse_images"
    methods: list[InverseMethod] | None = Field(
        default=None,
        min_length=1,
        description="starts avg / min / avg_min, each optionally '+training' (refined by "
        "optimizing MSE(model(x), target)); pinv (the exact inverse) and pinv_box (the nearest "
        "reachable output inside the data range), for networks of Linear layers and invertible "
        "activations; all that apply when omitted",
    )
    target_mode: Literal["minmax", "percentile", "paper", "paper_percentile"] = Field(
        default="minmax",
        description="minmax: unit j's own training minimum in entry j, unit c's maximum in "
        "entry c; percentile: the same with the 25th/75th percentiles; paper / "
        "paper_percentile: the authors' construction, unit c's minimum in every entry",
    )
    recipe: Literal["deepscope", "paper"] = Field(
        default="deepscope",
        description="+training refinement: deepscope (Adam, lr 0.01, 200 steps) or paper (plain "
        "SGD, lr 1e-4, 100 steps, as the authors' code); steps, lr and optimizer override it",
    )
    steps: int | None = Field(  # type: ignore[assignment]
        default=None, ge=1, description="refinement steps (default: the recipe's)"
    )
    lr: float | None = Field(  # type: ignore[assignment]
        default=None, gt=0, le=10, description="refinement learning rate (default: the recipe's)"
    )
    optimizer: Literal["adam", "sgd"] | None = Field(
        default=None, description="refinement optimizer (default: the recipe's)"
    )
    tolerance: float = Field(
        default=1e-6,
        gt=0,
        lt=1,
        description="pinv reaches a target when ‖f(x) − t‖ ≤ tolerance · ‖t‖",
    )
    pinv_iterations: int = Field(default=1000, ge=0, le=100_000)
    box_iterations: int = Field(default=200, ge=0, le=100_000)
    fraction: float = Field(
        default=0.25, gt=0, le=1, description="avg_min: share of closest images averaged"
    )
    max_samples: int = Field(
        default=10_000, ge=10, le=1_000_000, description="training images scored (seeded subset)"
    )


class InverseTarget(BaseModel):
    """One (method, class): how close the generated input comes to the class's target."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    class_: int = Field(alias="class", serialization_alias="class")
    class_name: str | None = None
    method: str
    predicted_class: int
    target_mse: float
    output_error: float | None = Field(default=None, description="‖f(x) − t‖ / ‖t‖")
    distance_from_average: float | None = None
    pixel_min: float | None = None
    pixel_max: float | None = None
    in_data_range: bool | None = None
    reachable: Literal["reached", "not_found", "unreachable"] | None = Field(
        default=None,
        description="pinv / pinv_box: reached (an input whose output equals the target to "
        "the tolerance), not_found (the search failed; nothing is claimed), unreachable "
        "(proved: a target entry outside a layer's range)",
    )
    solver: str | None = None


class InverseImagesMetrics(Metrics):
    methods: list[str]
    target_mode: str
    recipe: str | None = None
    targets_matrix: list[list[float]] = Field(description="row c: the target of class c")
    targets: list[InverseTarget]

    def recognized(self) -> dict[str, list[bool]]:
        groups: dict[str, list[bool]] = {}
        for t in self.targets:
            groups.setdefault(t.method, []).append(t.predicted_class == t.class_)
        return groups

    def tables(self) -> list[Table]:
        rows = [t.model_dump(by_alias=True) for t in self.targets]
        table = generic_table("targets: one row per (method, class)", rows)
        return [*summary_tables(self, frozenset({"targets", "targets_matrix"})), table]


SPEC = register_analysis(
    AnalysisSpec(
        name="inverse_images",
        summary="the ideal input of each class: inverse maps of the output targets",
        params=InverseImagesParams,
        metrics=InverseImagesMetrics,
        compute="deepscope.analyses.inverse_images.compute:run",
        resource=Resource.GPU,
        generates_images=True,
    )
)
