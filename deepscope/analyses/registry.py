"""The analysis registry, in the manner of torchvision's ``register_model``: one place that
knows every analysis, and that the CLI, the service (params validation and its OpenAPI schema),
the queues, the workers, the report and ``check``'s gates all read.

An analysis is an :class:`AnalysisSpec`: its name, a params model, a metrics model, the
resource it needs (``cpu`` or ``gpu`` queue) and its compute entry, a ``"module:function"``
string that only a worker (or ``deepscope analyze``) imports, so this module and every spec
stay torch-free and the API process can read them. Built-in analyses live one package each
under :mod:`deepscope.analyses`; modules named in ``DEEPSCOPE_ANALYSIS_PLUGINS``
(comma-separated) are imported too, so a deployment adds an analysis without touching
deepscope (the API and the workers must both be given it).
"""

from __future__ import annotations

import importlib
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from deepscope.contract.result import Metrics
from deepscope.contract.text import TextError, check_text

__all__ = [
    "DEFAULT_MAX_STEPS",
    "PLUGINS_ENV",
    "AnalysisParams",
    "AnalysisSpec",
    "Resource",
    "UnknownAnalysisError",
    "analysis_names",
    "get_analysis",
    "list_analyses",
    "load_compute",
    "metrics_model",
    "params_union",
    "parse_params",
    "register_analysis",
    "unregister_analysis",
]

#: Upper bound on optimization steps unless the deployment sets another (DEEPSCOPE_MAX_STEPS).
DEFAULT_MAX_STEPS = 5000
#: Environment variable: extra modules to import, each registering analyses.
PLUGINS_ENV = "DEEPSCOPE_ANALYSIS_PLUGINS"


class Resource(StrEnum):
    """Where an analysis runs: the queue it is routed to."""

    CPU = "cpu"
    GPU = "gpu"


class AnalysisParams(BaseModel):
    """Base of every analysis's params: unknown fields are errors, values are immutable,
    numbers are finite (NaN and infinities are refused), and text is valid Unicode.

    Subclasses declare ``analysis: Literal["their name"] = "their name"``, the tag of the
    discriminated union the service validates against. Every numeric field should have an
    upper bound (``le``), so that no value a client can send fails only in the worker.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        try:
            check_text(data)
        except TextError as exc:
            raise PydanticCustomError("invalid_text", str(exc)) from None
        return data


@dataclass(frozen=True)
class AnalysisSpec:
    """Everything deepscope needs to know about one analysis.

    Attributes:
        name: the ``analysis`` of a job (``signal_space``).
        summary: one line for ``--help``, the OpenAPI schema and the report.
        params: the params model (a subclass of :class:`AnalysisParams` with an ``analysis``
            literal equal to ``name``).
        metrics: the metrics model (a subclass of :class:`Metrics`); it lays its metrics out
            as tables (``tables()``) and lists per-layer numbers (``layer_values()``).
        compute: ``"module:function"``; the function takes a run context and returns
            ``metrics`` (it may add artifacts and warnings to the context). Imported only
            where the analysis runs.
        resource: the queue the analysis belongs on.
        generates_images: its ``.npz`` artifacts are images the model is asked about.
        layer_metrics: the per-layer numbers its metrics report (``layer_values()``), which
            ``deepscope check --max METRIC=LIMIT`` can gate on.
    """

    name: str
    summary: str
    params: type[AnalysisParams]
    metrics: type[Metrics]
    compute: str
    resource: Resource = Resource.CPU
    generates_images: bool = False
    layer_metrics: tuple[str, ...] = ()


class UnknownAnalysisError(ValueError):
    """An analysis name nobody registered; the message lists the registered ones."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown analysis {name!r}; valid analyses: {', '.join(known)}")


_ANALYSES: dict[str, AnalysisSpec] = {}
_plugins_loaded: set[str] = set()


def _tag(params: type[AnalysisParams]) -> str | None:
    """The literal value of a params model's ``analysis`` field, if it has one."""
    field = params.model_fields.get("analysis")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is Literal and len(args) == 1:
        return str(args[0])
    return None


def register_analysis(spec: AnalysisSpec) -> AnalysisSpec:
    """Add ``spec`` to the registry (re-registering the same spec is a no-op).

    Raises:
        ValueError: the name is taken by another spec, the params model's ``analysis``
            literal does not match the name, or ``compute`` is not ``"module:function"``.
    """
    if _tag(spec.params) != spec.name:
        raise ValueError(
            f"{spec.params.__name__} must declare analysis: Literal[{spec.name!r}] = {spec.name!r}"
        )
    if ":" not in spec.compute:
        raise ValueError(f"compute must be 'module:function', got {spec.compute!r}")
    existing = _ANALYSES.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"analysis {spec.name!r} is already registered")
    _ANALYSES[spec.name] = spec
    return spec


def unregister_analysis(name: str) -> None:
    """Remove an analysis (tests that register their own clean up with this)."""
    _ANALYSES.pop(name, None)


def _load() -> None:
    """Import the built-in analyses and the plugin modules named in the environment."""
    importlib.import_module("deepscope.analyses")
    for module in os.environ.get(PLUGINS_ENV, "").split(","):
        module = module.strip()
        if module and module not in _plugins_loaded:
            importlib.import_module(module)
            _plugins_loaded.add(module)


def list_analyses() -> list[AnalysisSpec]:
    """Every registered analysis, in registration order."""
    _load()
    return list(_ANALYSES.values())


def analysis_names() -> list[str]:
    return [spec.name for spec in list_analyses()]


def get_analysis(name: str) -> AnalysisSpec:
    """The spec of ``name``; UnknownAnalysisError (a ValueError) listing the valid names."""
    _load()
    spec = _ANALYSES.get(name)
    if spec is None:
        raise UnknownAnalysisError(name, list(_ANALYSES))
    return spec


def metrics_model(name: str) -> type[Metrics]:
    """The metrics model of ``name``, or the open :class:`Metrics` for any other name (a
    prediction job, an analysis this process was not given)."""
    _load()
    spec = _ANALYSES.get(name)
    return spec.metrics if spec is not None else Metrics


def load_compute(spec: AnalysisSpec) -> Callable[..., Any]:
    """Import the compute function of ``spec`` (in a worker: this is where torch comes in)."""
    module, _, function = spec.compute.partition(":")
    compute: Callable[..., Any] = getattr(importlib.import_module(module), function)
    return compute


def params_union() -> Any:
    """The params of every registered analysis as one union discriminated by ``analysis``
    (a type for pydantic and FastAPI)."""
    models = tuple(spec.params for spec in list_analyses())
    if len(models) == 1:
        return models[0]
    return Annotated[Union[models], Field(discriminator="analysis")]  # noqa: UP007


def parse_params(
    analysis: str, params: dict[str, Any] | None = None, *, max_steps: int = DEFAULT_MAX_STEPS
) -> AnalysisParams:
    """Validate ``params`` for ``analysis``.

    Raises:
        UnknownAnalysisError: ``analysis`` is not registered (the message lists those that are).
        pydantic.ValidationError: invalid parameters (a ValueError; names each bad field).
    """
    spec = get_analysis(analysis)
    payload = {**(params or {}), "analysis": analysis}
    return spec.params.model_validate(payload, context={"max_steps": max_steps})
